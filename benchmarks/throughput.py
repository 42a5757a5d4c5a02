"""Throughput and memory of the three scripts at the authors' sizes, against the machine's matmul peak.

    python benchmarks/throughput.py                 # all scripts x Hopper, Ant, Humanoid, dog-run
    python benchmarks/throughput.py --quick         # all scripts on Hopper-v4, a few minutes on 2 cores
    python benchmarks/throughput.py --scripts flowrl_jax --env-ids Ant-v4

Each (script, task) is measured in a fresh process, at the script's default hyperparameters:
- update: compile time and gradient steps per second of the jitted update alone (buffer filled with
  random transitions), the median over chunks of calls so a noisy neighbour does not decide it;
- FLOPs per env step from XLA's cost_analysis() of the compiled update with the actor branch forced
  on and off (critic FLOPs + actor FLOPs / policy delay), and the share of the matmul peak reached;
- loop: env steps per second of the script's own training loop after learning_starts, from the
  steps and times of its `charts/SPS_window` events (the first window, which holds the compilation,
  left out);
- memory: the process's peak resident host memory (ru_maxrss; the 1M-transition buffer included),
  the device's peak bytes in use where the backend reports it (GPU, TPU), and XLA's own account of
  the compiled update (arguments + outputs + temporaries - aliased);
- where the update's time goes, from a jax.profiler trace: matmul kernels versus the rest.
Writes benchmarks/results/throughput_<platform>[_quick].json and .md, stamped with the device, the
CPU count and the package versions.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import importlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ALL_SCRIPTS = ["flowrl_jax", "sac_flow_g", "sac_flow_t"]
ALL_TASKS = ["Hopper-v4", "Ant-v4", "Humanoid-v4", "dm_control/dog-run-v0"]


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: list(ALL_SCRIPTS))
    """script modules to measure"""
    env_ids: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    """tasks (their observation and action sizes set the networks' shapes)"""
    update_steps: int = 60
    """timed calls of the update"""
    loop_steps: int = 600
    """env steps of the training loop timed after learning_starts (0 skips the loop)"""
    loop_learning_starts: int = 0
    """learning_starts of the timed loop (0: the script's default); the rate after it does not depend on it"""
    profile: bool = True
    """trace a few updates with jax.profiler and split their time into matmul kernels and the rest"""
    quick: bool = False
    """all scripts on Hopper-v4 with fewer timed steps and learning_starts 2000: under 5 minutes on 2 cores"""
    out: str = os.path.join(ROOT, "benchmarks", "results")
    """folder for the JSON and markdown results"""
    worker: str = ""
    """internal: measure one "script:env_id" in this process and print its JSON"""


# ---------------------------------------------------------------------------------------------
# Measurements (run inside a worker process, one per script and task)
# ---------------------------------------------------------------------------------------------


def matmul_peak_gflops(n: int = 1024, reps: int = 20) -> dict:
    """Best-of float32 matmul rate with numpy and with XLA on the default device."""
    import jax

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = min(_timed(lambda: a @ a) for _ in range(reps))
    x = jax.device_put(a)
    mm = jax.jit(lambda m: m @ m)
    mm(x).block_until_ready()
    best_jax = min(_timed(lambda: mm(x).block_until_ready()) for _ in range(reps))
    flops = 2 * n**3
    return {"numpy": flops / best / 1e9, "jax": flops / best_jax / 1e9}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def _xla_bytes(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


@contextlib.contextmanager
def forced_cond(take_true: bool):
    """Within the block, jax.lax.cond always takes one branch (for costing each branch alone)."""
    import jax

    original = jax.lax.cond
    jax.lax.cond = lambda pred, true_fn, false_fn, *operands: (true_fn if take_true else false_fn)(*operands)
    try:
        yield
    finally:
        jax.lax.cond = original


def alternate_cycles(updates: dict, agents: dict, buf, cycles: int, delay: int):
    """Time several compiled updates side by side: `cycles` + 1 policy-delay cycles of each (the first a
    warm-up), their order swapped every cycle; `agents` is updated in place. Returns (ms per update of
    each timed cycle, the last infos, the infos after the warm-up cycle)."""
    import jax

    infos, times, first = {}, {k: [] for k in updates}, {}
    for cycle in range(cycles + 1):
        for k in (list(updates) if cycle % 2 else list(updates)[::-1]):
            t = time.perf_counter()
            for _ in range(delay):
                agents[k], infos[k] = updates[k](agents[k], buf)
            jax.block_until_ready((agents[k], infos[k]))
            if cycle:
                times[k].append((time.perf_counter() - t) / delay * 1e3)
        if cycle == 0:
            first = dict(infos)
    return times, infos, first


def _policy_delay(args) -> int:
    return getattr(args, "policy_frequency", getattr(args, "policy_delay", 1))


def filled_buffer(args, obs_dim: int, act_dim: int, n: int):
    import jax

    from common.buffer import buffer_add, buffer_init

    buf = buffer_init(args.buffer_size, obs_dim, act_dim)
    add = jax.jit(buffer_add, donate_argnums=0)
    rng = np.random.default_rng(0)
    for _ in range(n):
        obs = rng.standard_normal(obs_dim).astype(np.float32)
        buf = add(buf, obs, rng.uniform(-1, 1, act_dim).astype(np.float32), np.float32(rng.standard_normal()),
                  obs, np.float32(0.0))
    return buf


def measure_update(module, env_id: str, steps: int, profile: bool) -> dict:
    import jax

    from common.env import make_env

    args = module.Args(env_id=env_id)
    env = make_env(env_id, 0)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    # One seed: the scripts' arrays carry a leading seed axis (--num-seeds), here of size 1.
    one_seed = lambda tree: jax.tree_util.tree_map(lambda x: x[None], tree)
    agent = one_seed(module.create_agent(args, obs_dim, act_dim, jax.random.PRNGKey(0)))
    buf = one_seed(filled_buffer(args, obs_dim, act_dim, max(args.batch_size, 4096)))
    update = module.make_update(args, act_dim)

    t = time.perf_counter()
    compiled = update.lower(agent, buf).compile()
    compile_s = time.perf_counter() - t
    xla_bytes = _xla_bytes(compiled)
    # XLA's cost of a lax.cond is not the cost of the branch taken, so cost the update twice with the
    # actor branch forced on and off; the actor runs on one of every `delay` updates.
    delay = _policy_delay(args)
    with forced_cond(True):
        with_actor = _flops(module.make_update(args, act_dim).lower(agent, buf).compile())
    with forced_cond(False):
        critics_only = _flops(module.make_update(args, act_dim).lower(agent, buf).compile())
    per_env_step = critics_only + (with_actor - critics_only) / delay

    for _ in range(2 * delay):  # warm up, actor branch included
        agent, info = update(agent, buf)
    jax.block_until_ready(agent)
    # chunks of whole policy-delay cycles; the median chunk is the rate
    chunk = delay * max(1, 6 // delay)
    rates = []
    for _ in range(max(1, steps // chunk)):
        t = time.perf_counter()
        for _ in range(chunk):
            agent, info = update(agent, buf)
        jax.block_until_ready((agent, info))
        rates.append(chunk / (time.perf_counter() - t))
    rate = float(np.median(rates))
    row = {"compile_s": compile_s, "grad_steps_per_s": rate, "grad_steps_per_s_spread": [min(rates), max(rates)],
           "gflop_critic_step": critics_only / 1e9, "gflop_critic_and_actor_step": with_actor / 1e9,
           "gflop_per_env_step": per_env_step / 1e9, "update_gflops": rate * per_env_step / 1e9,
           "batch_size": args.batch_size, "policy_delay": delay, "obs_dim": obs_dim, "act_dim": act_dim,
           "xla_update_memory_mb": xla_bytes / 2**20}
    if profile:
        row["profile"] = profile_update(update, agent, buf, 2 * delay)
    return row


MATMUL_KERNEL = re.compile(r"(^|[._])(dot|gemm|matmul|ynn|xnn|onednn|cublas|cutlass|convolution)", re.I)


RUNTIME_EVENTS = ("$", "ThunkExecutor", "PjitFunction", "SlinkyThreadPool", "CommonPjRt")


def traced_kernels(trace_dir: str, skip: tuple = RUNTIME_EVENTS) -> collections.Counter:
    """{kernel name: microseconds} of the complete events of the jax.profiler trace under trace_dir ({} if
    none), leaving out Python frames and runtime bookkeeping (names starting with `skip` or holding '::')."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    per_kernel = collections.Counter()
    if files:
        with gzip.open(files[0]) as f:
            for e in json.load(f)["traceEvents"]:
                name = e.get("name", "")
                if e.get("ph") == "X" and not name.startswith(skip) and "::" not in name:
                    per_kernel[name] += e["dur"]
    return per_kernel


def profile_update(update, agent, buf, steps: int) -> dict:
    """Share of the traced kernel time spent in matmul kernels (XLA CPU's ynn/dot, GPU gemms)."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(steps):
            agent, _ = update(agent, buf)
        jax.block_until_ready(agent)
        jax.profiler.stop_trace()
        per_kernel = traced_kernels(d)
    per_kind = collections.Counter()
    for name, us in per_kernel.items():
        per_kind["matmul" if MATMUL_KERNEL.search(name) else re.sub(r"[.\d]+$", "", name)] += us
    total = sum(per_kind.values())
    if not total:
        return {}
    top = [(k, round(v / steps / 1e3, 2)) for k, v in per_kind.most_common(6)]
    return {"kernel_ms_per_update": total / steps / 1e3, "matmul_share": per_kind["matmul"] / total, "top_kernels_ms": top}


def measure_loop(module, env_id: str, steps: int, learning_starts: int) -> dict:
    """The script's own train(), learning_starts + steps env steps; its SPS after learning starts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    starts = learning_starts or module.Args().learning_starts
    log_every = max(25, steps // 4)
    args = module.Args(env_id=env_id, total_timesteps=starts + steps, learning_starts=starts, eval_episodes=0,
                       log_every=log_every, progress=False)
    module.check_args(args)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                t = time.perf_counter()
                module.train(args)
                wall = time.perf_counter() - t
            acc = EventAccumulator(glob.glob(os.path.join(d, "runs", "*"))[0])
            acc.Reload()
            # rates from the events' own step and wall-time stamps (the logged SPS is rounded to an int)
            marks = [(e.step, e.wall_time) for e in acc.Scalars("charts/SPS_window") if e.step >= starts + log_every]
            window = [(s1 - s0) / (w1 - w0) for (s0, w0), (s1, w1) in zip(marks, marks[1:])]
        finally:
            os.chdir(cwd)
    flags = f"--env-id {env_id} --total-timesteps {starts + steps} --learning-starts {starts} --eval-episodes 0 --log-every {log_every}"
    return {"loop_env_steps_per_s": float(np.median(window)) if window else float("nan"),
            "loop_command": f"python {module.__name__}.py {flags}", "loop_wall_s": wall, "loop_learning_starts": starts}


def device_peak_mb() -> float:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return peak / 2**20 if peak is not None else float("nan")


def worker(spec: str, args: Args) -> dict:
    from common.run import keep_freed_memory

    keep_freed_memory()  # as the scripts' training runs do (the timed loop below is one)
    module_name, env_id = spec.split(":", 1)
    module = importlib.import_module(module_name)
    row = {"script": module_name, "env_id": env_id}
    row.update(measure_update(module, env_id, args.update_steps, args.profile))
    if args.loop_steps > 0:
        row.update(measure_loop(module, env_id, args.loop_steps, args.loop_learning_starts))
        row["loop_vs_update"] = row["loop_env_steps_per_s"] / row["grad_steps_per_s"]
    row["peak_host_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    row["peak_device_mb"] = device_peak_mb()
    return row


# ---------------------------------------------------------------------------------------------
# The driver: one worker process per (script, task), then the tables
# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    import jax

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "mujoco", "gymnasium", "dm_control"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    device = jax.devices()[0]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"platform": device.platform, "device": getattr(device, "device_kind", device.platform),
            "device_count": jax.device_count(), "cpu_count": cpus,
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "versions": versions, "date": time.strftime("%Y-%m-%d")}


def run_worker(spec: str, args: Args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec, "--update-steps", str(args.update_steps),
           "--loop-steps", str(args.loop_steps), "--loop-learning-starts", str(args.loop_learning_starts),
           "--profile" if args.profile else "--no-profile"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise SystemExit(f"error: measuring {spec} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def markdown(info: dict, peak: dict, rows: list[dict], quick: bool) -> str:
    best = max(peak.values())
    lines = [
        f"Machine: {info['device']} ({info['platform']}, {info['device_count']} device(s)), {info['cpu_count']} CPU cores "
        f"({info['processor']}), Python {info['python']}, " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + f"; measured {info['date']}.",
        f"Matmul peak (float32 1024x1024; the better of the two is the 100%): numpy {peak['numpy']:.0f} GFLOP/s, "
        f"XLA {peak['jax']:.0f} GFLOP/s.",
        "",
        "| script | task | compile s | update steps/s | GFLOP/env step | % of matmul peak | matmul share of kernel time "
        "| loop env steps/s | loop / update | peak host MiB | XLA update MiB | peak device MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r.get("profile", {}).get("matmul_share")
        lines.append(
            f"| {r['script']} | {r['env_id']} | {r['compile_s']:.1f} | {r['grad_steps_per_s']:.1f} | "
            f"{r['gflop_per_env_step']:.2f} | {100 * r['update_gflops'] / best:.0f}% | "
            f"{fmt(None if share is None else 100 * share, '.0f')}{'%' if share is not None else ''} | "
            f"{fmt(r.get('loop_env_steps_per_s'), '.1f')} | {fmt(r.get('loop_vs_update'), '.2f')} | "
            f"{r['peak_host_rss_mb']:.0f} | {r['xla_update_memory_mb']:.0f} | {fmt(r['peak_device_mb'], '.0f')} |")
    lines += ["", "update steps/s: median over chunks of calls of the compiled update alone. GFLOP/env step: XLA's "
              "cost_analysis(), critic step + actor step / policy delay. loop: the script's training loop after "
              "learning_starts, one env step and one update per step"
              + (" (learning_starts 2000 in --quick)" if quick else "") + ". peak host: the measuring process's maximum "
              "resident memory, replay buffer included. XLA update: arguments + outputs + temporaries of the compiled "
              "update. peak device: the accelerator's peak bytes in use ('-' where the backend does not report it)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    import tyro

    args = tyro.cli(Args)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    for s in args.scripts:
        if s not in ALL_SCRIPTS:
            raise SystemExit(f"error: unknown script {s!r}; choose from {', '.join(ALL_SCRIPTS)}")
    from common.env import ConfigError, check_env_id

    for env_id in args.env_ids:
        try:
            check_env_id(env_id)
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
    if args.quick:
        args.env_ids, args.update_steps, args.loop_steps = ["Hopper-v4"], 12, 150
        args.loop_learning_starts, args.profile = 2000, False
    info = machine()
    peak = matmul_peak_gflops()
    print(f"matmul peak: numpy {peak['numpy']:.0f}, XLA {peak['jax']:.0f} GFLOP/s", flush=True)
    rows = []
    for module_name in args.scripts:
        for env_id in args.env_ids:
            t = time.perf_counter()
            row = run_worker(f"{module_name}:{env_id}", args)
            row["share_of_matmul_peak"] = row["update_gflops"] / max(peak.values())
            rows.append(row)
            print(f"{module_name} {env_id}: {row['grad_steps_per_s']:.1f} update steps/s, "
                  f"{100 * row['share_of_matmul_peak']:.0f}% of peak, loop {fmt(row.get('loop_env_steps_per_s'), '.1f')} "
                  f"env steps/s, peak host {row['peak_host_rss_mb']:.0f} MiB ({time.perf_counter() - t:.0f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"throughput_{info['platform']}{'_quick' if args.quick else ''}")
    with open(stem + ".json", "w") as f:
        json.dump({"machine": info, "matmul_peak_gflops": peak, "quick": args.quick, "rows": rows}, f, indent=2)
    table = markdown(info, peak, rows, args.quick)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table + f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
