"""Scores across tasks as the field reports them (Agarwal et al., NeurIPS 2021), computed with rliable.

    python benchmarks/aggregate.py                              # the committed CPU runs -> benchmarks/results
    python benchmarks/aggregate.py --runs runs --out my_results --metric train

Each run's score is its final evaluation return (--metric eval: the last `eval/episodic_return`), its
final training return (--metric train: the mean `charts/episodic_return` over the last --last-frac of
its steps) or its final success rate (--metric success: the last `eval/success_rate`, for tasks that report
success, such as OGBench's; already in [0, 1], so not normalised). Returns are normalised per task, (score - random) / (reference - random): `random` from
results/random_scores.json (benchmarks/random_scores.py), `reference` the published score of
REFERENCE.md section 3 (CleanRL SAC at 1M steps where listed, the FlowRL results page otherwise), so
1 means the reference's 1M-step result. Tasks with neither are left out, and said so.

Writes, with 95% stratified bootstrap intervals (--reps resamples of the runs within each task):
- aggregate_metrics.png: median, IQM, mean and optimality gap of the normalised scores per script;
- performance_profiles.png: the fraction of runs above each normalised score tau;
- probability_of_improvement.png: P(X > Y) for each pair of scripts, on the tasks both ran;
- aggregate.md: the same numbers as a table.
A script counts as many runs per task as its task with the fewest seeds has (rliable needs a full
runs x tasks matrix); the table says how many.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np

# rliable passes arch a RandomState, which arch 7 warns about on every call.
warnings.filterwarnings("ignore", category=FutureWarning, module="arch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from plot import ROOT, binned, find_runs, read_scalars, seeded  # noqa: E402

# REFERENCE.md section 3: CleanRL SAC (training return, 1M steps, 3 seeds) where listed, else FlowRL's results page.
REFERENCE_SCORES = {
    "HalfCheetah-v4": (9635.0, "CleanRL SAC, 1M"),
    "Walker2d-v4": (3591.0, "CleanRL SAC, 1M"),
    "Hopper-v4": (2310.0, "CleanRL SAC, 1M"),
    "Humanoid-v4": (4996.0, "CleanRL SAC, 1M"),
    "Ant-v4": (5510.0, "FlowRL page, 1M"),
    "Swimmer-v4": (48.7, "FlowRL page, 1M"),
    "dm_control/dog-stand-v0": (96.4, "FlowRL page (IQM), 1M"),
}
METRICS = ("Median", "IQM", "Mean", "Optimality Gap")


@dataclass
class Args:
    runs: str = os.path.join(ROOT, "benchmarks", "results", "runs_cpu")
    """folder holding the run folders (default: the runs committed with the repository)"""
    out: str = os.path.join(ROOT, "benchmarks", "results")
    """where the figures and aggregate.md go"""
    metric: str = "eval"
    """eval: each run's last evaluation return; train: its mean training return over the last --last-frac of its steps;
    success: its last evaluation success rate"""
    last_frac: float = 0.05
    """with --metric train, the share of a run's steps its final training return averages over"""
    random_scores: str = os.path.join(ROOT, "benchmarks", "results", "random_scores.json")
    """random-policy scores per task (benchmarks/random_scores.py)"""
    reps: int = 2000
    """bootstrap resamples"""
    seed: int = 0
    """seed of the bootstrap"""


TAGS = {"eval": "eval/episodic_return", "train": "charts/episodic_return", "success": "eval/success_rate"}
WHAT = {"eval": "final evaluation return", "train": "final training return", "success": "final evaluation success rate"}


def final_score(run_dir: str, metric: str, last_frac: float) -> float | None:
    """A run's final evaluation return or success rate, or its mean training return over the last `last_frac` of its
    steps."""
    tag = TAGS[metric]
    curve = read_scalars(run_dir, [tag]).get(tag)
    if curve is None or not len(curve):
        return None
    if metric != "train":
        return float(curve[-1, 1])
    last = curve[-1, 0]
    return float(binned(curve, np.array([last * (1 - last_frac), last]))[0, 1])


def normalise(score, env_id: str, random_scores: dict):
    """(score - random) / (reference - random) of a task; None if the task lacks either."""
    if env_id not in REFERENCE_SCORES or env_id not in random_scores:
        return None
    low, high = random_scores[env_id]["mean"], REFERENCE_SCORES[env_id][0]
    return (np.asarray(score, dtype=float) - low) / (high - low)


def score_matrices(scores: dict, random_scores: dict | None) -> tuple[dict, dict, list]:
    """{script: (runs, tasks) normalised scores} from {(task, script): [raw score per seed]}, each script's runs
    cut to the fewest seeds of its tasks; also {script: [its tasks]} and the tasks left out (no normalisation).
    `random_scores` None: the scores are kept as they are (success rates)."""
    if random_scores is None:
        normalise_ = lambda score, env, _: np.asarray(score, dtype=float)
    else:
        normalise_ = normalise
    left_out = sorted({env for env, _ in scores if normalise_(0.0, env, random_scores) is None})
    matrices, tasks = {}, {}
    for script in sorted({s for _, s in scores}):
        envs = sorted(env for env, s in scores if s == script and env not in left_out)
        if not envs:
            continue
        n = min(len(scores[(env, script)]) for env in envs)
        matrices[script] = np.stack([normalise_(scores[(env, script)][:n], env, random_scores) for env in envs], axis=1)
        tasks[script] = envs
    return matrices, tasks, left_out


def aggregates(matrices: dict, reps: int, seed: int) -> tuple[dict, dict]:
    """rliable's median, IQM, mean and optimality gap per script, with 95% stratified bootstrap intervals."""
    from rliable import library as rly
    from rliable import metrics

    func = lambda x: np.array([metrics.aggregate_median(x), metrics.aggregate_iqm(x), metrics.aggregate_mean(x),
                               metrics.aggregate_optimality_gap(x)])
    return rly.get_interval_estimates(matrices, func, reps=reps, random_state=seeded(seed))


