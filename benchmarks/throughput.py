"""Throughput of the compiled update and of the whole training loop, against the machine's matmul peak.

    python benchmarks/throughput.py --scripts flowrl_jax --env-ids Hopper-v4
    python benchmarks/throughput.py --quick

For each script and env, at the script's default (the authors') hyperparameters:
- compile time and gradient steps per second of the update alone (buffer filled with random data);
- FLOPs per env step from XLA's cost_analysis() of the compiled update with the actor branch forced
  on and off (critic FLOPs + actor FLOPs / policy delay), and the share of the matmul peak reached;
- env steps per second of the training loop after learning_starts (the script run as a user runs it,
  read back from its `charts/SPS_window`).
Writes benchmarks/results/throughput_<device>.json and .md, stamped with the machine and versions.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["flowrl_jax"])
    """script modules to measure"""
    env_ids: list[str] = field(default_factory=lambda: ["Hopper-v4"])
    """environments (their sizes set the network inputs)"""
    update_steps: int = 100
    """timed calls of the update"""
    loop_steps: int = 2000
    """env steps of the training loop timed after learning_starts (0 skips the loop)"""
    quick: bool = False
    """a few minutes on 2 CPU cores: fewer timed steps"""
    out: str = os.path.join(ROOT, "benchmarks", "results")
    """folder for the JSON and markdown results"""


def matmul_peak_gflops(n: int = 1024, reps: int = 20) -> dict:
    """Best-of float32 matmul rate with numpy and with XLA on the default device."""
    import jax
    import jax.numpy as jnp

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = min(_timed(lambda: a @ a) for _ in range(reps))
    x = jnp.asarray(a)
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


def measure_update(module_name: str, env_id: str, steps: int) -> dict:
    import jax

    from common.buffer import buffer_add, buffer_init
    from common.env import make_env

    module = importlib.import_module(module_name)
    args = module.Args(env_id=env_id)
    env = make_env(env_id, 0)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    agent = module.create_agent(args, obs_dim, act_dim, jax.random.PRNGKey(0))
    buf = buffer_init(args.buffer_size, obs_dim, act_dim)
    add = jax.jit(buffer_add, donate_argnums=0)
    rng = np.random.default_rng(0)
    for _ in range(max(args.batch_size, 4096)):
        obs = rng.standard_normal(obs_dim).astype(np.float32)
        buf = add(buf, obs, rng.uniform(-1, 1, act_dim).astype(np.float32), np.float32(rng.standard_normal()),
                  obs, np.float32(0.0))
    update = module.make_update(args, act_dim)

    t = time.perf_counter()
    compiled = update.lower(agent, buf).compile()
    compile_s = time.perf_counter() - t
    flops_update = _flops(compiled)
    # XLA's cost of a lax.cond is not the cost of the branch taken, so cost the update twice with the
    # actor branch forced on and off; the actor runs on one of every `delay` updates.
    delay = getattr(args, "policy_frequency", getattr(args, "policy_delay", 1))
    with forced_cond(True):
        with_actor = _flops(module.make_update(args, act_dim).lower(agent, buf).compile())
    with forced_cond(False):
        critics_only = _flops(module.make_update(args, act_dim).lower(agent, buf).compile())
    per_env_step = critics_only + (with_actor - critics_only) / delay

    for _ in range(3):  # warm up, including a first actor update
        agent, info = update(agent, buf)
    jax.block_until_ready(agent)
    t = time.perf_counter()
    for _ in range(steps):
        agent, info = update(agent, buf)
    jax.block_until_ready((agent, info))
    rate = steps / (time.perf_counter() - t)
    return {"compile_s": compile_s, "grad_steps_per_s": rate, "gflop_update_xla_cond": flops_update / 1e9,
            "gflop_critic_step": critics_only / 1e9, "gflop_critic_and_actor_step": with_actor / 1e9,
            "gflop_per_env_step": per_env_step / 1e9, "update_gflops": rate * per_env_step / 1e9,
            "batch_size": args.batch_size}


def measure_loop(module_name: str, env_id: str, steps: int) -> dict:
    """Run the script as a user would, learning_starts + steps env steps; read its SPS after learning starts."""
    module = importlib.import_module(module_name)
    starts = module.Args().learning_starts
    log_every = max(100, steps // 4)
    with tempfile.TemporaryDirectory() as cwd:
        cmd = [sys.executable, os.path.join(ROOT, f"{module_name}.py"), "--env-id", env_id, "--total-timesteps",
               str(starts + steps), "--eval-episodes", "0", "--log-every", str(log_every), "--no-progress"]
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        wall = time.perf_counter() - t
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(glob.glob(os.path.join(cwd, "runs", "*"))[0])
        acc.Reload()
        window = [(e.step, e.value) for e in acc.Scalars("charts/SPS_window") if e.step > starts + log_every]
    # the first window after learning_starts holds the compilation; later windows are steady state
    return {"loop_env_steps_per_s": float(np.mean([v for _, v in window])) if window else float("nan"),
            "loop_command": " ".join(cmd[1:]).replace(ROOT + "/", ""), "loop_wall_s": wall}


def machine() -> dict:
    import jax

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "mujoco", "gymnasium"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    device = jax.devices()[0]
    return {"device": f"{device.platform}:{getattr(device, 'device_kind', '')}", "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(), "versions": versions}


def main() -> None:
    import tyro

    args = tyro.cli(Args)
    if args.quick:
        args.update_steps, args.loop_steps = 20, 400
    info = machine()
    peak = matmul_peak_gflops()
    rows = []
    for module_name in args.scripts:
        for env_id in args.env_ids:
            row = {"script": module_name, "env_id": env_id, **measure_update(module_name, env_id, args.update_steps)}
            if args.loop_steps > 0:
                row.update(measure_loop(module_name, env_id, args.loop_steps))
                row["loop_vs_update"] = row["loop_env_steps_per_s"] / row["grad_steps_per_s"]
            row["share_of_matmul_peak"] = row["update_gflops"] / max(peak.values())
            rows.append(row)
            print(json.dumps(row))
    os.makedirs(args.out, exist_ok=True)
    tag = "quick_" if args.quick else ""
    stem = os.path.join(args.out, f"throughput_{tag}{info['device'].split(':')[0]}")
    with open(stem + ".json", "w") as f:
        json.dump({"machine": info, "matmul_peak_gflops": peak, "rows": rows}, f, indent=2)
    lines = [f"Machine: {info['device']}, {info['cpu_count']} CPUs ({info['processor']}), Python {info['python']}, "
             + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
             f"Matmul peak (float32 1024x1024, the better of the two is the 100%): numpy {peak['numpy']:.0f} GFLOP/s, "
             f"XLA {peak['jax']:.0f} GFLOP/s", "",
             "| script | env | compile s | update steps/s | GFLOP/env step | update GFLOP/s | % of peak | loop env steps/s | loop/update |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loop = r.get("loop_env_steps_per_s", float("nan"))
        lines.append(f"| {r['script']} | {r['env_id']} | {r['compile_s']:.1f} | {r['grad_steps_per_s']:.1f} | "
                     f"{r['gflop_per_env_step']:.2f} | {r['update_gflops']:.0f} | {100 * r['share_of_matmul_peak']:.0f}% | "
                     f"{loop:.1f} | {r.get('loop_vs_update', float('nan')):.2f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
