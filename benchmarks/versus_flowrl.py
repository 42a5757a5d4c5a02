"""flowrl_jax.py against the authors' FlowRL (bytedance/FlowRL, PyTorch) at the same settings, side by side.

    git clone https://github.com/bytedance/FlowRL /path/to/FlowRL             # their code, left untouched
    python3 -m venv /path/to/torch-venv                                       # torch only here, never in requirements.txt
    /path/to/torch-venv/bin/pip install torch==2.13.0 gymnasium==1.4.0 mujoco==3.17.0 "numpy<2.5" tensorboard imageio
    python benchmarks/versus_flowrl.py --authors /path/to/FlowRL --torch-python /path/to/torch-venv/bin/python

The figure is the marginal env steps/s after learning starts, as in benchmarks/versus_authors.py: each
side runs --short and --long env steps with --learning-starts random steps first (evaluation, saving
and tracking off), and (long - short) / (time of long - time of short) cancels start-up, compilation
(theirs uses torch.compile with mode="max-autotune") and the random phase. Three sides: ours, theirs as
it runs on a CPU (float32: their code enables its bf16 autocast only on CUDA), and theirs with that
autocast switched on. The six runs of a task are interleaved (reversed on odd repeats), each alone on the
machine; the table gives the median over --repeats with the spread.

Their main.py runs as it is, from their checkout, through a runner that supplies from outside what it
needs here: a `wandb` that does nothing (main.py logs in at import), Gymnasium's task behind their
DMControlEnv interface (their envs/dm_control.py builds only dm_control tasks and imports the old `gym`),
a `torchvision.io` (imported for videos, which are off; PyPI's torchvision does not load beside the
CPU torch), the CPU where their policy names the GPU (`.cuda()`, `torch.device("cuda:0")`), and their config with the CPU device, --learning-starts, no evaluation and no saving. Their
loop ends only at an episode's end, so the runner stops it after exactly the requested env steps. Their
main.py sets OMP_NUM_THREADS=1 before importing torch; that is their choice and is kept (the runner,
which must import torch first, makes the same setting before it; --their-threads 0 gives torch every core).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import versus_authors
from versus_authors import MACHINE, command_flags, read_runs, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = ("ours", "theirs", "theirs_bf16")
THEIR_BATCH = 256  # their default batch size

RUNNER = '''"""Runs bytedance/FlowRL's main.py unchanged for a fixed number of env steps; written by
benchmarks/versus_flowrl.py. argv: checkout env_id total_steps learning_starts seed bf16(0/1) omp_threads"""
import os, runpy, sys, types

checkout, env_id, total, starts, seed, bf16, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
sys.path.insert(0, checkout)


def module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


nothing = lambda *args, **kwargs: None
module("wandb", login=nothing, init=nothing, log=nothing, finish=nothing)  # nothing leaves this machine
module("torchvision")
module("torchvision.io", write_video=nothing)  # videos are off

import gymnasium as gym


class Stop(Exception):
    pass


class GymnasiumTask:
    """Their DMControlEnv's interface (reset -> obs, step -> (obs, r, done, info), seed, _action_space) over a
    Gymnasium task; raises Stop at the (total + 1)-th step, so that the run lasts exactly `total` env steps."""

    def __init__(self, domain_name=None, task_name=None):
        self.env = gym.make(env_id)
        self.observation_space = self.env.observation_space
        self.action_space = self._action_space = self.env.action_space
        self._max_episode_steps = self.env.spec.max_episode_steps
        self.steps, self.next_seed = 0, None

    def seed(self, seed):
        self.next_seed = seed

    def reset(self):
        obs, _ = self.env.reset(seed=self.next_seed)
        self.next_seed = None
        return obs

    def step(self, action):
        if self.steps == total:
            raise Stop
        self.steps += 1
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated or truncated, info

    def close(self):
        self.env.close()


module("envs", __path__=[])
module("envs.dm_control", DMControlEnv=GymnasiumTask)

from utilis.default_config import default_config  # the dict main.py reads

default_config.update(start_steps=starts, num_steps=10 ** 12, eval=False, save=False, cuda=False)

# main.py sets OMP_NUM_THREADS=1 before it imports torch, and OpenMP reads it when torch loads. torch loads
# here first, so their setting is made here (threads 0: torch's default, every core).
if threads:
    os.environ["OMP_NUM_THREADS"] = str(threads)

# Their policy hard-codes the GPU (.cuda() on its action scale, torch.device("cuda:0") for its noise): on
# this machine both mean the CPU.
import torch
from model import algo, model

torch.Tensor.cuda = lambda self, *args, **kwargs: self
their_policy_init = model.Policy_flow.__init__


def policy_init_on_cpu(self, *args, **kwargs):
    their_policy_init(self, *args, **kwargs)
    self.device = torch.device("cpu")


model.Policy_flow.__init__ = policy_init_on_cpu
if bf16:
    their_init = algo.flowAC.__init__

    def init_with_autocast(self, *args, **kwargs):
        their_init(self, *args, **kwargs)
        self.amp_enabled = True  # their torch.autocast(bfloat16), which they switch on only on CUDA

    algo.flowAC.__init__ = init_with_autocast

sys.argv = [os.path.join(checkout, "main.py"), "--seed", str(seed)]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except Stop:
    print(f"stopped after {total} env steps")
else:
    raise SystemExit("their loop ended before the requested steps")
'''


@dataclass
class Args:
    authors: str = ""
    """a checkout of github.com/bytedance/FlowRL (required; nothing in it is changed)"""
    torch_python: str = ""
    """the Python of a separate environment with torch (required; see the docstring for what it needs)"""
    env_ids: list[str] = field(default_factory=lambda: ["Hopper-v4", "Humanoid-v4"])
    """Gymnasium tasks"""
    learning_starts: int = 1000
    """random steps before the first update, both sides"""
    short: int = 1200
    """env steps of the short run"""
    long: int = 1500
    """env steps of the long run"""
    repeats: int = 2
    """interleaved repeats of the six runs"""
    seed: int = 1
    """seed of every run"""
    bf16: bool = True
    """also time theirs with its bf16 autocast on (--no-bf16: float32 only)"""
    their_threads: int = 1
    """OMP_NUM_THREADS of theirs: 1, as their main.py sets it; 0 leaves torch's default (every core)"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "versus_flowrl")
    """{out}.json gathers every run (this one is added to it, tagged with the machine, the commit and the date);
    {out}.md: every run's table"""


