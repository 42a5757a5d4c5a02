"""Throughput and memory of the three scripts at the authors' sizes, against the machine's matmul peak.

    python benchmarks/throughput.py                 # all scripts x Hopper, Ant, Humanoid, dog-run
    python benchmarks/throughput.py --quick         # all scripts on Hopper-v4, a few minutes on 2 cores
    python benchmarks/throughput.py --scripts flowrl_jax --env-ids Ant-v4
    python benchmarks/throughput.py --num-seeds 1 2 4 8 --env-ids Hopper-v4 --sizes small --repeats 3   # many seeds

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
With --num-seeds S1 S2 ..., each (script, task) is measured for every seed count in its own process (the
update of all seeds in one call, the loop's rate per seed; `vs 1 seed` is the total against one seed's, i.e.
against running the seeds one after another), with --repeats interleaved runs of each, the median counting.
--sizes small sets every hidden width and the batch to 64, where dispatch rather than arithmetic bounds a step.
Writes benchmarks/results/throughput_<platform>[_quick][_small].json and .md, stamped with the device, the
CPU count and the package versions.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import importlib
import importlib.metadata
import inspect
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ALL_SCRIPTS = ["flowrl_jax", "sac_flow_g", "sac_flow_t"]
SMALL = {
    "flowrl_jax": {"hidden_dim": 64, "batch_size": 64},
    "sac_flow_g": {"hidden_dim": 64, "critic_width": 64, "log_std_hidden": 64, "batch_size": 64},
    "sac_flow_t": {"d_model": 64, "critic_width": 64, "log_std_hidden": 64, "batch_size": 64},
}
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
    num_seeds: list[int] = field(default_factory=lambda: [1])
    """seed counts (--num-seeds of the scripts), each measured in its own process"""
    sizes: str = "authors"
    """authors: the scripts' defaults; small: every hidden width and the batch 64"""
    repeats: int = 1
    """runs of each (script, task, seed count), interleaved; the median loop rate counts"""
    out: str = os.path.join(ROOT, "benchmarks", "results")
    """folder for the JSON and markdown results"""
    worker: str = ""
    """internal: measure one "script:env_id:num_seeds" in this process and print its JSON"""


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
    return getattr(args, "policy_delay", 1)


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


def seed_stacked(args, module, obs_dim: int, act_dim: int, num_seeds: int):
    """The agent and a filled buffer with a leading axis of `num_seeds` seeds, placed as a training run places
    them (sharded along that axis), so the update compiles to the program train() runs."""
    import jax
    import jax.numpy as jnp

    from common.seeds import seed_map, seed_sharding

    sharding, _ = seed_sharding(num_seeds)
    keys = jnp.stack([jax.random.PRNGKey(seed) for seed in range(num_seeds)])
    make = seed_map(lambda k: module.create_agent(args, obs_dim, act_dim, k), num_seeds)
    agent = jax.jit(make, out_shardings=sharding)(keys)
    one = filled_buffer(args, obs_dim, act_dim, max(args.batch_size, 4096))
    buf = jax.jit(lambda b: jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_seeds,) + x.shape), b),
                  out_shardings=sharding)(one)
    del one
    return agent, buf, sharding


def train_update_maker(module, env_id: str, sharding):
    """make_update(args, act_dim) as the script's train() calls it: its sharding, and the env's action scale where
    the script takes one (the SAC Flow scripts' units_scale), so that the update timed is the program trained with."""
    from common.env import action_scale

    if "units_scale" in inspect.signature(module.make_update).parameters:
        return lambda args, act_dim: module.make_update(args, act_dim, sharding, action_scale(env_id))
    return lambda args, act_dim: module.make_update(args, act_dim, sharding)


