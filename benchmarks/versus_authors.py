"""Ours against the authors' SAC Flow scripts at the same settings, side by side on one machine.

    git clone https://github.com/Elessar123/SAC-FLOW /path/to/SAC-FLOW      # their code, left untouched
    python benchmarks/versus_authors.py --authors /path/to/SAC-FLOW
    python benchmarks/versus_authors.py --authors /path/to/SAC-FLOW --env-ids Hopper-v4 --repeats 1 --short 1100 --long 1200
    python benchmarks/versus_authors.py --pool-only            # the pooled table again from the runs gathered so far

Every run is added to benchmarks/results/versus_authors.json (its rows, tagged with the machine, the commit and
the date), and versus_authors.md gives every timed run's repeats pooled per task and script (median, quartiles,
range and how many reach --target: one run's two or three repeats move as much as a shared machine drifts
within the hour), then the latest run's table.

The figure is the marginal env steps/s after learning starts: each script runs --short and --long total
steps with --learning-starts random steps first (evaluation, checkpoints, tracking and model saving off),
and (long - short) / (time of long - time of short) cancels start-up, compilation and the random
phase. The four runs of a task and a script pair are interleaved (ours short, theirs short, ours long,
theirs long; reversed on odd repeats, so that each side's two runs lie as far apart as the other's),
each alone on the machine with all its cores, and the table gives the median over --repeats with the
spread (min to max).

A second figure comes from the same runs: the env steps/s within each run, from a timestamp at each call
of the function the training loop calls once per env step after learning starts (ours `update_seeds`, the
jitted update; theirs `update_critic`), stamped by a runner that wraps jax.jit from outside and runs the
script as `__main__`. The first --skip-updates calls (compilation, their actor's first call) are left out;
the steps between the remaining stamps of the short and the long run, over their time, give one rate per
side and repeat. It leaves out start-up and compilation without a difference of two runs, so the
machine's drift between runs minutes apart does not enter it.

Their scripts run as they are, from their checkout, with what they need here supplied from outside:
`cleanrl_utils.buffers.ReplayBuffer` (theirs imports torch) by a numpy stand-in with the same add/sample
interface, `torch.utils.tensorboard.SummaryWriter` by tensorboardX's when torch is not installed, and
their command-line flags `--no-track --no-save-model`. Their `CUDA_VISIBLE_DEVICES` line is harmless on
a CPU. Settings: both at their defaults except the env, the seed, the run length and learning-starts.

With --flops (default) the table also gives the FLOPs per env step of each side, from XLA's
cost_analysis() of the compiled programs: ours the update as benchmarks/throughput.py costs it (the
critic step plus the actor step on one update in --policy-delay, since XLA costs a lax.cond as its
dearer branch) and one exploration action; theirs every top-level jitted call of a run of
--learning-starts + --flops-steps steps (their actor update is its own jitted function, called every
third step), costed the same way by a recorder that wraps jax.jit around their script from outside.
Equal FLOPs and unequal speed means overhead, not arithmetic.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (ours, theirs relative to the checkout)
PAIRS = {
    "sac_flow_g": ("sac_flow_g.py", "from_scratch_code/SAC_flow_gru_jax.py"),
    "sac_flow_t": ("sac_flow_t.py", "from_scratch_code/SAC_flow_transformer_jax.py"),
}
# the jitted function each side's training loop calls once per env step after learning starts
PER_STEP = {"ours": "update_seeds", "theirs": "update_critic"}

BUFFER_STAND_IN = '''"""A numpy stand-in for cleanrl_utils.buffers.ReplayBuffer (theirs imports torch), written by
benchmarks/versus_authors.py: the same add/sample interface, uniform sampling of the stored transitions."""
from typing import NamedTuple

import numpy as np


class _Array(np.ndarray):
    def numpy(self):
        return np.asarray(self)


class ReplayBufferSamples(NamedTuple):
    observations: _Array
    actions: _Array
    next_observations: _Array
    dones: _Array
    rewards: _Array


class ReplayBuffer:
    def __init__(self, buffer_size, observation_space, action_space, device="cpu", n_envs=1,
                 optimize_memory_usage=False, handle_timeout_termination=True):
        obs_shape, act_dim = observation_space.shape, int(np.prod(action_space.shape))
        self.size, self.pos, self.full = buffer_size, 0, False
        self.observations = np.zeros((buffer_size, *obs_shape), np.float32)
        self.next_observations = np.zeros((buffer_size, *obs_shape), np.float32)
        self.actions = np.zeros((buffer_size, act_dim), np.float32)
        self.rewards = np.zeros((buffer_size, 1), np.float32)
        self.dones = np.zeros((buffer_size, 1), np.float32)

    def add(self, obs, next_obs, action, reward, done, infos):
        i = self.pos
        self.observations[i] = np.asarray(obs).reshape(self.observations.shape[1:])
        self.next_observations[i] = np.asarray(next_obs).reshape(self.observations.shape[1:])
        self.actions[i] = np.asarray(action).reshape(-1)
        self.rewards[i] = np.asarray(reward).reshape(-1)[0]
        self.dones[i] = np.asarray(done).reshape(-1)[0]
        self.pos = (self.pos + 1) % self.size
        self.full = self.full or self.pos == 0

    def sample(self, batch_size, env=None):
        idx = np.random.randint(0, self.size if self.full else self.pos, size=batch_size)
        view = lambda x: x[idx].view(_Array)
        return ReplayBufferSamples(view(self.observations), view(self.actions), view(self.next_observations),
                                   view(self.dones), view(self.rewards))
'''


# Run as `python record_flops.py SCRIPT ARGS...`: SCRIPT as __main__ with jax.jit wrapped so that every
# top-level call of a jitted function is counted and its compiled program costed once (XLA's
# cost_analysis); calls traced inside another jitted function are left to that one's cost.
FLOPS_RECORDER = '''import atexit, json, os, runpy, sys

import jax

records, _jit = {}, jax.jit


def _flops(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def jit(fun=None, **kw):
    if fun is None:
        return lambda f: jit(f, **kw)
    jitted, name = _jit(fun, **kw), getattr(fun, "__name__", repr(fun))

    class Recorded:
        def __call__(self, *a, **k):
            if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((a, k))):
                return jitted(*a, **k)
            r = records.setdefault(name, {"calls": 0, "flops": None})
            if r["flops"] is None:
                r["flops"] = _flops(jitted.lower(*a, **k).compile())
            r["calls"] += 1
            return jitted(*a, **k)

        def __getattr__(self, attr):
            return getattr(jitted, attr)

    return Recorded()


jax.jit = jit
atexit.register(lambda: json.dump(records, open(os.environ["FLOPS_OUT"], "w")))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


# Run as `python record_stamps.py SCRIPT ARGS...` with STAMP_FUNCTION and STAMPS_OUT set: SCRIPT as __main__
# (its folder first on sys.path, as `python SCRIPT` has it) with jax.jit wrapped so that every top-level call
# of the jitted function named STAMP_FUNCTION appends time.perf_counter() (calls traced inside another jitted
# function are not stamped); the stamps go to STAMPS_OUT at exit. Other functions are jitted as before.
STAMPS_RECORDER = '''import atexit, json, os, runpy, sys, time

import jax

stamps, wanted, _jit = [], os.environ["STAMP_FUNCTION"], jax.jit


def jit(fun=None, **kw):
    if fun is None:
        return lambda f: jit(f, **kw)
    jitted = _jit(fun, **kw)
    if getattr(fun, "__name__", None) != wanted:
        return jitted

    class Stamped:
        def __call__(self, *a, **k):
            if not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((a, k))):
                stamps.append(time.perf_counter())
            return jitted(*a, **k)

        def __getattr__(self, attr):
            return getattr(jitted, attr)

    return Stamped()


jax.jit = jit
atexit.register(lambda: json.dump(stamps, open(os.environ["STAMPS_OUT"], "w")))
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@dataclass
class Args:
    authors: str = ""
    """a checkout of github.com/Elessar123/SAC-FLOW (required; nothing in it is changed)"""
    scripts: list[str] = field(default_factory=lambda: ["sac_flow_g", "sac_flow_t"])
    """which pairs: sac_flow_g (their SAC_flow_gru_jax.py), sac_flow_t (their SAC_flow_transformer_jax.py)"""
    env_ids: list[str] = field(default_factory=lambda: ["Hopper-v4", "Humanoid-v4"])
    """tasks"""
    learning_starts: int = 1000
    """random steps before the first update, both scripts"""
    short: int = 1200
    """total steps of the short run"""
    long: int = 1500
    """total steps of the long run"""
    repeats: int = 2
    """interleaved repeats of the four runs"""
    skip_updates: int = 20
    """per-step calls at the start of each run left out of the within-run rate (compilation, first calls)"""
    seed: int = 1
    """seed of every run"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "versus_authors")
    """{out}.json gathers every run (this one is added to it, tagged with the machine, the commit and the date);
    {out}.md: every timed run's repeats pooled per row, then this run's table"""
    target: float = 1.25
    """the ours / authors' ratio the pooled repeats are counted against"""
    pool_only: bool = False
    """measure nothing: pool the runs already in {out}.json and rewrite {out}.md"""
    timing: bool = True
    """time the runs (--no-timing with --flops: only the FLOPs, which a busy machine does not change)"""
    flops: bool = True
    """also FLOPs per env step of both (XLA's cost_analysis of the compiled programs), to tell arithmetic from overhead"""
    flops_steps: int = 30
    """with --flops, their script runs --learning-starts + this many steps to count its jitted calls (a multiple of
    their policy delay, 3, so that the actor's share is exact)"""


