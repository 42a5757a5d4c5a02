"""The score of a uniformly random policy per task: the zero of the normalised scores of aggregate.py.

    python benchmarks/random_scores.py                      # the tasks of REFERENCE.md section 3 -> results/random_scores.json
    python benchmarks/random_scores.py --env-ids Hopper-v4 --episodes 20 --out /tmp/r.json

Each episode acts with actions drawn uniformly from the env's action box (seeded: episode i of a task
resets with seed --seed + i and samples from an action space seeded the same way) until the env ends
it, through common/env.py's make_env, as the training scripts see the task. The JSON holds, per task,
the mean and std of the episode returns and their number.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The tasks with a reference score in REFERENCE.md section 3 (aggregate.REFERENCE_SCORES).
TASKS = ["Ant-v4", "HalfCheetah-v4", "Hopper-v4", "Humanoid-v4", "Swimmer-v4", "Walker2d-v4", "dm_control/dog-stand-v0"]


@dataclass
class Args:
    env_ids: list[str] = field(default_factory=lambda: list(TASKS))
    """tasks to measure"""
    episodes: int = 20
    """random episodes per task"""
    seed: int = 0
    """seed of the first episode (episode i uses seed + i)"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "random_scores.json")
    """where the JSON goes"""


def random_returns(env_id: str, episodes: int, seed: int) -> list[float]:
    from common.env import make_env

    env = make_env(env_id, seed)
    returns = []
    try:
        for i in range(episodes):
            env.reset(seed=seed + i)
            env.action_space.seed(seed + i)
            total, done = 0.0, False
            while not done:
                _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return returns


def main(argv=None) -> int:
    import tyro

    args = tyro.cli(Args, args=argv)
    if args.episodes < 1:
        print(f"random_scores.py: error: --episodes must be at least 1, got {args.episodes}", file=sys.stderr)
        return 2
    from common.env import ConfigError, check_env_id

    try:
        for env_id in args.env_ids:
            check_env_id(env_id)
    except ConfigError as e:
        print(f"random_scores.py: error: {e}", file=sys.stderr)
        return 2
    scores = {}
    for env_id in args.env_ids:
        returns = random_returns(env_id, args.episodes, args.seed)
        scores[env_id] = {"mean": float(np.mean(returns)), "std": float(np.std(returns)), "episodes": len(returns)}
        print(f"{env_id}: {scores[env_id]['mean']:.2f} +- {scores[env_id]['std']:.2f} over {len(returns)} random episodes")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"what": "episode return of uniformly random actions (benchmarks/random_scores.py)", "seed": args.seed,
                   "scores": scores}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