def command(side: str, args: Args, env_id: str, steps: int, runner: str) -> list[str]:
    if side == "ours":
        return [sys.executable, os.path.join(ROOT, "flowrl_jax.py"), "--env-id", env_id, "--seed", str(args.seed),
                "--total-timesteps", str(steps), "--learning-starts", str(args.learning_starts), "--eval-episodes", "0",
                "--checkpoint-every", "0", "--no-progress"]
    return [args.torch_python, runner, os.path.abspath(args.authors), env_id, str(steps), str(args.learning_starts),
            str(args.seed), "1" if side == "theirs_bf16" else "0", str(args.their_threads)]


def timed(cmd: list[str], cwd: str) -> float:
    return versus_authors.timed(cmd, dict(os.environ, MUJOCO_GL="egl", PYTHONWARNINGS="ignore"), cwd)


def time_task(args: Args, env_id: str, work: str, runner: str) -> dict:
    """Marginal env steps/s of every side per repeat, the runs interleaved; ratios ours / theirs."""
    sides = SIDES if args.bf16 else SIDES[:2]
    rates = {side: [] for side in sides}
    # torch.compile(mode="max-autotune") keeps what it tuned in a cache that a setting (bf16, the thread count)
    # invalidates; an untimed run of each of their sides first, so that every timed run finds it warm and the
    # difference of two runs does not hold a minute of tuning.
    for side in sides[1:]:
        timed(command(side, args, env_id, args.learning_starts + 10, runner), work)
    for r in range(args.repeats):
        order = [(side, args.short) for side in sides] + [(side, args.long) for side in reversed(sides)]
        times = {}
        for side, steps in (order if r % 2 == 0 else order[::-1]):
            times[(side, steps)] = timed(command(side, args, env_id, steps, runner), work)
            print(f"{env_id} {side} {steps} steps: {times[(side, steps)]:.1f} s", flush=True)
        for side in sides:
            extra = times[(side, args.long)] - times[(side, args.short)]
            if extra <= 0:
                raise SystemExit(f"error: {side}'s {args.long}-step run took no longer than its {args.short}-step run "
                                 f"({extra:+.1f} s): its start-up varied between runs; try again with a longer --long")
            rates[side].append((args.long - args.short) / extra)
    ratios = {f"ours/{side}": [o / t for o, t in zip(rates["ours"], rates[side])] for side in sides[1:]}
    return {**rates, **ratios}


