"""The GPU check in one command: versions, the four scripts on the device, their speed, and a learning run.

    bash benchmarks/gpu/device.sh                          # on the lent GPU machine (README.md beside this file)
    python benchmarks/gpu/kit.py --out /tmp/kit            # the same on any machine with the project installed
    python benchmarks/gpu/kit.py --smoke --out /tmp/kit    # on the CPU in under a minute, tiny networks (a test runs it)

Three phases, each writing its files to --out as it ends, so that a phase that overruns leaves the earlier ones:
0. phase0.json: Python, the packages and the devices, then a short run of each of the four scripts, side by
   side, past learning_starts on Walker2d-v4 (the offline-to-online one on a dataset made here first), each
   checked: exit status 0 and every loss logged after learning starts finite.
1. phase1.json, phase1.md, phase1_traces.tar.gz: each from-scratch script at its authors' sizes on Hopper-v4
   and Humanoid-v4, with 1 seed and with --num-seeds 8 (one fresh process per script and task): its jitted
   update alone (updates per second, compile time, a jax.profiler trace split into kernels, host-device
   copies and the host's share), its own training loop (each seed's env steps per second after learning
   starts), one env step of all seeds alone, and the device's peak memory.
2. phase2.json, phase2_runs.tar.gz: FlowRL and SAC Flow-T at their authors' defaults on Walker2d-v4, 8 seeds in
   one process each, the two side by side, until the time budget is spent; then SIGTERM, which each script
   takes as a clean stop. Their TensorBoard logs are packed with a MACHINE line for benchmarks/plot.py.
--budget-s bounds the whole command; benchmarks/gpu/collect.py turns what comes back into the results files.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.dirname(HERE)]

SCRIPTS = ["flowrl_jax", "sac_flow_t", "sac_flow_g"]  # phase 1's order: the two with speed targets first
TASKS = ["Hopper-v4", "Humanoid-v4"]
LEARNING = ["flowrl_jax", "sac_flow_t"]
PACKAGES = ["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "chex", "numpy", "gymnasium",
            "mujoco", "tyro", "tensorboardX", "tensorboard", "dm_control", "shimmy", "ogbench", "h5py", "torch"]
# --smoke: networks small enough that a run crosses learning_starts within seconds on a CPU
SMOKE_SIZES = {
    "flowrl_jax": {"hidden_dim": 32, "batch_size": 32},
    "sac_flow_g": {"hidden_dim": 16, "critic_width": 32, "log_std_hidden": 16, "batch_size": 32},
    "sac_flow_t": {"d_model": 16, "n_heads": 2, "n_layers": 1, "critic_width": 32, "log_std_hidden": 16, "batch_size": 32},
}
SMOKE_O2O = ["--batch-size", "32", "--critic-width", "32", "--critic-depth", "2", "--flow-steps", "2", "--hidden-dim", "16",
             "--time-emb-dim", "8"]
# What each mode runs: phase 0's task, (steps, learning starts, log every) and buffer; phase 1's seed counts, timed updates,
# learning starts, timed loop steps and buffer; phase 2's task, seeds and longest duration; the seconds kept for phase 2
# and for the scripts' stop after SIGTERM. --smoke's buffers and tasks match across phases, so that JAX's compilation
# cache serves a later phase what an earlier one compiled; the full run's phase 0 runs on another task than phase 1,
# whose compile times are then the compiler's.
MODES = {
    "full": {"budget_s": 460, "p0_task": "Walker2d-v4", "p0": (1500, 1000, 100), "p0_buffer": None, "p0_timeout": 150,
             "p1_seeds": (1, 8), "p1_update_steps": 120, "p1_starts": 1000, "p1_loop_steps": 1000, "p1_buffer": None,
             "p2_task": "Walker2d-v4", "p2_seeds": 8, "p2_duration": float("inf"), "p2_reserve": 120, "p2_grace": 45},
    "smoke": {"budget_s": 120, "p0_task": "Hopper-v4", "p0": (240, 120, 40), "p0_buffer": 20_000, "p0_timeout": 60,
              "p1_seeds": (1, 2), "p1_update_steps": 12, "p1_starts": 120, "p1_loop_steps": 120, "p1_buffer": 20_000,
              "p2_task": "Hopper-v4", "p2_seeds": 2, "p2_duration": 8, "p2_reserve": 20, "p2_grace": 20},
}


def flags(sizes: dict) -> list[str]:
    return [x for k, v in sizes.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a TensorBoard run folder holds: {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def write_json(path: str, data) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def started(cmd: list[str], cwd: str, **env) -> tuple:
    """A script started in `cwd` (created) with its output to cwd/log.txt: (process, log file)."""
    os.makedirs(cwd)
    log = open(os.path.join(cwd, "log.txt"), "w")
    return subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=child_env(**env)), log


def finished(proc, log, cwd: str, timeout: float) -> str:
    """Wait up to `timeout` seconds for a started script (then kill it); the end of its log."""
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    with open(os.path.join(cwd, "log.txt")) as f:
        return f.read()[-800:]


def child_env(**extra) -> dict:
    """The environment of the kit's processes: warnings off, output unbuffered, and `extra`: where several share
    one GPU, XLA_PYTHON_CLIENT_PREALLOCATE=false (JAX otherwise takes three quarters of its memory in the first)."""
    return dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", **extra)


# ---------------------------------------------------------------------------------------------
# Phase 0: versions, devices, and a short run of each script
# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    import jax

    versions = {}
    for pkg in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    devices = jax.devices()
    smi = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    # the device tool sends the working tree without .git: collect.py then stamps the commit it runs at
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True) \
        if shutil.which("git") else None
    return {"platform": devices[0].platform, "device": getattr(devices[0], "device_kind", devices[0].platform),
            "device_count": len(devices), "devices": [str(d) for d in devices], "nvidia_smi": smi,
            "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "versions": versions, "commit": commit.stdout.strip() if commit and commit.returncode == 0 else "unknown",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def phase0_commands(mode: dict, smoke: bool, work: str) -> dict[str, list[str]]:
    total, starts, log_every = mode["p0"]
    task = mode["p0_task"]
    common = ["--env-id", task, "--total-timesteps", str(total), "--learning-starts", str(starts), "--eval-every",
              str(total), "--eval-episodes", "1", "--log-every", str(log_every), "--no-progress", "--checkpoint-every", "0"]
    sizes = {name: {**SMOKE_SIZES[name], "buffer_size": mode["p0_buffer"]} if smoke else {} for name in SMOKE_SIZES}
    cmds = {name: [sys.executable, os.path.join(ROOT, f"{name}.py"), *common, *flags(sizes[name])]
            for name in ["flowrl_jax", "sac_flow_g", "sac_flow_t"]}
    cmds["sac_flow_o2o"] = [sys.executable, os.path.join(ROOT, "sac_flow_o2o.py"), "--env-id", task, "--dataset",
                            os.path.join(work, "data.npz"),
                            "--offline-steps", str(starts // 2), "--total-timesteps", str(total - starts // 2),
                            "--learning-starts", str(starts // 2), "--log-every", str(log_every), "--eval-every",
                            str(total), "--eval-episodes", "1", "--no-progress", "--checkpoint-every", "0",
                            *(SMOKE_O2O if smoke else [])]
    return cmds


def check_run(name: str, cwd: str, proc_rc, starts: int, log_tail: str) -> dict:
    """What a phase-0 run shows: its exit status, and each loss logged after it started learning (finite?)."""
    row = {"script": name, "returncode": proc_rc, "log_tail": log_tail}
    runs = sorted(glob.glob(os.path.join(cwd, "runs", "*")))
    if not runs:
        return {**row, "ok": False, "problem": "no run folder"}
    s = scalars(runs[0])
    # sac_flow_o2o's steps count its offline steps first: it learns online after the same step.
    losses = {t: [p for p in v if p[0] > starts] for t, v in s.items() if t.startswith("losses/")}
    points = [p for v in losses.values() for p in v]
    bad = sorted(t for t, v in losses.items() if any(not math.isfinite(p[1]) for p in v))
    row.update(loss_tags=len(losses), loss_points=len(points), nonfinite=bad,
               last_step=max((p[0] for v in s.values() for p in v), default=0))
    row["ok"] = proc_rc == 0 and bool(points) and not bad
    if not row["ok"]:
        row["problem"] = (f"exit status {proc_rc}" if proc_rc != 0 else "no loss logged after learning starts" if not points
                          else f"non-finite: {', '.join(bad)}")
    return row


def phase0(args, mode: dict, work: str) -> dict:
    info = machine()
    print(f"phase 0: {info['device']} ({info['platform']}, {info['device_count']} device(s)), {info['cpu_count']} CPU cores, "
          f"jax {info['versions'].get('jax')}, numpy {info['versions'].get('numpy')}", flush=True)
    result = {"machine": info, "runs": []}
    write_json(os.path.join(args.out, "phase0.json"), result)
    if not args.smoke and info["platform"] != "gpu":
        raise SystemExit(f"error: JAX sees no GPU here (platform {info['platform']!r}); --smoke runs the kit on a CPU")
    work0 = os.path.join(work, "phase0")
    os.makedirs(work0)
    made = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_dataset.py"), "--env-id", mode["p0_task"],
                           "--steps", str(2 * mode["p0"][0]), "--out", os.path.join(work0, "data.npz")],
                          capture_output=True, text=True, env=child_env())
    if made.returncode != 0:
        result["runs"].append({"script": "make_dataset", "ok": False, "problem": made.stderr.strip()[-500:]})
    procs = {}
    for name, cmd in phase0_commands(mode, args.smoke, work0).items():
        cwd = os.path.join(work0, name)
        procs[name] = (*started(cmd, cwd, XLA_PYTHON_CLIENT_PREALLOCATE="false"), cwd, time.time())
    deadline = time.time() + mode["p0_timeout"]
    for name, (proc, log, cwd, t0) in procs.items():
        tail = finished(proc, log, cwd, deadline - time.time())
        starts = mode["p0"][1] // (2 if name == "sac_flow_o2o" else 1)
        row = check_run(name, cwd, proc.returncode, starts, tail)
        row["wall_s"] = time.time() - t0
        result["runs"].append(row)
        print(f"  {name}: {'ok' if row['ok'] else 'FAILED: ' + row['problem']} ({row.get('loss_points', 0)} loss points "
              f"after learning starts, last step {row.get('last_step', 0)})", flush=True)
    write_json(os.path.join(args.out, "phase0.json"), result)
    return result


# ---------------------------------------------------------------------------------------------
# Phase 1: update alone and training loop, 1 and 8 seeds, at the authors' sizes
# ---------------------------------------------------------------------------------------------


def env_step_ms(env_id: str, num_seeds: int, steps: int) -> float:
    """One step of all seeds' training envs with random actions, the loop's share that is the simulator's."""
    import numpy as np

    from common.env import SeedEnvs

    envs = SeedEnvs(env_id, list(range(num_seeds)))
    try:
        obs = envs.reset()
        times = []
        for i in range(steps + 20):
            t = time.perf_counter()
            _, obs, _ = envs.step(obs, envs.random_actions())
            if i >= 20:
                times.append(time.perf_counter() - t)
    finally:
        envs.close()
    return float(np.median(times) * 1e3)