def write_stand_ins(folder: str) -> dict:
    """The modules their scripts import that cannot or need not run here; returns the environment to run them in."""
    os.makedirs(os.path.join(folder, "cleanrl_utils"), exist_ok=True)
    open(os.path.join(folder, "cleanrl_utils", "__init__.py"), "w").close()
    with open(os.path.join(folder, "cleanrl_utils", "buffers.py"), "w") as f:
        f.write(BUFFER_STAND_IN)
    try:
        import torch  # noqa: F401
    except ImportError:  # their scripts import only torch's SummaryWriter: tensorboardX's is the same class
        tb = os.path.join(folder, "torch", "utils", "tensorboard")
        os.makedirs(tb, exist_ok=True)
        with open(os.path.join(folder, "torch", "__init__.py"), "w") as f:
            # Libraries that find a `torch` module test values against torch.Tensor (tensorboardX) and argument
            # types against torch.device (tyro): classes nothing is an instance or a subclass of.
            f.write("class Tensor:\n    pass\n\n\nclass device:\n    pass\n")
        open(os.path.join(folder, "torch", "utils", "__init__.py"), "w").close()
        with open(os.path.join(tb, "__init__.py"), "w") as f:
            f.write("from tensorboardX import SummaryWriter  # noqa: F401\n")
    return dict(os.environ, PYTHONPATH=folder, PYTHONWARNINGS="ignore", MUJOCO_GL="egl")


