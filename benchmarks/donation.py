"""The update with the agent donated (its buffers reused for the outputs) against fresh outputs, as the scripts do.

    python benchmarks/donation.py                                  # the three scripts on Hopper-v4
    python benchmarks/donation.py --env-ids Hopper-v4 Humanoid-v4 --cycles 12

Why it exists: the scripts used to jit their update with donate_argnums=0. With the inputs aliased to the
outputs, XLA's copy insertion copies every large weight and both of its Adam moments before the update,
because the fused Adam step reads the old moments in the fusion that writes the new parameter. Both
variants are compiled in one process from the same script (the donated one by wrapping jax.jit while
make_update runs) and timed alternately, in whole policy-delay cycles (the actor branch included), their
order swapped every cycle; the table gives the median ms per update of each, their ratio, the MiB that
XLA copies inside each compiled program, and whether the two agree bit for bit after all cycles.
Writes {out}.md and {out}.json.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["flowrl_jax", "sac_flow_g", "sac_flow_t"])
    """script modules to measure"""
    env_ids: list[str] = field(default_factory=lambda: ["Hopper-v4"])
    """tasks (their observation and action sizes set the networks' shapes)"""
    cycles: int = 10
    """timed policy-delay cycles of each variant (the first of each is left out as a warm-up)"""
    out: str = os.path.join(BENCH, "results", "donation_cpu")
    """writes {out}.md and {out}.json"""


@contextlib.contextmanager
def donating_jit():
    """Within the block, jax.jit donates its first argument (the agent), as the scripts did before."""
    import jax

    original = jax.jit
    jax.jit = lambda fn, **kw: original(fn, **{**kw, "donate_argnums": 0})
    try:
        yield
    finally:
        jax.jit = original


def copied_mib(build, agent, buf) -> float:
    """MiB that the copy instructions of the update `build()` makes write (the mean of lax.cond's two branches)."""
    from throughput import forced_cond

    total = 0.0
    for actor in (False, True):
        with forced_cond(actor):
            text = build().lower(agent, buf).compile().as_text()
        entry = text[text.index("ENTRY"):]
        for dims in re.findall(r"= f32\[([\d,]*)\]\{[\d,]*\} copy\(", entry):
            total += np.prod([int(d) for d in dims.split(",") if d] or [1]) * 4 / 2**20
    return total / 2


def measure(name: str, env_id: str, cycles: int, **overrides) -> dict:
    """One row of the table; `overrides` go to the script's Args (the tests use small networks)."""
    import jax

    from common.env import make_env
    from throughput import _policy_delay, alternate_cycles, filled_buffer

    module = importlib.import_module(name)
    args = module.Args(env_id=env_id, **overrides)
    env = make_env(env_id, 0)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    one_seed = lambda tree: jax.tree_util.tree_map(lambda x: x[None], tree)
    fresh = lambda: one_seed(module.create_agent(args, obs_dim, act_dim, jax.random.PRNGKey(0)))
    buf = one_seed(filled_buffer(args, obs_dim, act_dim, max(args.batch_size, 4096)))
    builders = {"fresh outputs": lambda: module.make_update(args, act_dim)}

    def donated():
        with donating_jit():
            return module.make_update(args, act_dim)

    builders["donated"] = donated
    updates = {k: b() for k, b in builders.items()}
    agents = {k: fresh() for k in updates}
    delay = _policy_delay(args)
    times, infos, _ = alternate_cycles(updates, agents, buf, cycles, delay)
    leaves = {k: jax.tree_util.tree_leaves((agents[k], infos[k])) for k in updates}
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*leaves.values()))
    row = {"script": name, "env_id": env_id, "cycles": cycles, "policy_delay": delay, "bit_identical": bool(same)}
    for k in updates:
        row[k] = {"ms_per_update": float(np.median(times[k])), "spread": [min(times[k]), max(times[k])],
                  "copied_mib": copied_mib(builders[k], fresh(), buf)}
    row["speedup"] = row["donated"]["ms_per_update"] / row["fresh outputs"]["ms_per_update"]
    return row


def main() -> None:
    import tyro

    args = tyro.cli(Args)
    from throughput import machine

    info = machine()
    rows = []
    for env_id in args.env_ids:
        for name in args.scripts:
            rows.append(measure(name, env_id, args.cycles))
            r = rows[-1]
            print(f"{name} {env_id}: donated {r['donated']['ms_per_update']:.1f} ms, fresh outputs "
                  f"{r['fresh outputs']['ms_per_update']:.1f} ms ({r['speedup']:.2f}x), bit-identical {r['bit_identical']}",
                  flush=True)
    lines = [f"The update with the agent donated against fresh outputs (the scripts now): median ms per update over "
             f"{args.cycles} policy-delay cycles each, alternating, one process per run of this script. Machine: "
             f"{info['processor']}, {info['cpu_count']} CPUs, {info['platform']}, jax {info['versions'].get('jax')}; "
             f"{info['date']}. Command: python benchmarks/donation.py --env-ids {' '.join(args.env_ids)} --cycles {args.cycles}",
             "", "| task | script | donated ms | fresh outputs ms | donated / fresh | MiB copied per update, donated | "
             "fresh | bit-identical after all cycles |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, f = r["donated"], r["fresh outputs"]
        lines.append(f"| {r['env_id']} | {r['script']} | {d['ms_per_update']:.1f} ({d['spread'][0]:.1f}-{d['spread'][1]:.1f}) | "
                     f"{f['ms_per_update']:.1f} ({f['spread'][0]:.1f}-{f['spread'][1]:.1f}) | {r['speedup']:.2f} | "
                     f"{d['copied_mib']:.1f} | {f['copied_mib']:.1f} | {'yes' if r['bit_identical'] else 'NO'} |")
    lines += ["", "MiB copied: the f32 copy instructions in each compiled program, the mean of its critic-only and "
              "critic-and-actor branches."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
