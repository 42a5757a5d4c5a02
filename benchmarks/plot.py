"""Learning curves from TensorBoard logs: interquartile mean and 95% bootstrap interval across seeds (rliable).

    python benchmarks/plot.py                                   # the committed CPU runs -> benchmarks/results
    python benchmarks/plot.py --runs runs --out my_results      # your own runs (e.g. from benchmarks/run.py)
    python benchmarks/plot.py --runs runs --out my_results --extra-tag losses/log_std   # and a third panel

Runs are grouped by (task, script) from their folder names `{env}__{exp_name}__{seed}__{time}`, or
`{env}__{exp_name}__{seed}__{time}__s{seed}` for each seed of a --num-seeds run (the newest folder per
seed counts). For each task it draws `eval/episodic_return` and
`charts/episodic_return` against env steps, one line per script, with the published results of
REFERENCE.md section 3 as labelled dashed lines (the paper's own evaluation returns on the left,
CleanRL's training returns on the right, all at 1M steps), and writes `final_returns.md`: the last
evaluation and the last training-return bin per seed, mean +- std and interquartile mean. The IQM and the
intervals are rliable's (Agarwal et al. 2021): at each point the IQM over seeds and its 95% percentile
bootstrap interval (stratified by task, here one task per figure). Scores across tasks, normalised:
benchmarks/aggregate.py.
A `MACHINE` file in the runs folder (one line) is added to every title so a figure always says
where its runs came from.
"""

from __future__ import annotations

import collections
import glob
import os
import warnings
from dataclasses import dataclass

import numpy as np

# rliable passes arch a RandomState, which arch 7 warns about on every call.
warnings.filterwarnings("ignore", category=FutureWarning, module="arch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# REFERENCE.md section 3. FlowRL: its results page (evaluation, seed 001, 1M steps).
EVAL_REFERENCES = {
    "Ant-v4": [("FlowRL paper, 1M steps", 5510.0)],
    "HalfCheetah-v4": [("FlowRL paper, 1M steps", 8960.0)],
    "Swimmer-v4": [("FlowRL paper, 1M steps", 48.7)],
    "dm_control/dog-stand-v0": [("FlowRL paper (IQM), 1M steps", 96.4)],
}
# CleanRL at 1M steps, training returns, 3 seeds.
TRAIN_REFERENCES = {
    "HalfCheetah-v4": [("CleanRL SAC, 1M steps", 9635.0), ("CleanRL TD3 (JAX), 1M steps", 9346.0)],
    "Walker2d-v4": [("CleanRL SAC, 1M steps", 3591.0), ("CleanRL TD3 (JAX), 1M steps", 3686.0)],
    "Hopper-v4": [("CleanRL SAC, 1M steps", 2310.0), ("CleanRL TD3 (JAX), 1M steps", 2940.0)],
    "Humanoid-v4": [("CleanRL SAC, 1M steps", 4996.0), ("CleanRL TD3 (JAX), 1M steps", 5033.0)],
}


@dataclass
class Args:
    runs: str = os.path.join(ROOT, "benchmarks", "results", "runs_cpu")
    """folder holding the run folders (default: the runs committed with the repository)"""
    out: str = os.path.join(ROOT, "benchmarks", "results")
    """where the PNGs and the table go"""
    bins: int = 20
    """training returns are averaged into this many step bins per seed before aggregating"""
    title_note: str = ""
    """appended to every title (default: the first line of {runs}/MACHINE, if there is one)"""
    extra_tag: str = ""
    """a third panel with this logged scalar (e.g. losses/log_std): IQM and 95% interval over seeds"""


def read_scalars(run_dir: str, tags) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags()["scalars"])
    return {t: np.array([(e.step, e.value) for e in acc.Scalars(t)]) for t in tags if t in have}


def seeded(seed: int) -> np.random.RandomState:
    """The random_state for rliable, with numpy's global RNG seeded too: rliable 1.2's StratifiedBootstrap draws
    its resampled runs from np.random, not from the random_state it is given, so only this makes it repeatable."""
    np.random.seed(seed)
    return np.random.RandomState(seed)


def iqm_curve(values: np.ndarray, reps: int = 2000, seed: int = 0):
    """rliable's IQM over seeds (axis 0) at each point (axis 1), with its 95% stratified bootstrap interval:
    (iqm, low, high), each of shape (points,)."""
    from rliable import library as rly
    from rliable import metrics

    scores = values[:, None, :]  # (runs, tasks = 1, points)
    per_point = lambda s: np.array([metrics.aggregate_iqm(s[..., j]) for j in range(s.shape[-1])])
    point, interval = rly.get_interval_estimates({"x": scores}, per_point, reps=reps,
                                                 random_state=seeded(seed))
    return point["x"], interval["x"][0], interval["x"][1]


def iqm(x: np.ndarray) -> float:
    """rliable's interquartile mean of a set of runs' scores."""
    from rliable import metrics

    return float(metrics.aggregate_iqm(np.asarray(x, dtype=float)[:, None]))


def on_grid(curves: list[np.ndarray], grid: np.ndarray) -> np.ndarray:
    return np.stack([np.interp(grid, c[:, 0], c[:, 1]) for c in curves])


