"""Learning curves from TensorBoard logs: mean and 95% bootstrap interval across seeds.

    python benchmarks/plot.py --runs runs --out benchmarks/results

Runs are grouped by (env, script) from their folder names `{env}__{exp_name}__{seed}__{time}`. For each
env it draws `eval/episodic_return` and `charts/episodic_return` against env steps, one line per
script, with the reference results of REFERENCE.md section 3 as labelled horizontal lines, and writes
a markdown table of final returns (mean +- std and interquartile mean across seeds).
"""

from __future__ import annotations

import collections
import glob
import os
from dataclasses import dataclass

import numpy as np

# Final returns of published runs (1M steps): FlowRL's results page; CleanRL's SAC (PyTorch), 3 seeds.
REFERENCES = {
    "Ant-v4": [("FlowRL paper, 1M", 5510.0)],
    "HalfCheetah-v4": [("FlowRL paper, 1M", 8960.0), ("CleanRL SAC, 1M", 9635.0)],
    "Swimmer-v4": [("FlowRL paper, 1M", 48.7)],
    "Walker2d-v4": [("CleanRL SAC, 1M", 3591.0)],
    "Hopper-v4": [("CleanRL SAC, 1M", 2310.0)],
    "Humanoid-v4": [("CleanRL SAC, 1M", 4996.0)],
}


@dataclass
class Args:
    runs: str = "runs"
    """folder holding the run folders"""
    out: str = os.path.join("benchmarks", "results")
    """where the PNGs and the table go"""
    bins: int = 20
    """training returns are averaged into this many step bins per seed before aggregating"""
    title_note: str = ""
    """appended to every title (e.g. the machine)"""


def read_scalars(run_dir: str, tags) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags()["scalars"])
    return {t: np.array([(e.step, e.value) for e in acc.Scalars(t)]) for t in tags if t in have}


def bootstrap_ci(values: np.ndarray, n: int = 2000, seed: int = 0):
    """95% bootstrap interval of the mean over seeds (axis 0)."""
    if values.shape[0] < 2:
        return values[0], values[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.shape[0], (n, values.shape[0]))
    means = values[idx].mean(axis=1)
    return np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def iqm(x: np.ndarray) -> float:
    x = np.sort(x)
    lo, hi = int(np.floor(0.25 * len(x))), int(np.ceil(0.75 * len(x)))
    return float(np.mean(x[lo:hi])) if hi > lo else float(np.mean(x))


def on_grid(curves: list[np.ndarray], grid: np.ndarray) -> np.ndarray:
    return np.stack([np.interp(grid, c[:, 0], c[:, 1]) for c in curves])


def binned(curve: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean training return per step bin (bins with no episode carry the previous value)."""
    out, last = [], curve[0, 1]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = curve[(curve[:, 0] >= lo) & (curve[:, 0] < hi), 1]
        last = sel.mean() if len(sel) else last
        out.append(last)
    return np.array([(edges[:-1] + edges[1:]) / 2, out]).T


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tyro

    args = tyro.cli(Args)
    groups = collections.defaultdict(list)
    for run_dir in sorted(glob.glob(os.path.join(args.runs, "*"))):
        parts = os.path.basename(run_dir).split("__")
        if len(parts) >= 4:
            env_id = parts[0].replace("dm_control_", "dm_control/")
            groups[(env_id, parts[1])].append(run_dir)
    if not groups:
        raise SystemExit(f"no runs found under {args.runs!r}")
    os.makedirs(args.out, exist_ok=True)
    table = ["| env | script | seeds | env steps | final eval return (mean +- std) | IQM |", "|---|---|---|---|---|---|"]
    for env_id in sorted({e for e, _ in groups}):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for (env, script), dirs in sorted(groups.items()):
            if env != env_id:
                continue
            logs = [read_scalars(d, ["eval/episodic_return", "charts/episodic_return"]) for d in dirs]
            evals = [lg["eval/episodic_return"] for lg in logs if "eval/episodic_return" in lg]
            trains = [lg["charts/episodic_return"] for lg in logs if "charts/episodic_return" in lg]
            if evals:
                last = min(c[-1, 0] for c in evals)
                grid = np.unique(np.concatenate([c[:, 0] for c in evals]))
                grid = grid[grid <= last]
                ys = on_grid(evals, grid)
                lo, hi = bootstrap_ci(ys)
                axes[0].plot(grid, ys.mean(0), marker="o", ms=3, label=f"{script} ({len(evals)} seeds)")
                axes[0].fill_between(grid, lo, hi, alpha=0.25)
                finals = ys[:, -1]
                table.append(f"| {env_id} | {script} | {len(evals)} | {int(grid[-1])} | {finals.mean():.1f} +- {finals.std():.1f} | {iqm(finals):.1f} |")
            if trains:
                last = min(c[-1, 0] for c in trains)
                edges = np.linspace(0, last, args.bins + 1)
                ys = np.stack([binned(c, edges)[:, 1] for c in trains])
                centres = (edges[:-1] + edges[1:]) / 2
                lo, hi = bootstrap_ci(ys)
                axes[1].plot(centres, ys.mean(0), label=f"{script} ({len(trains)} seeds)")
                axes[1].fill_between(centres, lo, hi, alpha=0.25)
        for ax, what in zip(axes, ["evaluation return", "training episode return"]):
            for i, (label, value) in enumerate(REFERENCES.get(env_id, [])):
                ax.axhline(value, ls="--", lw=1, color=f"C{i + 5}", label=label)
            ax.set_xlabel("environment steps")
            ax.set_ylabel(f"{what} (sum of rewards per episode)")
            ax.set_title(f"{env_id}: {what}{' - ' + args.title_note if args.title_note else ''}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = os.path.join(args.out, f"curves_{env_id.replace('/', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}")
    with open(os.path.join(args.out, "final_returns.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