def measure_update(module, env_id: str, steps: int, profile: bool, num_seeds: int = 1, overrides: dict | None = None,
                   flops: bool = True, keep_trace: str | None = None) -> dict:
    """The jitted update alone on a buffer of random transitions, for `num_seeds` seeds at once (each row's
    rate is updates per second of every seed together, i.e. each seed's env steps per second were the
    loop nothing but its update); `overrides` replace hyperparameters (e.g. smaller networks); `keep_trace`: see
    profile_update."""
    import jax

    from common.env import make_env

    args = module.Args(env_id=env_id, num_seeds=num_seeds, **(overrides or {}))
    env = make_env(env_id, 0)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    agent, buf, sharding = seed_stacked(args, module, obs_dim, act_dim, num_seeds)
    make_update = train_update_maker(module, env_id, sharding)
    update = make_update(args, act_dim)

    t = time.perf_counter()
    compiled = update.lower(agent, buf).compile()
    compile_s = time.perf_counter() - t
    xla_bytes = _xla_bytes(compiled)
    delay = _policy_delay(args)
    row = {}
    if flops:
        # XLA's cost of a lax.cond is not the cost of the branch taken, so cost the update twice with the
        # actor branch forced on and off; the actor runs on one of every `delay` updates.
        with forced_cond(True):
            with_actor = _flops(make_update(args, act_dim).lower(agent, buf).compile())
        with forced_cond(False):
            critics_only = _flops(make_update(args, act_dim).lower(agent, buf).compile())
        per_env_step = critics_only + (with_actor - critics_only) / delay
        row.update(gflop_critic_step=critics_only / 1e9, gflop_critic_and_actor_step=with_actor / 1e9,
                   gflop_per_env_step=per_env_step / 1e9)

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
    row.update({"compile_s": compile_s, "grad_steps_per_s": rate, "grad_steps_per_s_spread": [min(rates), max(rates)],
                "batch_size": args.batch_size, "policy_delay": delay, "obs_dim": obs_dim, "act_dim": act_dim,
                "num_seeds": num_seeds, "xla_update_memory_mb": xla_bytes / 2**20})
    if flops:
        row["update_gflops"] = rate * num_seeds * row["gflop_per_env_step"]
    if profile:
        try:
            row["profile"] = profile_update(update, agent, buf, 2 * delay, keep_trace)
        except Exception as e:  # a trace format not met before must not cost the rates measured above
            row["profile"] = {"error": f"{type(e).__name__}: {e}"}
    return row


MATMUL_KERNEL = re.compile(r"(^|[._])(dot|gemm|matmul|ynn|xnn|onednn|cublas|cutlass|nvjet|xmma|convolution)", re.I)


RUNTIME_EVENTS = ("$", "ThunkExecutor", "PjitFunction", "SlinkyThreadPool", "CommonPjRt")


def traced_kernels(trace_dir: str, skip: tuple = RUNTIME_EVENTS) -> collections.Counter:
    """{kernel name: microseconds} of the complete events of the jax.profiler trace under trace_dir ({} if
    none), leaving out Python frames and runtime bookkeeping (names starting with `skip` or holding '::')."""
    return host_kernels(trace_events(trace_dir), skip)


def host_kernels(events: list[dict], skip: tuple = RUNTIME_EVENTS) -> collections.Counter:
    """traced_kernels of a trace already read."""
    per_kernel = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(skip) and "::" not in name:
            per_kernel[name] += e["dur"]
    return per_kernel