def table(rows: list[dict], args: Args, machine: str) -> list[str]:
    cell = lambda xs: f"{statistics.median(xs):.2f} ({min(xs):.2f} to {max(xs):.2f})" if xs else "-"
    columns = [(key, head) for key, head in [("ours", "ours"), ("theirs", "authors' (float32)"),
                                              ("theirs_bf16", "authors' (bf16 autocast)"),
                                              ("ours/theirs", "ours / authors' float32"),
                                              ("ours/theirs_bf16", "ours / authors' bf16")]
               if args.bf16 or "bf16" not in key]
    return [f"Marginal env steps/s after learning starts ({args.short} and {args.long} steps, --learning-starts "
            f"{args.learning_starts}, {args.repeats} interleaved repeats: median (min to max)): flowrl_jax.py against "
            f"bytedance/FlowRL's main.py at its defaults on the CPU, "
            f"{'float32 and with its bf16 autocast' if args.bf16 else 'float32 (its bf16 autocast not timed)'}, "
            f"{'OMP_NUM_THREADS=%d' % args.their_threads if args.their_threads else 'torch on every core'}. Machine: "
            f"{machine}; {time.strftime('%Y-%m-%d')}. Command: python benchmarks/versus_flowrl.py"
            f"{command_flags(args, {'authors': '<checkout>', 'torch_python': '<python with torch>'})}", "",
            "| task | " + " | ".join(head for _, head in columns) + " |", "|---|" + "---|" * len(columns),
            *["| " + " | ".join([r["env_id"]] + [cell(r.get(key, [])) for key, _ in columns]) + " |" for r in rows]]


def check(args: Args) -> None:
    if not args.authors or not os.path.isfile(os.path.join(args.authors, "main.py")) or not os.path.isfile(
            os.path.join(args.authors, "model", "algo.py")):
        raise SystemExit(f"error: --authors {args.authors!r} is not a checkout of https://github.com/bytedance/FlowRL "
                         "(no main.py and model/algo.py)")
    if not args.torch_python:
        raise SystemExit("error: --torch-python is required: the Python of an environment with torch (see --help)")
    if not THEIR_BATCH <= args.learning_starts < args.short < args.long:
        # their buffer samples a batch of 256 without replacement, so it must hold that many before the first update
        raise SystemExit(f"error: need {THEIR_BATCH} <= --learning-starts < --short < --long, got {args.learning_starts}, "
                         f"{args.short}, {args.long}")
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats must be at least 1, got {args.repeats}")
    if args.their_threads < 0:
        raise SystemExit(f"error: --their-threads must be 0 (torch's default) or a thread count, got {args.their_threads}")
    try:  # before the runs: the file this one will join must be a file of runs
        read_runs(args.out + ".json")
    except ValueError as e:
        raise SystemExit(f"error: --out: {e}") from None
    probe = subprocess.run([args.torch_python, "-c", "import torch, gymnasium, mujoco, tensorboard, imageio"], capture_output=True,
                           text=True) if os.path.isfile(args.torch_python) else None
    if probe is None or probe.returncode != 0:
        raise SystemExit(f"error: --torch-python {args.torch_python} cannot import torch, gymnasium, mujoco, tensorboard "
                         "and imageio: pip install torch==2.13.0 gymnasium==1.4.0 mujoco==3.17.0 'numpy<2.5' tensorboard imageio")


def main(argv=None) -> int:
    import tyro

    args = tyro.cli(Args, args=argv)
    check(args)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        runner = os.path.join(work, "run_flowrl.py")
        with open(runner, "w") as f:
            f.write(RUNNER)
        for env_id in args.env_ids:
            row = {"env_id": env_id, **time_task(args, env_id, work, runner)}
            print(f"{env_id}: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in row.items() if k != "env_id"),
                  flush=True)
            rows.append(row)
    write_results(args, rows, table(rows, args, MACHINE), "Ours against the authors' FlowRL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