def binned(curve: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean training return per step bin (bins with no episode carry the previous value)."""
    out, last = [], curve[0, 1]
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        inside = curve[:, 0] <= hi if i == len(edges) - 2 else curve[:, 0] < hi  # the last bin holds its right edge
        sel = curve[(curve[:, 0] >= lo) & inside, 1]
        last = sel.mean() if len(sel) else last
        out.append(last)
    return np.array([(edges[:-1] + edges[1:]) / 2, out]).T


def find_runs(root: str) -> dict:
    """{(task, script): [run folder per seed]}, the newest folder when a seed was run more than once."""
    newest = {}
    for run_dir in sorted(glob.glob(os.path.join(root, "*"))):
        parts = os.path.basename(run_dir).split("__")
        if len(parts) < 4 or not os.path.isdir(run_dir) or not glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
            continue
        env_id = parts[0].replace("dm_control_", "dm_control/")
        # A --num-seeds run logs each seed to {run_name}__s{seed}: the seed is the suffix's.
        seed = parts[4][1:] if len(parts) > 4 and parts[4][:1] == "s" and parts[4][1:].isdigit() else parts[2]
        key = (env_id, parts[1], seed)
        if key not in newest or parts[3] > os.path.basename(newest[key]).split("__")[3]:
            newest[key] = run_dir
    groups = collections.defaultdict(list)
    for (env_id, script, _), run_dir in sorted(newest.items()):
        groups[(env_id, script)].append(run_dir)
    return groups


def seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def mean_sd_iqm(x: np.ndarray) -> str:
    return f"{x.mean():.0f} +- {x.std():.0f} | {iqm(x):.0f}"


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tyro

    args = tyro.cli(Args)
    groups = find_runs(args.runs)
    if not groups:
        raise SystemExit(f"error: no runs (folders named env__script__seed__time with TensorBoard events) under {args.runs!r}")
    note = args.title_note
    if not note and os.path.exists(os.path.join(args.runs, "MACHINE")):
        with open(os.path.join(args.runs, "MACHINE")) as f:
            note = f.readline().strip()
    os.makedirs(args.out, exist_ok=True)
    table = ["| task | script | seeds | env steps | final eval return (mean +- std) | IQM | "
             "final training return (mean +- std) | IQM |", "|---|---|---|---|---|---|---|---|"]
    for env_id in sorted({e for e, _ in groups}):
        fig, axes = plt.subplots(1, 3 if args.extra_tag else 2, figsize=(19 if args.extra_tag else 13, 4.8))
        for (env, script), dirs in sorted(groups.items()):
            if env != env_id:
                continue
            logs = [read_scalars(d, ["eval/episodic_return", "charts/episodic_return", args.extra_tag]) for d in dirs]
            evals = [lg["eval/episodic_return"] for lg in logs if "eval/episodic_return" in lg]
            trains = [lg["charts/episodic_return"] for lg in logs if "charts/episodic_return" in lg]
            eval_cell, train_cell, steps = "- | -", "- | -", 0
            if evals:  # up to the last step every seed reached
                last = min(c[-1, 0] for c in evals)
                grid = np.unique(np.concatenate([c[:, 0] for c in evals]))
                grid = grid[grid <= last]
                ys = on_grid(evals, grid)
                mid, lo, hi = iqm_curve(ys)
                axes[0].plot(grid, mid, marker="o", ms=3, label=f"{script} ({seeds(len(evals))})")
                axes[0].fill_between(grid, lo, hi, alpha=0.25)
                eval_cell, steps = mean_sd_iqm(ys[:, -1]), int(grid[-1])
            if trains:
                last = min(c[-1, 0] for c in trains)
                edges = np.linspace(0, last, args.bins + 1)
                ys = np.stack([binned(c, edges)[:, 1] for c in trains])
                centres = (edges[:-1] + edges[1:]) / 2
                mid, lo, hi = iqm_curve(ys)
                axes[1].plot(centres, mid, label=f"{script} ({seeds(len(trains))})")
                axes[1].fill_between(centres, lo, hi, alpha=0.25)
                train_cell, steps = mean_sd_iqm(ys[:, -1]), max(steps, int(last))
            extras = [lg[args.extra_tag] for lg in logs if args.extra_tag in lg]
            if extras:
                grid = np.unique(np.concatenate([c[:, 0] for c in extras]))
                grid = grid[grid <= min(c[-1, 0] for c in extras)]
                mid, lo, hi = iqm_curve(on_grid(extras, grid))
                axes[2].plot(grid, mid, label=f"{script} ({seeds(len(extras))})")
                axes[2].fill_between(grid, lo, hi, alpha=0.25)
            table.append(f"| {env_id} | {script} | {len(dirs)} | {steps} | {eval_cell} | {train_cell} |")
        if args.extra_tag:
            axes[2].set(xlabel="environment steps", ylabel=args.extra_tag)
            axes[2].set_title(f"{args.extra_tag}: IQM and 95% bootstrap CI over seeds", fontsize=10)
            axes[2].grid(alpha=0.3)
            axes[2].legend(fontsize=8, loc="best")
        panels = [("evaluation return", EVAL_REFERENCES), ("training episode return", TRAIN_REFERENCES)]
        for ax, (what, refs) in zip(axes[:2], panels):
            for i, (label, value) in enumerate(refs.get(env_id, [])):
                ax.axhline(value, ls="--", lw=1, color=f"C{i + 5}", label=label)
            ax.set_xlabel("environment steps")
            ax.set_ylabel(f"{what} (sum of rewards per episode)")
            ax.set_title(f"{what}: IQM and 95% bootstrap CI over seeds (rliable)", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
        fig.suptitle(env_id + (f"  ({note})" if note else ""), fontsize=12)
        fig.tight_layout()
        path = os.path.join(args.out, f"curves_{env_id.replace('/', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}")
    lines = [f"Final returns{' (' + note + ')' if note else ''}: the last evaluation (mean of its episodes) and the "
             f"mean training return over the last 1/{args.bins} of the steps, per seed; mean +- std over seeds and "
             "interquartile mean (IQM).", "", *table]
    with open(os.path.join(args.out, "final_returns.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
