"""Gradient ablation of SAC Flow (the paper's Fig. 13a-b): naive SAC Flow (plain MLP velocity),
Flow-G and Flow-T trained briefly on one task with the same critic and budget.

For each variant it plots the norm of the actor-loss gradient at every rollout step's intermediate
action x_k (averaged over the logged points after learning starts; the naive flow's norm grows
along the backward pass, k = K-1 -> 0, the gated and decoded ones stay flat), how the gradient at
x_0 (the deepest point of the backward pass) evolves during training, and the returns.

    python benchmarks/gradient_ablation.py --env-id Hopper-v4 --total-timesteps 100000

Each variant logs to runs/ like a normal run; the figure and a JSON summary go to --out.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Literal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

Variant = Literal["naive", "flow_g", "flow_t"]
LABELS = {"naive": "naive SAC Flow (MLP velocity)", "flow_g": "SAC Flow-G (gated)", "flow_t": "SAC Flow-T (decoded)"}


@dataclass
class Args:
    env_id: str = "Hopper-v4"
    """task shared by all variants"""
    seed: int = 1
    """seed of every run"""
    total_timesteps: int = 100_000
    """env steps per variant"""
    learning_starts: int = 10_000
    """random-action steps before the first update"""
    buffer_size: int = 1_000_000
    """replay capacity (at most --total-timesteps is used)"""
    batch_size: int = 256
    """batch size of every gradient step"""
    flow_steps: int = 4
    """rollout steps K (the number of gradient curves per variant)"""
    drift: Literal["plain", "marginal"] = "plain"
    """drift of the noisy rollout"""
    critic_width: int = 256
    """width of the critics' hidden layers (1024 in the paper)"""
    hidden_dim: int = 256
    """hidden width of the naive MLP and of Flow-G's gate and candidate (512 in the paper)"""
    log_std_hidden: int = 256
    """hidden width of the log-std head"""
    d_model: int = 96
    """Flow-T token width"""
    n_heads: int = 4
    """Flow-T attention heads"""
    n_layers: int = 2
    """Flow-T decoder blocks"""
    log_every: int = 1000
    """log losses and gradient norms every this many env steps"""
    eval_every: int = 10_000
    """deterministic evaluation every this many env steps"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    variants: tuple[Variant, ...] = ("naive", "flow_g", "flow_t")
    """which variants to train"""
    out: str = "benchmarks/gradient_ablation.png"
    """the figure; the summary goes beside it as .json"""
    progress: bool = True
    """show progress bars"""


def run_variant(args: Args, variant: str) -> str:
    """Train one variant through its script's own train(); return its run folder."""
    import sac_flow_g
    import sac_flow_t

    module = sac_flow_t if variant == "flow_t" else sac_flow_g
    common = dict(env_id=args.env_id, seed=args.seed, total_timesteps=args.total_timesteps,
                  learning_starts=args.learning_starts, buffer_size=min(args.buffer_size, args.total_timesteps),
                  batch_size=min(args.batch_size, args.total_timesteps), flow_steps=args.flow_steps, drift=args.drift,
                  critic_width=args.critic_width, log_std_hidden=args.log_std_hidden, log_every=args.log_every,
                  eval_every=args.eval_every, eval_episodes=args.eval_episodes, progress=args.progress,
                  exp_name=f"ablation_{variant}")
    if variant == "flow_t":
        run_args = module.Args(d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers, **common)
    else:
        run_args = module.Args(velocity="mlp" if variant == "naive" else "gated", hidden_dim=args.hidden_dim, **common)
    module.check_args(run_args)
    return module.train(run_args)["run_dir"]


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def summarise(scalars: dict, flow_steps: int) -> dict:
    import numpy as np

    steps = [scalars.get(f"grad/step_{k}", []) for k in range(flow_steps)]
    mean_norms = [float(np.mean([v for _, v in pts])) if pts else float("nan") for pts in steps]
    returns = [v for _, v in scalars.get("charts/episodic_return", [])]
    evals = scalars.get("eval/episodic_return", [])
    return {"grad_norm_per_step": mean_norms,
            "grad_norm_ratio_step0_to_last": mean_norms[0] / mean_norms[-1] if mean_norms[-1] else float("nan"),
            "final_train_return_mean10": float(np.mean(returns[-10:])) if returns else float("nan"),
            "final_eval_return": evals[-1][1] if evals else float("nan")}


def plot(args: Args, results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ks = np.arange(args.flow_steps)
    for variant, (scalars, summary) in results.items():
        label = LABELS[variant]
        axes[0].plot(ks, summary["grad_norm_per_step"], marker="o", label=label)
        pts = scalars.get("grad/step_0", [])
        if pts:
            axes[1].plot([s for s, _ in pts], [v for _, v in pts], label=label)
        train = scalars.get("charts/episodic_return", [])
        if train:
            x, y = np.array([s for s, _ in train]), np.array([v for _, v in train])
            window = max(1, len(y) // 50)
            smooth = np.convolve(y, np.ones(window) / window, mode="valid")
            line, = axes[2].plot(x[window - 1:], smooth, label=f"{label} (train)")
            evals = scalars.get("eval/episodic_return", [])
            if evals:
                axes[2].plot([s for s, _ in evals], [v for _, v in evals], "o--", color=line.get_color(), label=f"{label} (eval)")
    axes[0].set(xlabel="rollout step k (backward pass runs K-1 -> 0)", ylabel="mean ||d actor loss / d x_k||",
                yscale="log", title="gradient norm per rollout step", xticks=ks)
    axes[1].set(xlabel="env step", ylabel="||d actor loss / d x_0||", yscale="log", title="gradient at x_0 during training")
    axes[2].set(xlabel="env step", ylabel="episodic return", title=f"returns on {args.env_id}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"SAC Flow gradient ablation: {args.env_id}, K = {args.flow_steps}, {args.total_timesteps} steps, seed {args.seed}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    import tyro

    from common.args import ConfigError

    args = tyro.cli(Args, args=argv)
    try:
        if not args.variants:
            raise ConfigError("--variants must name at least one of naive, flow_g, flow_t")
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise ConfigError(f"--out {args.out!r}: folder {out_dir!r} does not exist")
        results = {}
        for variant in args.variants:
            print(f"== {LABELS[variant]}")
            scalars = read_scalars(run_variant(args, variant))
            results[variant] = (scalars, summarise(scalars, args.flow_steps))
    except ConfigError as e:
        print(f"{os.path.basename(__file__)}: error: {e}", file=sys.stderr)
        return 2
    plot(args, results, args.out)
    summary = {variant: s for variant, (_, s) in results.items()}
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}, "results": summary}, f, indent=2)
    for variant, s in summary.items():
        norms = ", ".join(f"{n:.3g}" for n in s["grad_norm_per_step"])
        print(f"{variant}: grad norm per step [{norms}]; final train return {s['final_train_return_mean10']:.1f}, "
              f"eval {s['final_eval_return']:.1f}")
    print(f"figure saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