def command(side: str, script: str, args: Args, env_id: str, steps: int) -> list[str]:
    ours, theirs = PAIRS[script]
    common = ["--env-id", env_id, "--seed", str(args.seed), "--total-timesteps", str(steps),
              "--learning-starts", str(args.learning_starts)]
    if side == "ours":
        return [sys.executable, os.path.join(ROOT, ours), *common, "--eval-episodes", "0", "--checkpoint-every", "0",
                "--no-progress"]
    return [sys.executable, os.path.join(args.authors, theirs), *common, "--no-track", "--no-save-model"]


def timed(cmd: list[str], env: dict, cwd: str, per_step: str) -> tuple[float, list[float]]:
    """Seconds of the run of `cmd` (a script and its flags) under the stamps recorder, and the timestamps of its
    top-level calls of the jitted function named `per_step`."""
    out = os.path.join(cwd, "stamps.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [cmd[0], os.path.join(env["PYTHONPATH"], "record_stamps.py"), *cmd[1:]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=dict(env, STAMP_FUNCTION=per_step, STAMPS_OUT=out), capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[2:4])}... exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    with open(out) as f:
        return elapsed, json.load(f)


def within_rate(runs: list[list[float]], skip: int) -> float:
    """Env steps/s within runs: the steps between each run's per-step stamps after the first `skip`, over their
    time, pooled over the runs (nan if no run has two stamps left)."""
    kept = [stamps[skip:] for stamps in runs if len(stamps) - skip >= 2]
    steps, seconds = sum(len(s) - 1 for s in kept), sum(s[-1] - s[0] for s in kept)
    return steps / seconds if seconds > 0 else float("nan")


def their_flops(script: str, args: Args, env_id: str, env: dict, work: str) -> tuple[float, dict]:
    """Their FLOPs per env step after learning starts: every top-level jitted call of a short run, each
    costed by XLA, summed and divided by the learning steps; also {function: {"calls", "flops"}}."""
    out = os.path.join(work, f"flops_{script}_{env_id}.json")
    steps = args.learning_starts + args.flops_steps
    cmd = command("theirs", script, args, env_id, steps)
    cmd.insert(1, os.path.join(env["PYTHONPATH"], "record_flops.py"))
    proc = subprocess.run(cmd, cwd=work, env=dict(env, FLOPS_OUT=out), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: their {script} under the FLOPs recorder exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    with open(out) as f:
        records = json.load(f)
    # per learning step: their loop calls update_critic once per env step after learning starts
    updates = records.get("update_critic", {}).get("calls") or args.flops_steps
    return sum(r["flops"] * r["calls"] for r in records.values()) / updates, records


def our_flops(script: str, env_id: str) -> tuple[float, dict]:
    """Our FLOPs per env step: the update as throughput.py costs it (critic step, plus the actor step on one
    update in --policy-delay) and one exploration action; also the parts."""
    import importlib

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import throughput

    module = importlib.import_module(script)
    update = throughput.measure_update(module, env_id, steps=1, profile=False)
    args = module.Args(env_id=env_id)
    obs_dim, act_dim = update["obs_dim"], update["act_dim"]
    agent = module.create_agent(args, obs_dim, act_dim, jax.random.PRNGKey(0))
    one_seed = lambda tree: jax.tree_util.tree_map(lambda x: x[None], tree)
    act_explore = module.make_act(args, act_dim, 1)[1]
    act = act_explore.lower(one_seed(agent.actor.variables), jnp.zeros((1, obs_dim)), one_seed(jax.random.PRNGKey(0))).compile()
    parts = {"critic_step": update["gflop_critic_step"] * 1e9, "critic_and_actor_step": update["gflop_critic_and_actor_step"] * 1e9,
             "act": throughput._flops(act)}
    return update["gflop_per_env_step"] * 1e9 + parts["act"], parts


def time_pair(script: str, args: Args, env_id: str, env: dict, work: str) -> dict:
    """Env steps/s of both sides per repeat, the four runs interleaved: the marginal rate ("ours", "theirs",
    "ratio") and the rate within the runs ("ours_within", "theirs_within", "ratio_within")."""
    rates = {"ours": [], "theirs": [], "ours_within": [], "theirs_within": []}
    for r in range(args.repeats):
        order = [("ours", args.short), ("theirs", args.short), ("ours", args.long), ("theirs", args.long)]
        times, stamps = {}, {}
        for side, steps in (order if r % 2 == 0 else order[::-1]):
            times[(side, steps)], stamps[(side, steps)] = timed(command(side, script, args, env_id, steps), env, work,
                                                                PER_STEP[side])
            print(f"{env_id} {script} {side} {steps} steps: {times[(side, steps)]:.1f} s, "
                  f"{len(stamps[(side, steps)])} {PER_STEP[side]} calls", flush=True)
        for side in ("ours", "theirs"):
            rates[side].append((args.long - args.short) / (times[(side, args.long)] - times[(side, args.short)]))
            rates[side + "_within"].append(within_rate([stamps[(side, args.short)], stamps[(side, args.long)]],
                                                       args.skip_updates))
    ratio = lambda key: [o / t for o, t in zip(rates["ours" + key], rates["theirs" + key])]
    return {**rates, "ratio": ratio(""), "ratio_within": ratio("_within")}


def command_flags(args, local_paths: dict, hidden: tuple = ()) -> str:
    """The flags of a run that differ from their defaults, as typed, for the "Command:" line of a table: a path of
    this machine by the name in `local_paths` ({"authors": "<checkout>"}), --out relative to the repository,
    the fields in `hidden` left out."""
    flags = ""
    for name, default in vars(type(args)()).items():
        value = getattr(args, name)
        if value == default or name in hidden:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags += f" {flag if value else '--no-' + flag[2:]}"
        elif name in local_paths:
            flags += f" {flag} {local_paths[name]}"
        elif name == "out":
            flags += f" {flag} {os.path.relpath(value, ROOT) if os.path.isabs(value) else value}"
        else:
            flags += f" {flag} " + (" ".join(map(str, value)) if isinstance(value, list) else str(value))
    return flags


def table(rows: list[dict], args: Args, machine: str) -> list[str]:
    """The markdown of the rows: speeds (median, min to max) where timed, FLOPs where costed."""
    cell = lambda xs: f"{statistics.median(xs):.2f} ({min(xs):.2f} to {max(xs):.2f})" if xs else "-"
    gflop = lambda r, side: f"{r[side + '_gflop']:.2f}" if side + "_gflop" in r else "-"
    what = (f"Env steps/s after learning starts, {args.repeats} interleaved repeats, median (min to max): marginal, "
            f"from runs of {args.short} and {args.long} steps with --learning-starts {args.learning_starts}; within, "
            f"between the per-step update calls of the same runs after the first {args.skip_updates}" if args.timing else
            "No speeds (--no-timing)")
    flops = (f"; GFLOP per env step from XLA's cost_analysis() (theirs over --learning-starts {args.learning_starts} + "
             f"{args.flops_steps} steps)" if args.flops else "")
    return [f"{what}{flops}: ours against the authors' scripts at their defaults. Machine: {machine}; "
            f"{time.strftime('%Y-%m-%d')}. Command: python benchmarks/versus_authors.py"
            f"{command_flags(args, {'authors': '<checkout>'})}", "",
            "| task | script | ours, marginal | authors', marginal | ours / authors' | ours, within | authors', within "
            "| ours / authors', within | GFLOP per env step, ours | authors' |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *[f"| {r['env_id']} | {r['script']} | {cell(r.get('ours', []))} | {cell(r.get('theirs', []))} | "
              f"{cell(r.get('ratio', []))} | {cell(r.get('ours_within', []))} | {cell(r.get('theirs_within', []))} | "
              f"{cell(r.get('ratio_within', []))} | {gflop(r, 'ours')} | {gflop(r, 'theirs')} |" for r in rows]]


def check(args: Args) -> None:
    if not args.target > 0:
        raise SystemExit(f"error: --target must be positive, got {args.target}")
    try:  # before an hour of measuring: the file the run will join must be a file of runs
        previous = read_runs(args.out + ".json")
    except ValueError as e:
        raise SystemExit(f"error: --out: {e}") from None
    if args.pool_only:
        if not pooled_runs(previous):
            raise SystemExit(f"error: --pool-only: {args.out}.json holds no timed run")
        return
    if not args.authors:
        raise SystemExit("error: --authors is required: a checkout of https://github.com/Elessar123/SAC-FLOW")
    for script in args.scripts:
        if script not in PAIRS:
            raise SystemExit(f"error: unknown script {script!r}; choose from {', '.join(PAIRS)}")
        path = os.path.join(args.authors, PAIRS[script][1])
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} does not exist: --authors must be a checkout of Elessar123/SAC-FLOW")
    if not 0 <= args.learning_starts < args.short < args.long:
        raise SystemExit(f"error: need 0 <= --learning-starts < --short < --long, got {args.learning_starts}, "
                         f"{args.short}, {args.long}")
    if not (args.timing or args.flops):
        raise SystemExit("error: --no-timing --no-flops measures nothing")
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats must be at least 1, got {args.repeats}")
    if not 0 <= args.skip_updates <= args.short - args.learning_starts - 2:
        raise SystemExit(f"error: --skip-updates must be in [0, --short - --learning-starts - 2] = "
                         f"[0, {args.short - args.learning_starts - 2}], got {args.skip_updates}")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU as /proc/cpuinfo names it, with its family, model and widest vector ISA ('' where unreadable):
    the same cloud name covers CPUs that differ twofold in matmul speed."""
    try:
        with open(cpuinfo) as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return ""
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if "flags" not in fields and "Features" in fields:  # Arm: no model name; the implementer and part codes instead
        features = set(fields["Features"].split())
        isa = next((name for flag, name in [("sve2", "SVE2"), ("sve", "SVE"), ("asimd", "NEON")] if flag in features),
                   "no NEON")
        name = fields.get("model name") or (f"Arm CPU, implementer {fields.get('CPU implementer', '?')} "
                                            f"part {fields.get('CPU part', '?')}")
        return f"{name}, {isa}"
    flags = set(fields.get("flags", "").split())
    isa = next((name for flag, name in [("amx_tile", "AVX-512, AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2")]
                if flag in flags), "no AVX2")
    family = f", family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields and "model" in fields else ""
    return f"{fields.get('model name', 'unknown CPU')}{family}, {isa}"


MACHINE = f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_model() or platform.processor() or 'cpu'}), no GPU"


def commit() -> str:
    """The commit measured, "+ changes" when the working tree differs from it ("" outside a git checkout)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        return ""
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True)
    return head.stdout.strip() + (" + changes" if dirty.stdout.strip() else "")