def phase1_worker(spec: str, rows_path: str, trace_dir: str, smoke: bool, profile: bool) -> None:
    """In a fresh process: one script on one task, each seed count in turn; a row appended to rows_path per count.
    With `profile`, only a jax.profiler trace of the update (its row holds the profile alone): the profiler runs
    in processes of its own, after every speed row is safe, so that a profiler that fails on some machine
    cannot take those rows with it."""
    import throughput
    from common.run import keep_freed_memory

    keep_freed_memory()  # as the scripts' training runs do
    mode = MODES["smoke" if smoke else "full"]
    name, env_id = spec.split(":")
    module = importlib.import_module(name)
    overrides = dict(SMOKE_SIZES[name]) if smoke else {}
    if mode["p1_buffer"]:
        overrides["buffer_size"] = mode["p1_buffer"]
    for num_seeds in mode["p1_seeds"]:
        row = {"script": name, "env_id": env_id, "num_seeds": num_seeds}
        if profile:
            trace = os.path.join(trace_dir, f"{name}_{env_id}_{num_seeds}.trace.json.gz")
            measured = throughput.measure_update(module, env_id, 1, True, num_seeds, overrides, flops=False, keep_trace=trace)
            row["profile"] = measured["profile"]
        else:
            row.update(throughput.measure_update(module, env_id, mode["p1_update_steps"], False, num_seeds, overrides,
                                                 flops=False))
            gc.collect()  # the update's buffer goes before the loop makes its own
            row.update(throughput.measure_loop(module, env_id, mode["p1_loop_steps"], mode["p1_starts"], num_seeds,
                                               overrides))
            gc.collect()
            row["env_step_ms"] = env_step_ms(env_id, num_seeds, 100 if smoke else 300)
            row["peak_device_mb"] = throughput.device_peak_mb()  # the process's peak so far: this count's, as counts rise
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def phase1_table(info: dict, rows: list[dict], smoke: bool) -> str:
    """The markdown table of phase 1, with the issue's targets where this is a full run."""
    def key(r):  # rows merged from several device calls carry the call's time: a ratio pairs rows of one call
        return r["script"], r["env_id"], r.get("call")

    one = {key(r): r for r in rows if r["num_seeds"] == 1}
    lines = [f"Machine: {info['device']} ({info['platform']}), {info['cpu_count']} CPU cores ({info['processor']}), Python "
             f"{info['python']}, " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + f"; commit {info['commit']}, "
             f"{info['date']}" + (f"; XLA_FLAGS={info['xla_flags']}" if info.get("xla_flags") else "")
             + (" (--smoke: tiny networks, not the authors' sizes)" if smoke else "."),
             "",
             "| script | task | seeds | update compile s | updates/s | loop env steps/s per seed | loop env steps/s, all seeds "
             "| step time vs 1 seed | env step ms | update share of a step | device busy share of an update | copies ms/update "
             "| launches/update | peak device MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = one.get(key(r))
        loop = r.get("loop_env_steps_per_s", float("nan"))
        ratio = base["loop_env_steps_per_s"] / loop if base and r is not base else None
        prof = r.get("profile", {})
        wall_ms = 1e3 / r["grad_steps_per_s"]
        busy = prof.get("busy_ms_per_update")
        lines.append(
            f"| {r['script']} | {r['env_id']}{' (' + r['call'] + ')' if r.get('call') else ''} | {r['num_seeds']} | {r['compile_s']:.1f} | {r['grad_steps_per_s']:.0f} | "
            f"{fmt(loop, '.0f')} | {fmt(loop * r['num_seeds'], '.0f')} | {fmt(ratio, '.2f')} | {r['env_step_ms']:.2f} | "
            f"{fmt(loop / r['grad_steps_per_s'], '.2f')} | {fmt(None if busy is None else busy / wall_ms, '.2f')} | "
            f"{fmt(prof.get('copy_ms_per_update'), '.3f')} | {fmt(prof.get('launches_per_update'), '.0f')} | "
            f"{fmt(r.get('peak_device_mb'), '.0f')} |")
    lines += ["", "updates/s: the jitted update alone, all seeds in one call (median over chunks of calls). Loop: the script's "
              "own train() after learning_starts, one env step and one update per step, from its SPS_window events. Step time vs 1 "
              "seed: an S-seed loop step's wall time over a one-seed step's (S seeds cost S times one seed's work run one after "
              "another). Update share: the loop's rate over the update's, the part of a step that is the update. Device busy "
              "share: the union of the update's GPU kernels over its wall time (the rest is the host's: dispatch and launch "
              "gaps); copies: host-device copies and memsets inside it. Peak device: the process's peak bytes in use (the "
              "1M-transition replay buffers of every seed included)."]
    if not smoke:
        lines += ["", "Targets (issue 40), at the authors' sizes:"]
        for (name, env_id, call), r in one.items():
            target = {"flowrl_jax": 1000, "sac_flow_t": 800}.get(name)
            if target and env_id == "Hopper-v4":
                lines.append(f"- {name} one seed, Hopper-v4{' (' + call + ')' if call else ''}: {r['loop_env_steps_per_s']:.0f} env steps/s (target {target}): "
                             f"{'met' if r['loop_env_steps_per_s'] >= target else 'missed'}")
        for r in rows:
            base = one.get(key(r))
            if base and r is not base:
                ratio = base["loop_env_steps_per_s"] / r["loop_env_steps_per_s"]
                lines.append(f"- {r['script']} {r['env_id']}, {r['num_seeds']} seeds: {ratio:.2f} times one seed's wall time "
                             f"(target at most 1.5): {'met' if ratio <= 1.5 else 'missed'}")
    return "\n".join(lines) + "\n"


def phase1(args, mode: dict, work: str, info: dict, deadline: float) -> list[dict]:
    rows_path, profiles_path = os.path.join(work, "phase1_rows.jsonl"), os.path.join(work, "phase1_profiles.jsonl")
    trace_dir = os.path.join(work, "traces")
    os.makedirs(trace_dir)
    problems = []

    def worker(name: str, env_id: str, profile: bool) -> None:
        left = deadline - time.time()
        what = f"{name} {env_id}{' (profile)' if profile else ''}"
        if left < 20:
            problems.append(f"{what}: not run, the phase's time was spent")
            return
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{name}:{env_id}",
               "--rows", profiles_path if profile else rows_path, "--traces", trace_dir,
               *(["--smoke"] if args.smoke else []), *(["--profile"] if profile else [])]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=child_env())
            if proc.returncode != 0:
                problems.append(f"{what}: exit {proc.returncode}: {proc.stderr.strip()[-800:]}")
        except subprocess.TimeoutExpired:
            problems.append(f"{what}: stopped after {left:.0f} s, the phase's time")
        rows = merged(read_rows(rows_path), read_rows(profiles_path))
        for r in rows:
            if r["script"] == name and r["env_id"] == env_id and not profile:
                print(f"  {name} {env_id} x{r['num_seeds']}: update {r['grad_steps_per_s']:.0f}/s, loop "
                      f"{fmt(r.get('loop_env_steps_per_s'), '.0f')} env steps/s per seed, peak device "
                      f"{fmt(r.get('peak_device_mb'), '.0f')} MiB", flush=True)
        print(f"  ({what}: {time.time() - t0:.0f} s)", flush=True)
        write_json(os.path.join(args.out, "phase1.json"), {"machine": info, "smoke": args.smoke, "rows": rows,
                                                           "problems": problems})
        with open(os.path.join(args.out, "phase1.md"), "w") as f:
            f.write(phase1_table(info, rows, args.smoke) + "".join(f"\nProblem: {p}\n" for p in problems))

    for env_id in args.tasks:
        for name in args.scripts:
            worker(name, env_id, profile=False)
    for name in args.scripts:  # the profile of the first task's updates, from the compilation cache
        if any(r["script"] == name and r["env_id"] == args.tasks[0] for r in read_rows(rows_path)):
            worker(name, args.tasks[0], profile=True)
    with tarfile.open(os.path.join(args.out, "phase1_traces.tar.gz"), "w:gz") as tar:
        for path in sorted(glob.glob(os.path.join(trace_dir, "*"))):
            tar.add(path, arcname=os.path.basename(path))
    for p in problems:
        print(f"  problem: {p}", flush=True)
    return read_rows(rows_path)


