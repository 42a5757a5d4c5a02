"""A script's update at an earlier commit against the working tree's, compiled in one process, timed alternately.

    python benchmarks/versus_commit.py --commit 0a0f494 --script sac_flow_g --env-id Humanoid-v4 --cycles 24

Fresh processes, old and new alternating (the records under results/ made with profile_update.py --worker),
move by 10 to 30% between runs on a shared 2-core machine, more than a change of 5% can be seen through. Here
the earlier version of the script (`git show <commit>:<script>.py`, imported under another name; the `common/`
it imports is the working tree's) and the current one are built side by side on the same buffer and agent,
and timed in whole policy-delay cycles (the actor branch included), their order swapped every cycle. The
table gives the median ms per update of each, their ratio, the GFLOP per env step, and how far the two runs'
metrics (losses, Q values, alpha) are apart after the first (untimed) cycle, from the same agent and buffer:
the check that a speed change left the computation as it was (0 when bit for bit; later cycles compound
rounding differences through Adam and are not compared). Writes {out}.md and {out}.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)


@dataclass
class Args:
    commit: str = "HEAD"
    """the earlier version: a commit (or anything `git show` takes) of this repository"""
    script: str = "sac_flow_g"
    """the script module to compare (flowrl_jax, sac_flow_g, sac_flow_t)"""
    env_id: str = "Hopper-v4"
    """task (its observation and action sizes set the networks' shapes)"""
    cycles: int = 12
    """timed policy-delay cycles of each version (after one untimed warm-up cycle)"""
    out: str = ""
    """writes {out}.md and {out}.json (default: only the table on stdout)"""


def load_at(commit: str, script: str, folder: str):
    """The script as it was at `commit`, as a module named {script}_at_commit."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:{script}.py"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"error: --commit {commit!r}: git show {commit}:{script}.py failed: {e.stderr.strip()}")
    path = os.path.join(folder, f"{script}_at_commit.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"{script}_at_commit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def measure(commit: str, name: str, env_id: str, cycles: int, **overrides) -> dict:
    """One comparison; `overrides` go to both versions' Args (the tests use small networks)."""
    import jax

    from common.env import make_env
    from common.run import keep_freed_memory
    from throughput import _flops, _policy_delay, alternate_cycles, filled_buffer, forced_cond

    keep_freed_memory()  # as the scripts' training runs do
    env = make_env(env_id, 0)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    one_seed = lambda tree: jax.tree_util.tree_map(lambda x: x[None], tree)
    with tempfile.TemporaryDirectory() as folder:
        modules = {"earlier": load_at(commit, name, folder), "now": importlib.import_module(name)}
    args = {k: m.Args(env_id=env_id, **overrides) for k, m in modules.items()}
    buf = one_seed(filled_buffer(args["now"], obs_dim, act_dim, max(args["now"].batch_size, 4096)))
    agents = {k: one_seed(m.create_agent(args[k], obs_dim, act_dim, jax.random.PRNGKey(0))) for k, m in modules.items()}
    updates = {k: m.make_update(args[k], act_dim) for k, m in modules.items()}
    delay, gflop = _policy_delay(args["now"]), {}
    for k, m in modules.items():  # per env step: the critic-only branch, and the actor's share of the other
        branch = {}
        for actor in (False, True):
            with forced_cond(actor):
                branch[actor] = _flops(m.make_update(args[k], act_dim).lower(agents[k], buf).compile()) / 1e9
        gflop[k] = branch[False] + (branch[True] - branch[False]) / delay
    times, _, first = alternate_cycles(updates, agents, buf, cycles, delay)
    metrics = {}  # after the warm-up cycle, from the same agent and batches: before rounding differences compound
    for key, value in first["now"].items():
        if key != "finite" and key in first["earlier"]:
            a, b = np.asarray(value, np.float64), np.asarray(first["earlier"][key], np.float64)
            metrics[key] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))
    row = {"commit": commit, "script": name, "env_id": env_id, "cycles": cycles, "policy_delay": delay,
           "metrics_rel_diff": metrics}
    for k in updates:
        row[k] = {"ms_per_update": float(np.median(times[k])), "spread": [min(times[k]), max(times[k])],
                  "gflop_per_env_step": gflop[k]}
    row["speedup"] = row["earlier"]["ms_per_update"] / row["now"]["ms_per_update"]
    return row


def main() -> None:
    import tyro

    args = tyro.cli(Args)
    from throughput import machine

    info = machine()
    r = measure(args.commit, args.script, args.env_id, args.cycles)
    e, n = r["earlier"], r["now"]
    worst = max(r["metrics_rel_diff"].items(), key=lambda kv: kv[1])
    lines = [f"{args.script} at {args.commit} against the working tree on {args.env_id}: median ms per update over "
             f"{args.cycles} policy-delay cycles each ({r['policy_delay']} updates), alternating in one process. Machine: "
             f"{info['processor']}, {info['cpu_count']} CPUs, {info['platform']}, jax {info['versions'].get('jax')}; "
             f"{info['date']}. Command: python benchmarks/versus_commit.py --commit {args.commit} --script {args.script} "
             f"--env-id {args.env_id} --cycles {args.cycles}", "",
             "| task | script | earlier ms | now ms | earlier / now | GFLOP per env step, earlier | "
             "now | largest relative difference of the metrics after the first cycle |", "|---|---|---|---|---|---|---|---|",
             f"| {args.env_id} | {args.script} | {e['ms_per_update']:.1f} ({e['spread'][0]:.1f}-{e['spread'][1]:.1f}) | "
             f"{n['ms_per_update']:.1f} ({n['spread'][0]:.1f}-{n['spread'][1]:.1f}) | {r['speedup']:.2f} | "
             f"{e['gflop_per_env_step']:.2f} | {n['gflop_per_env_step']:.2f} | {worst[1]:.1e} ({worst[0]}) |"]
    print("\n".join(lines))
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"machine": info, "rows": [r]}, f, indent=1)


if __name__ == "__main__":
    main()