def read_runs(path: str) -> list[dict]:
    """The runs gathered in `path` ([] when it does not exist yet); ValueError naming it when it is not such a file."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            runs = json.load(f)["runs"]
        for run in runs:
            str(run["machine"])
            for r in run["rows"]:
                str(r["env_id"]), [float(x) for x in r.get("ratio", []) + r.get("ratio_within", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a file of runs of this benchmark ({type(e).__name__}: {e})") from None
    return runs


def pooled_runs(runs: list[dict]) -> list[dict]:
    """The runs with timings (a FLOPs-only run has no ratios)."""
    return [run for run in runs if any(r.get("ratio") for r in run["rows"])]


def pool(runs: list[dict], target: float) -> list[dict]:
    """Per (task, script), in order of first appearance: each kind of ratio's repeats pooled over the runs. One run
    gives two or three repeats per row, and a shared machine's speed moves by about as much within the hour as a
    row clears the target by; each repeat is one interleaved comparison of the same code, so all are pooled."""
    pooled = {}
    for run in pooled_runs(runs):
        for row in run["rows"]:
            if not row.get("ratio"):
                continue
            entry = pooled.setdefault((row["env_id"], row["script"]), {"ratio": [], "ratio_within": [], "runs": 0})
            entry["runs"] += 1
            for kind in ("ratio", "ratio_within"):
                entry[kind] += row.get(kind) or []
    out = []
    for (env_id, script), entry in pooled.items():
        row = {"env_id": env_id, "script": script, "runs": entry["runs"]}
        for kind in ("ratio", "ratio_within"):
            values = np.array(entry[kind], dtype=float)
            row[kind] = None if values.size == 0 else {
                "n": int(values.size), "median": float(np.median(values)),
                "q1": float(np.percentile(values, 25)), "q3": float(np.percentile(values, 75)),
                "min": float(values.min()), "max": float(values.max()), "at_target": int(np.sum(values >= target))}
        out.append(row)
    return out


def pooled_table(runs: list[dict], target: float) -> list[str]:
    cell = lambda st: "-" if st is None else (f"{st['median']:.2f} ({st['q1']:.2f} to {st['q3']:.2f}; {st['min']:.2f} to "
                                              f"{st['max']:.2f}), {st['at_target']} of {st['n']}")
    timed = pooled_runs(runs)
    return [f"Ours / authors' env steps/s, every repeat of the {len(timed)} timed runs pooled per row: median (quartiles; min to max), and how many repeats reach {target}. Marginal: the difference of a "
            "short and a long run; within: between the per-step update calls of each run (the runs that time it).", "",
            "| task | script | runs | ours / authors', marginal | ours / authors', within |", "|---|---|---|---|---|",
            *[f"| {r['env_id']} | {r['script']} | {r['runs']} | {cell(r['ratio'])} | {cell(r['ratio_within'])} |"
              for r in pool(runs, target)],
            "", *run_list(runs)]


def run_list(runs: list[dict]) -> list[str]:
    timed = lambda run: any("ours" in r for r in run["rows"])
    return ["The runs (machine; commit measured, or the commit that added the result where it was not recorded):", "",
            *[f"- {run.get('name') or run.get('date', '')}: {run['machine'] or 'machine not recorded'}; "
              f"{run.get('commit') or 'added in ' + run.get('committed_in', '?')}" + ("" if timed(run) else " (FLOPs only)")
              for run in runs]]


def write_results(args, rows: list[dict], lines: list[str], title: str = "Ours against the authors' SAC Flow scripts") -> None:
    """Add this run (its rows and its table, `lines`) to {args.out}.json and write {args.out}.md: where runs have
    ours / authors' ratios per script, their repeats pooled and the latest run's table; otherwise every run's table."""
    runs = read_runs(args.out + ".json")
    if rows:
        runs.append({"name": f"{time.strftime('%Y-%m-%d %H:%M')}", "machine": MACHINE, "commit": commit(),
                     "date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows, "table": lines})
    if pooled_runs(runs):
        text = pooled_table(runs, args.target) + ["", "## The latest run", "", *runs[-1].get("table", [])]
    else:
        text = run_list(runs) + [line for run in runs for line in ["", f"## {run.get('name') or run['date']}", "",
                                                                   *run.get("table", [])]]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json.tmp", "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    os.replace(args.out + ".json.tmp", args.out + ".json")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join([f"# {title}", "", *text]) + "\n")
    print("\n".join(text))


def main(argv=None) -> int:
    import tyro

    args = tyro.cli(Args, args=argv)
    check(args)
    if args.pool_only:
        write_results(args, [], [])
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as work:
        env = write_stand_ins(os.path.join(work, "stand_ins"))
        for name, recorder in (("record_flops.py", FLOPS_RECORDER), ("record_stamps.py", STAMPS_RECORDER)):
            with open(os.path.join(work, "stand_ins", name), "w") as f:
                f.write(recorder)
        for env_id in args.env_ids:
            for script in args.scripts:
                flops = {}
                if args.flops:
                    (ours, parts), (theirs, functions) = our_flops(script, env_id), their_flops(script, args, env_id, env, work)
                    flops = {"ours_gflop": ours / 1e9, "theirs_gflop": theirs / 1e9, "ours_parts": parts,
                             "theirs_jitted_calls": functions}
                    print(f"{env_id} {script}: GFLOP per env step ours {flops['ours_gflop']:.2f}, "
                          f"theirs {flops['theirs_gflop']:.2f}", flush=True)
                row = {"env_id": env_id, "script": script, **flops}
                if args.timing:
                    row.update(time_pair(script, args, env_id, env, work))
                    print(f"{env_id} {script}: ours {statistics.median(row['ours']):.2f}, theirs "
                          f"{statistics.median(row['theirs']):.2f} env steps/s, ratio {statistics.median(row['ratio']):.2f}; "
                          f"within the runs {statistics.median(row['ratio_within']):.2f}", flush=True)
                rows.append(row)
    write_results(args, rows, table(rows, args, MACHINE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