def improvement(matrices: dict, tasks: dict, reps: int, seed: int) -> tuple[dict, dict]:
    """P(X > Y) for each pair of scripts on the tasks both ran (rliable), with 95% intervals: {"X,Y": value}."""
    from rliable import library as rly
    from rliable import metrics

    pairs = {}
    for x, y in itertools.combinations(sorted(matrices), 2):
        common = sorted(set(tasks[x]) & set(tasks[y]))
        if common:
            cols = lambda s: matrices[s][:, [tasks[s].index(t) for t in common]]
            pairs[f"{x},{y}"] = (cols(x), cols(y))
    if not pairs:
        return {}, {}
    return rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=reps,
                                      random_state=seeded(seed))


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tyro
    from rliable import library as rly
    from rliable import plot_utils

    args = tyro.cli(Args, args=argv)
    if args.metric not in TAGS:
        print(f"aggregate.py: error: --metric must be eval, train or success, got {args.metric!r}", file=sys.stderr)
        return 2
    success = args.metric == "success"
    if not success and not os.path.isfile(args.random_scores):
        print(f"aggregate.py: error: --random-scores {args.random_scores!r} does not exist "
              "(python benchmarks/random_scores.py writes it)", file=sys.stderr)
        return 2
    random_scores = None
    if not success:
        with open(args.random_scores) as f:
            random_scores = json.load(f)["scores"]
    scores = {}
    for key, dirs in find_runs(args.runs).items():
        finals = [s for s in (final_score(d, args.metric, args.last_frac) for d in dirs) if s is not None]
        if finals:
            scores[key] = finals
    matrices, tasks, left_out = score_matrices(scores, random_scores)
    if not matrices:
        needs = ("" if success else f" on a task with a reference score (tasks with one: {', '.join(REFERENCE_SCORES)})")
        print(f"aggregate.py: error: no runs with a {WHAT[args.metric]} under {args.runs!r}{needs}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    what = WHAT[args.metric]
    point, interval = aggregates(matrices, args.reps, args.seed)

    fig, axes = plot_utils.plot_interval_estimates(point, interval, metric_names=list(METRICS), algorithms=sorted(matrices),
                                                   max_ticks=3, subfigure_width=4.0, row_height=0.8,
                                                   xlabel_y_coordinate=-0.7 / len(matrices),
                                                   xlabel="success rate" if success else
                                                   "normalised score (0: random policy, 1: the reference's 1M-step score)")
    fig.suptitle(f"Normalised {what} over tasks: point estimates and 95% stratified bootstrap CIs (rliable)",
                 y=1.0 + 0.5 / len(matrices), fontsize=11)
    fig.savefig(os.path.join(args.out, "aggregate_metrics.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)

    taus = np.linspace(min(0.0, min(m.min() for m in matrices.values())), max(1.0, max(m.max() for m in matrices.values())), 81)
    seeded(args.seed)
    profiles, profile_cis = rly.create_performance_profile(matrices, taus, reps=args.reps)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=profile_cis, ax=ax,
                                         xlabel=r"normalised score $\tau$", ylabel=r"fraction of runs with score $> \tau$")
    ax.set_title(f"Performance profiles of the {what} (95% CIs)", fontsize=10)
    ax.legend(sorted(matrices), loc="upper right", fontsize=8)
    fig.savefig(os.path.join(args.out, "performance_profiles.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)

    p_point, p_interval = improvement(matrices, tasks, args.reps, args.seed)
    if p_point:
        fig, ax = plt.subplots(figsize=(6, 1 + 0.6 * len(p_point)))
        plot_utils.plot_probability_of_improvement(p_point, p_interval, ax=ax, xlabel="P(X > Y)")
        ax.set_title(f"Probability of improvement, {what} (95% CIs)", fontsize=10)
        fig.savefig(os.path.join(args.out, "probability_of_improvement.png"), dpi=110, bbox_inches="tight")
        plt.close(fig)

    scale = "" if success else ", (score - random) / (reference - random)"
    lines = [f"{'Final evaluation success rates' if success else 'Normalised ' + what + 's'}{scale}, aggregated over tasks with rliable: point "
             f"estimate [95% stratified bootstrap CI, {args.reps} resamples]. Runs from `{os.path.relpath(args.runs, ROOT)}`.",
             "", "| script | tasks | runs per task | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS)]
    for script in sorted(matrices):
        cells = [f"{point[script][i]:.3f} [{interval[script][0, i]:.3f}, {interval[script][1, i]:.3f}]" for i in range(len(METRICS))]
        lines.append(f"| {script} | {', '.join(tasks[script])} | {matrices[script].shape[0]} | " + " | ".join(cells) + " |")
    if p_point:
        lines += ["", "| X | Y | P(X > Y) |", "|---|---|---|"]
        for pair, p in p_point.items():
            x, y = pair.split(",")
            lo, hi = np.ravel(p_interval[pair])
            lines.append(f"| {x} | {y} | {float(p):.3f} [{lo:.3f}, {hi:.3f}] |")
    if not success:
        lines += ["", "| task | random | reference |", "|---|---|---|"]
        for env_id in sorted({t for ts in tasks.values() for t in ts}):
            lines.append(f"| {env_id} | {random_scores[env_id]['mean']:.1f} | {REFERENCE_SCORES[env_id][0]:g} ({REFERENCE_SCORES[env_id][1]}) |")
    if left_out:
        lines += ["", f"Left out (no reference or random score): {', '.join(left_out)}."]
    with open(os.path.join(args.out, "aggregate.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