def trace_events(trace_dir: str) -> list[dict]:
    """The events of the jax.profiler trace under trace_dir ([] if none)."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return []
    with gzip.open(files[0]) as f:
        return json.load(f)["traceEvents"]


def device_kernels(events: list[dict]) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of what ran on a GPU: the complete events of the trace's /device:GPU
    processes, from their stream threads where it names them (its other threads, such as "XLA Ops", repeat
    the same time per operation). [] on a CPU, whose trace has no such process."""
    meta = [e for e in events if e.get("ph") == "M"]
    gpus = {e.get("pid") for e in meta if e.get("name") == "process_name" and "GPU" in e.get("args", {}).get("name", "")}
    streams = {(e.get("pid"), e.get("tid")) for e in meta if e.get("name") == "thread_name" and e.get("pid") in gpus
               and "Stream" in e.get("args", {}).get("name", "")}
    on_gpu = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpus
              and (not streams or (e.get("pid"), e.get("tid")) in streams)]
    return [(e.get("name", ""), float(e["ts"]), float(e.get("dur", 0.0))) for e in on_gpu]


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, duration) intervals: time the device did something."""
    total, end = 0.0, float("-inf")
    for start, dur in sorted(intervals):
        if start + dur > end:
            total += start + dur - max(start, end)
            end = start + dur
    return total


def profile_update(update, agent, buf, steps: int, keep_trace: str | None = None) -> dict:
    """Where an update's time goes, from a jax.profiler trace of `steps` calls: the share of kernel time in
    matmul kernels (XLA CPU's ynn/dot, GPU gemms) and the largest kinds; on a GPU also its kernels' busy time,
    the host-device copies in it and the kernel launches per update (the rest of a call's wall time is the
    host's: dispatch and launch gaps)."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(steps):
            agent, _ = update(agent, buf)
        jax.block_until_ready(agent)
        jax.profiler.stop_trace()
        events = trace_events(d)
        if keep_trace:
            files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
            if files:
                shutil.copyfile(files[0], keep_trace)
    gpu = device_kernels(events)
    per_kernel = host_kernels(events) if not gpu else collections.Counter()
    for name, _, dur in gpu:
        per_kernel[name] += dur
    per_kind = collections.Counter()
    for name, us in per_kernel.items():
        per_kind["matmul" if MATMUL_KERNEL.search(name) else re.sub(r"[.\d]+$", "", name)] += us
    total = sum(per_kind.values())
    if not total:
        return {}
    top = [(k, round(v / steps / 1e3, 3)) for k, v in per_kind.most_common(8)]
    out = {"kernel_ms_per_update": total / steps / 1e3, "matmul_share": per_kind["matmul"] / total, "top_kernels_ms": top}
    if gpu:
        copies = [(t, dur) for name, t, dur in gpu if "memcpy" in name.lower() or "memset" in name.lower()]
        out.update(device="gpu", busy_ms_per_update=busy_us([(t, dur) for _, t, dur in gpu]) / steps / 1e3,
                   copy_ms_per_update=busy_us(copies) / steps / 1e3, launches_per_update=len(gpu) / steps)
    return out


def measure_loop(module, env_id: str, steps: int, learning_starts: int, num_seeds: int = 1,
                 overrides: dict | None = None) -> dict:
    """The script's own train(), learning_starts + steps env steps; each seed's SPS after learning starts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = overrides or {}
    starts = learning_starts or module.Args().learning_starts
    log_every = max(25, steps // 4)
    args = module.Args(env_id=env_id, total_timesteps=starts + steps, learning_starts=starts, eval_episodes=0,
                       log_every=log_every, progress=False, num_seeds=num_seeds, checkpoint_every=0, **overrides)
    module.check_args(args)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                t = time.perf_counter()
                module.train(args)
                wall = time.perf_counter() - t
            # the first seed's log folder (a --num-seeds run logs each seed to {run}__s{seed}, all the same SPS)
            acc = EventAccumulator(os.path.dirname(sorted(glob.glob(os.path.join(d, "runs", "*", "events.out.tfevents.*")))[0]))
            acc.Reload()
            # rates from the events' own step and wall-time stamps (the logged SPS is rounded to an int)
            marks = [(e.step, e.wall_time) for e in acc.Scalars("charts/SPS_window") if e.step >= starts + log_every]
            window = [(s1 - s0) / (w1 - w0) for (s0, w0), (s1, w1) in zip(marks, marks[1:])]
        finally:
            os.chdir(cwd)
    flags = (f"--env-id {env_id} --total-timesteps {starts + steps} --learning-starts {starts} --eval-episodes 0 "
             f"--log-every {log_every}" + (f" --num-seeds {num_seeds}" if num_seeds > 1 else "")
             + "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items()))
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
    module_name, env_id, num_seeds = spec.split(":")
    module, num_seeds = importlib.import_module(module_name), int(num_seeds)
    overrides = SMALL[module_name] if args.sizes == "small" else {}
    row = {"script": module_name, "env_id": env_id, "size": args.sizes}
    # FLOPs per env step do not depend on the seed count: costed with one seed only
    row.update(measure_update(module, env_id, args.update_steps, args.profile, num_seeds, overrides, flops=num_seeds == 1))
    if args.loop_steps > 0:
        row.update(measure_loop(module, env_id, args.loop_steps, args.loop_learning_starts, num_seeds, overrides))
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
           "--profile" if args.profile else "--no-profile", "--sizes", args.sizes]
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
        "| script | task | seeds | compile s | update steps/s | GFLOP/env step | % of matmul peak | matmul share of kernel "
        "time | loop env steps/s per seed | loop / update | all seeds | vs 1 seed | runs (all seeds) | peak host MiB | XLA "
        "update MiB | peak device MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ones = {(r["script"], r["env_id"]): r for r in rows if r.get("num_seeds", 1) == 1}
    for r in rows:
        share, seeds = r.get("profile", {}).get("matmul_share"), r.get("num_seeds", 1)
        one, total = ones.get((r["script"], r["env_id"])), r.get("loop_env_steps_per_s", float("nan")) * seeds
        gflop = ones[(r["script"], r["env_id"])].get("gflop_per_env_step") if one else None
        lines.append(
            f"| {r['script']} | {r['env_id']} | {seeds} | {r['compile_s']:.1f} | {r['grad_steps_per_s']:.1f} | "
            f"{fmt(gflop, '.2f')} | {fmt(None if gflop is None else 100 * r['grad_steps_per_s'] * seeds * gflop / best, '.0f')}% | "
            f"{fmt(None if share is None else 100 * share, '.0f')}{'%' if share is not None else ''} | "
            f"{fmt(r.get('loop_env_steps_per_s'), '.1f')} | {fmt(r.get('loop_vs_update'), '.2f')} | {fmt(total, '.1f')} | "
            f"{fmt(None if not one or r is one else total / one['loop_env_steps_per_s'], '.2f')} | "
            f"{', '.join(f'{x:.1f}' for x in r.get('repeats', []))} | "
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
    if args.sizes not in ("authors", "small") or args.repeats < 1 or not args.num_seeds or min(args.num_seeds) < 1:
        raise SystemExit(f"error: need --sizes authors or small (got {args.sizes!r}), --repeats >= 1 (got {args.repeats}) "
                         f"and --num-seeds of positive counts (got {args.num_seeds})")
    if args.quick:
        args.env_ids, args.update_steps, args.loop_steps = ["Hopper-v4"], 12, 150
        args.loop_learning_starts, args.profile = 2000, False
    info = machine()
    peak = matmul_peak_gflops()
    print(f"matmul peak: numpy {peak['numpy']:.0f}, XLA {peak['jax']:.0f} GFLOP/s", flush=True)
    rows = []
    specs = [f"{m}:{e}:{s}" for m in args.scripts for e in args.env_ids for s in args.num_seeds]
    found = {spec: [] for spec in specs}
    for _ in range(args.repeats):  # interleaved, so that a slow spell of a shared machine hits every cell alike
        for spec in specs:
            t = time.perf_counter()
            row = run_worker(spec, args)
            found[spec].append(row)
            print(f"{spec}: {row['grad_steps_per_s']:.1f} update steps/s, loop {fmt(row.get('loop_env_steps_per_s'), '.1f')} "
                  f"env steps/s per seed, peak host {row['peak_host_rss_mb']:.0f} MiB ({time.perf_counter() - t:.0f} s)",
                  flush=True)
    for spec in specs:
        runs = sorted(found[spec], key=lambda r: r.get("loop_env_steps_per_s", r["grad_steps_per_s"]))
        row = runs[len(runs) // 2]
        row["repeats"] = [r.get("loop_env_steps_per_s", float("nan")) * r["num_seeds"] for r in found[spec]]
        if "update_gflops" in row:
            row["share_of_matmul_peak"] = row["update_gflops"] / max(peak.values())
        rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"throughput_{info['platform']}{'_quick' if args.quick else ''}"
                                  f"{'_small' if args.sizes == 'small' else ''}")
    with open(stem + ".json", "w") as f:
        json.dump({"machine": info, "matmul_peak_gflops": peak, "quick": args.quick, "rows": rows}, f, indent=2)
    table = markdown(info, peak, rows, args.quick)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table + f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
