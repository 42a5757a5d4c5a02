"""Total env steps per second of --num-seeds S runs, against S = 1.

    python benchmarks/seeds_throughput.py                        # FlowRL on Hopper-v4, S = 1 2 4 8, both sizes
    python benchmarks/seeds_throughput.py --scripts sac_flow_g sac_flow_t --num-seeds 1 2 4
    python benchmarks/seeds_throughput.py --sizes authors --num-seeds 1 8 16 32 64   # on a GPU

Each (script, size, S) runs the script's own train() in a fresh process: --learning-starts random
steps, then --steps learning steps. The rate is each seed's env steps per second after learning
starts, from the step and wall-time stamps of its `charts/SPS_window` events (the first window, which
holds the compilation, is left out); the total is S times it. With --repeats R each configuration
runs R times, interleaved with the others, and the median run counts (shared machines are noisy). `vs S=1` is the total against the S = 1
run, i.e. against running the seeds as separate processes one after another; `wall vs S=1` is the
wall time of an S-seed run against a one-seed run of the same length. Sizes: `authors` is the
script's defaults, `small` sets every hidden width to 64 and the batch to 64 (where dispatch, not
arithmetic, bounds a step). Writes benchmarks/results/seeds_throughput_<platform>[_<size>].md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {
    "flowrl_jax": {"hidden_dim": 64, "batch_size": 64},
    "sac_flow_g": {"hidden_dim": 64, "critic_width": 64, "log_std_hidden": 64, "batch_size": 64},
    "sac_flow_t": {"d_model": 64, "critic_width": 64, "log_std_hidden": 64, "batch_size": 64},
}


def worker(spec: str, opts) -> dict:
    """Run train() for one (script, size, S) in this process; return its per-seed loop rate."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import jax

    name, size, num_seeds = spec.split(":")
    sys.path.insert(0, ROOT)
    module = importlib.import_module(name)
    num_seeds = int(num_seeds)
    log_every = max(10, opts.steps // 4)
    overrides = SMALL[name] if size == "small" else {}
    args = module.Args(env_id=opts.env_id, num_seeds=num_seeds, total_timesteps=opts.learning_starts + opts.steps,
                       learning_starts=opts.learning_starts, eval_episodes=0, log_every=log_every, progress=False,
                       checkpoint_every=0, **overrides)
    module.check_args(args)
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        with contextlib.redirect_stdout(sys.stderr):
            start = time.perf_counter()
            summary = module.train(args)
            wall = time.perf_counter() - start
        acc = EventAccumulator(summary["log_dirs"][0])
        acc.Reload()
        marks = [(e.step, e.wall_time) for e in acc.Scalars("charts/SPS_window") if e.step >= opts.learning_starts + log_every]
        window = [(s1 - s0) / (w1 - w0) for (s0, w0), (s1, w1) in zip(marks, marks[1:])]
    per_seed = float(np.median(window)) if window else float("nan")
    stats = jax.devices()[0].memory_stats() or {}
    return {"script": name, "size": size, "num_seeds": num_seeds, "per_seed_sps": per_seed, "total_sps": per_seed * num_seeds,
            "wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "device_peak_mb": stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None,
            "devices": f"{len(jax.devices())} x {jax.devices()[0].device_kind}", "platform": jax.devices()[0].platform,
            "flags": " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scripts", nargs="+", default=["flowrl_jax"], choices=sorted(SMALL))
    parser.add_argument("--sizes", nargs="+", default=["small", "authors"], choices=["small", "authors"])
    parser.add_argument("--num-seeds", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--env-id", default="Hopper-v4")
    parser.add_argument("--learning-starts", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=0, help="learning steps per run (default: 400 small, 60 authors)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per (script, size, S), interleaved; the median counts")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        print(json.dumps(worker(opts.worker, opts)))
        return

    rows = []
    for name in opts.scripts:
        for size in opts.sizes:
            steps = opts.steps or (400 if size == "small" else 60)
            runs = {n: [] for n in opts.num_seeds}
            for _ in range(opts.repeats):  # interleaved, so a slow spell of a shared machine hits every S alike
                for num_seeds in opts.num_seeds:
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{name}:{size}:{num_seeds}", "--env-id",
                           opts.env_id, "--learning-starts", str(opts.learning_starts), "--steps", str(steps)]
                    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
                    if done.returncode != 0:
                        sys.exit(f"{name} {size} S={num_seeds} failed:\n{done.stderr[-3000:]}")
                    runs[num_seeds].append(json.loads(done.stdout.strip().splitlines()[-1]))
            for num_seeds, found in runs.items():
                row = sorted(found, key=lambda r: r["per_seed_sps"])[len(found) // 2]
                row["repeats"] = [round(r["total_sps"], 1) for r in found]
                one = next((r for r in rows if (r["script"], r["size"], r["num_seeds"]) == (name, size, 1)), None)
                if one:
                    row["vs_one"] = row["total_sps"] / one["total_sps"]
                    row["wall_vs_one"] = one["per_seed_sps"] / row["per_seed_sps"]
                rows.append(row)
                print(f"{name} {size} S={num_seeds}: {row['total_sps']:.1f} env steps/s in all "
                      f"({row['per_seed_sps']:.1f} per seed; runs {row['repeats']})" + (f", {row['vs_one']:.2f}x S=1" if one else ""),
                      flush=True)

    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    kind = rows[0]["platform"]
    lines = [f"# Many seeds in one process: total env steps per second ({rows[0]['devices']}, {os.cpu_count()} CPU cores, "
             f"{time.strftime('%Y-%m-%d')})", "",
             f"`python benchmarks/seeds_throughput.py {' '.join(sys.argv[1:])}`; env {opts.env_id}, learning starts at "
             f"{opts.learning_starts}. `vs S=1`: total throughput against one seed (= separate runs one after another); "
             "`wall vs S=1`: wall time of the S-seed run against a one-seed run of the same length.", "",
             "| script | size | S | per seed (steps/s) | total (steps/s) | vs S=1 | wall vs S=1 | total of each run | peak RSS (MiB) | device peak (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['script']} | {r['size']}{' (' + r['flags'] + ')' if r['flags'] else ''} | {r['num_seeds']} | "
                     f"{r['per_seed_sps']:.1f} | {r['total_sps']:.1f} | {fmt(r.get('vs_one'), '.2f')} | "
                     f"{fmt(r.get('wall_vs_one'), '.2f')} | {', '.join(map(str, r['repeats']))} | {r['peak_rss_mb']:.0f} | {fmt(r['device_peak_mb'], '.0f')} |")
    os.makedirs(opts.out, exist_ok=True)
    stem = os.path.join(opts.out, f"seeds_throughput_{kind}" + ("" if len(opts.sizes) == 2 else f"_{opts.sizes[0]}"))
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows}, f, indent=1)
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