def merged(rows: list[dict], profiles: list[dict]) -> list[dict]:
    """The speed rows with the profile of the same script, task and seed count added to each."""
    by_key = {(p["script"], p["env_id"], p["num_seeds"]): p["profile"] for p in profiles}
    return [{**r, "profile": by_key.get((r["script"], r["env_id"], r["num_seeds"]), {})} for r in rows]


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Phase 2: a learning run, 8 seeds in one process, FlowRL and Flow-T side by side
# ---------------------------------------------------------------------------------------------


def phase2(args, mode: dict, work: str, info: dict, deadline: float) -> dict:
    seeds, task = mode["p2_seeds"], mode["p2_task"]
    work2 = os.path.join(work, "phase2")
    procs = {}
    for name in LEARNING:
        cwd = os.path.join(work2, name)
        extra = []
        if args.smoke:
            extra = [*flags(SMOKE_SIZES[name]), "--learning-starts", str(mode["p1_starts"]), "--eval-every", "200",
                     "--eval-episodes", "1", "--log-every", "40", "--buffer-size", str(mode["p1_buffer"])]
        cmd = [sys.executable, os.path.join(ROOT, f"{name}.py"), "--env-id", task, "--num-seeds", str(seeds),
               "--no-progress", "--checkpoint-every", "0", "--no-checkpoint-buffer", *extra]
        procs[name] = (*started(cmd, cwd, XLA_PYTHON_CLIENT_PREALLOCATE="false"), cwd, cmd)
    start = time.time()
    deadline = min(deadline, start + mode["p2_duration"])
    print(f"phase 2: {', '.join(LEARNING)} on {task}, {seeds} seeds each, for {deadline - start:.0f} s", flush=True)
    while time.time() < deadline and any(p.poll() is None for p, *_ in procs.values()):
        time.sleep(1.0)
    for proc, *_ in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the scripts finish the step, checkpoint and stop
    result = {"machine": info, "env_id": task, "num_seeds": seeds, "runs": {}}
    for name, (proc, log, cwd, cmd) in procs.items():
        tail = finished(proc, log, cwd, mode["p2_grace"])
        per_seed = {}
        for run_dir in sorted(glob.glob(os.path.join(cwd, "runs", "*"))):
            if not os.path.isdir(run_dir) or not glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
                continue
            s = scalars(run_dir)
            per_seed[os.path.basename(run_dir)] = {
                "last_step": max((p[0] for v in s.values() for p in v), default=0),
                "eval": s.get("eval/episodic_return", []),
                "last_train_returns": [v for _, v in s.get("charts/episodic_return", [])[-10:]],
                "sps": s.get("charts/SPS", [])[-1:]}
        steps = [r["last_step"] for r in per_seed.values()]
        result["runs"][name] = {"command": " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]),
                                "returncode": proc.returncode, "wall_s": time.time() - start, "seeds": per_seed,
                                "log_tail": tail}
        last_eval = [r["eval"][-1][1] for r in per_seed.values() if r["eval"]]
        print(f"  {name}: {len(per_seed)} seeds to step {max(steps, default=0)}, exit {proc.returncode}"
              + (f", last evaluation {sum(last_eval) / len(last_eval):.1f} (mean of {len(last_eval)} seeds)" if last_eval else ""),
              flush=True)
    write_json(os.path.join(args.out, "phase2.json"), result)
    stamp = (f"{info['device']}, {info['cpu_count']} CPU cores, jax {info['versions'].get('jax')}, commit {info['commit']}, "
             f"{info['date'][:10]}; {seeds} seeds per process, {' and '.join(LEARNING)} side by side")
    with tarfile.open(os.path.join(args.out, "phase2_runs.tar.gz"), "w:gz") as tar:
        for name, (_, _, cwd, _) in procs.items():
            for event_file in sorted(glob.glob(os.path.join(cwd, "runs", "*", "events.out.tfevents.*"))):
                run = os.path.basename(os.path.dirname(event_file))
                tar.add(event_file, arcname=f"runs/{run}/{os.path.basename(event_file)}")
        machine_file = os.path.join(work2, "MACHINE")
        with open(machine_file, "w") as f:
            f.write(stamp + "\n")
        tar.add(machine_file, arcname="runs/MACHINE")
    return result


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the results (created; on the device tool's machine: $OUT)")
    parser.add_argument("--smoke", action="store_true", help="tiny networks on the CPU, in under a minute: the kit's own test")
    parser.add_argument("--budget-s", type=float, help="seconds the whole command may take (default: 460; --smoke 120)")
    parser.add_argument("--phases", type=int, nargs="+", default=[0, 1, 2], help="which phases to run (0 1 2)")
    parser.add_argument("--scripts", nargs="+", choices=SCRIPTS, help=f"phase 1's scripts (default: {' '.join(SCRIPTS)}; "
                        "--smoke: sac_flow_t)")
    parser.add_argument("--tasks", nargs="+", help=f"phase 1's tasks (default: {' '.join(TASKS)}; --smoke: Hopper-v4)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--traces", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:  # before JAX starts: the smoke run is the CPU's
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.worker:
        phase1_worker(args.worker, args.rows, args.traces, args.smoke, args.profile)
        return 0
    # --smoke: phase 1's code path once, within its minute
    args.scripts = args.scripts or (["sac_flow_t"] if args.smoke else SCRIPTS)
    args.tasks = args.tasks or (["Hopper-v4"] if args.smoke else TASKS)
    mode = MODES["smoke" if args.smoke else "full"]
    budget = args.budget_s if args.budget_s is not None else mode["budget_s"]
    if not args.out:
        parser.error("--out is required: the folder for the results")
    if budget <= 0 or not set(args.phases) <= {0, 1, 2}:
        parser.error(f"--budget-s must be positive (got {budget}) and --phases among 0 1 2 (got {args.phases})")
    from common.env import ConfigError, check_env_id

    for env_id in args.tasks:
        try:
            check_env_id(env_id)
        except ConfigError as e:
            parser.error(f"--tasks: {e}")
    try:
        os.makedirs(args.out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=args.out):
            pass
    except OSError as e:
        print(f"error: cannot write to --out {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    start = time.time()
    # One compilation cache for every process of the kit: the loop's train() reuses what the update-alone
    # measurement compiled. Keyed on the program, the flags and the versions, so nothing measured changes.
    with tempfile.TemporaryDirectory(prefix="kit-") as work:
        if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
            os.environ.update(JAX_COMPILATION_CACHE_DIR=os.path.join(work, "jax-cache"),
                              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        info = phase0(args, mode, work)["machine"] if 0 in args.phases else machine()
        print(f"  ({time.time() - start:.0f} s so far)", flush=True)
        if 1 in args.phases:
            reserve = mode["p2_reserve"] + mode["p2_grace"] if 2 in args.phases else 0
            print("phase 1: the update alone and the training loop, "
                  f"{' and '.join(str(s) for s in mode['p1_seeds'])} seeds", flush=True)
            phase1(args, mode, work, info, start + budget - reserve)
            print(f"  ({time.time() - start:.0f} s so far)", flush=True)
        if 2 in args.phases:
            phase2(args, mode, work, info, start + budget - mode["p2_grace"])
    print(f"kit done in {time.time() - start:.0f} s; results in {args.out}: "
          + ", ".join(sorted(os.listdir(args.out))), flush=True)
    if os.path.exists(os.path.join(args.out, "phase1.md")):
        with open(os.path.join(args.out, "phase1.md")) as f:
            print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
