"""Generate a small demonstration dataset for sac_flow_o2o.py --dataset, in OGBench's .npz or Robomimic's .hdf5 layout.

The official datasets (OGBench's cube-double-play-v0 and the like, Robomimic's MH low-dim files) are
downloaded by their own tools (docs/sac_flow_o2o.md); this script makes small ones wherever no download
is possible, by rolling out a scripted policy in the env:
- OGBench cube envs (`cube-double-singletask-task2-v0`, or any cube-*): OGBench's own Markov cube
  oracle with Gaussian action noise, in the env's data-collection mode, where it keeps picking a new
  target for a random cube: the "play" data OGBench's datasets hold. The .npz has OGBench's official
  keys (observations, actions, terminals, qpos, qvel, no rewards: they are relabelled for the task on
  loading, as OGBench does); the .hdf5 gets the task's rewards from OGBench's relabelling.
- Gymnasium MuJoCo envs (Hopper-v4, ...): a fixed random linear feedback policy a = tanh(W s + b) plus
  Gaussian noise, a scripted, state-dependent behaviour that a policy can learn to imitate.

    python benchmarks/make_dataset.py --env-id cube-double-singletask-task2-v0 --steps 20000 --out data/cube.npz
    python benchmarks/make_dataset.py --env-id Hopper-v4 --steps 5000 --out data/hopper.hdf5
    python benchmarks/make_dataset.py --env-id Hopper-v4 --steps 5000 --out data/hopper.npz data/hopper.hdf5  # both, same rollouts
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.env import ConfigError, check_env_id  # noqa: E402


def ogbench_base_id(env_id: str) -> str:
    """cube-double-singletask-task2-v0 -> cube-double-v0 (the env OGBench collects its data in)."""
    return re.sub(r"-singletask(-task\d+)?", "", env_id)


def cube_play(env_id: str, steps: int, episode_length: int, noise: float, seed: int) -> list[dict]:
    import gymnasium as gym
    from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle

    env = gym.make(ogbench_base_id(env_id), mode="data_collection", terminate_at_goal=False,
                   max_episode_steps=episode_length + 1)
    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # the oracle draws its waypoints from numpy's global generator
    trajectories, total = [], 0
    while total < steps:
        obs, info = env.reset(seed=int(rng.integers(2**31)))
        oracle = CubeMarkovOracle(env=env, min_norm=0.4)
        oracle.reset(obs, info)
        traj = {"observations": [obs], "actions": [], "qpos": [info["qpos"]], "qvel": [info["qvel"]]}
        for _ in range(min(episode_length, steps - total)):
            action = np.clip(oracle.select_action(obs, info) + rng.normal(0.0, noise, env.action_space.shape), -1.0, 1.0)
            obs, _, _, _, info = env.step(action)
            traj["actions"].append(action)
            traj["observations"].append(obs)
            traj["qpos"].append(info["qpos"])
            traj["qvel"].append(info["qvel"])
            if oracle.done:  # a new target for the next cube, as OGBench's play data does
                env.unwrapped.set_new_target()
                oracle.reset(obs, info)
        total += len(traj["actions"])
        trajectories.append(traj)
    env.close()
    return trajectories


def linear_policy_rollouts(env_id: str, steps: int, episode_length: int, noise: float, seed: int) -> list[dict]:
    import gymnasium as gym

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*out of date.*")  # v4 tasks are the papers' benchmarks
        env = gym.make(env_id, max_episode_steps=episode_length)
    rng = np.random.default_rng(seed)
    obs_dim, (low, high) = env.observation_space.shape[0], (env.action_space.low, env.action_space.high)
    w = rng.normal(0.0, 1.0 / np.sqrt(obs_dim), (len(low), obs_dim))
    b = rng.normal(0.0, 0.3, len(low))
    trajectories, total = [], 0
    while total < steps:
        obs, _ = env.reset(seed=int(rng.integers(2**31)))
        traj = {"observations": [obs], "actions": [], "rewards": [], "terminated": []}
        for _ in range(steps - total):
            unit = np.clip(np.tanh(w @ obs + b) + rng.normal(0.0, noise, len(low)), -1.0, 1.0)
            action = low + (unit + 1.0) * 0.5 * (high - low)  # in the env's own bounds, as recorded demonstrations are
            obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(("actions", "observations", "rewards", "terminated"), (action, obs, reward, terminated)):
                traj[key].append(value)
            if terminated or truncated:
                break
        total += len(traj["actions"])
        trajectories.append(traj)
    env.close()
    return trajectories


def relabel_cube(env_id: str, traj: dict) -> tuple[np.ndarray, np.ndarray]:
    """The single task's rewards and terminations of a cube trajectory, by OGBench's own relabelling."""
    import gymnasium as gym
    from ogbench.relabel_utils import relabel_dataset

    labelled = {"qpos": np.asarray(traj["qpos"][:-1])}
    env = gym.make(env_id)
    relabel_dataset(env_id, env, labelled)
    env.close()
    return labelled["rewards"], 1.0 - labelled["masks"]


def save_npz(path: str, trajectories: list[dict]) -> None:
    """OGBench's layout: each trajectory's observations with one more row than its actions; the last row
    of each is marked in `terminals` and holds a zero action (OGBench's files hold the next step's)."""
    out = {"observations": [], "actions": [], "terminals": []}
    extra = [k for k in ("qpos", "qvel") if k in trajectories[0]]
    labelled = "rewards" in trajectories[0]
    out.update({k: [] for k in extra + (["rewards", "masks"] if labelled else [])})
    for traj in trajectories:
        t = len(traj["actions"])
        out["observations"].append(np.asarray(traj["observations"], np.float32))
        out["actions"].append(np.concatenate([np.asarray(traj["actions"], np.float32), np.zeros((1, len(traj["actions"][0])), np.float32)]))
        out["terminals"].append(np.eye(1, t + 1, t, dtype=np.float32)[0])
        for k in extra:
            out[k].append(np.asarray(traj[k], np.float32))
        if labelled:
            out["rewards"].append(np.append(np.asarray(traj["rewards"], np.float32), 0.0))
            out["masks"].append(np.append(1.0 - np.asarray(traj["terminated"], np.float32), 1.0))
    np.savez_compressed(path, **{k: np.concatenate(v) for k, v in out.items()})


def save_hdf5(path: str, trajectories: list[dict], env_id: str) -> None:
    """Robomimic's low-dim layout: data/demo_<i>/{obs/state, next_obs/state, actions, rewards, dones}."""
    import h5py

    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        total = 0
        for i, traj in enumerate(trajectories):
            if "rewards" in traj:
                rewards, dones = np.asarray(traj["rewards"]), np.asarray(traj["terminated"], np.float64)
            else:
                rewards, dones = relabel_cube(env_id, traj)
            obs = np.asarray(traj["observations"], np.float64)
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = len(traj["actions"])
            demo.create_dataset("obs/state", data=obs[:-1])
            demo.create_dataset("next_obs/state", data=obs[1:])
            demo.create_dataset("actions", data=np.asarray(traj["actions"], np.float64))
            demo.create_dataset("rewards", data=rewards)
            demo.create_dataset("dones", data=dones.astype(np.int64))
            total += len(traj["actions"])
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps({"env_name": env_id, "type": "gymnasium"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-id", required=True, help="an OGBench cube env or a Gymnasium MuJoCo env")
    p.add_argument("--out", required=True, nargs="+", help="output path(s) ending in .npz (OGBench layout) or .hdf5 (Robomimic "
                   "layout); several paths get the same rollouts")
    p.add_argument("--steps", type=int, default=10_000, help="transitions to record")
    p.add_argument("--episode-length", type=int, default=None, help="steps per trajectory (default 1000 for cube play, "
                   "the env's time limit otherwise)")
    p.add_argument("--noise", type=float, default=0.2, help="std of the Gaussian noise on the scripted actions")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        for out in a.out:
            if os.path.splitext(out)[1].lower() not in (".npz", ".hdf5", ".h5"):
                raise ConfigError(f"--out {out!r} must end in .npz or .hdf5")
        if a.steps <= 0 or a.noise < 0:
            raise ConfigError(f"--steps must be positive and --noise >= 0, got {a.steps} and {a.noise}")
        check_env_id(a.env_id)
        if a.env_id.startswith("cube-"):
            trajectories = cube_play(a.env_id, a.steps, a.episode_length or 1000, a.noise, a.seed)
        elif "singletask" in a.env_id or a.env_id.startswith(("scene-", "puzzle-")):
            raise ConfigError(f"--env-id {a.env_id!r}: only OGBench cube envs have a scripted oracle here")
        else:
            import gymnasium as gym

            length = a.episode_length or gym.spec(a.env_id).max_episode_steps or 1000
            trajectories = linear_policy_rollouts(a.env_id, a.steps, length, a.noise, a.seed)
    except ConfigError as e:
        print(f"make_dataset.py: error: {e}", file=sys.stderr)
        return 2
    n = sum(len(t["actions"]) for t in trajectories)
    for out in a.out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if os.path.splitext(out)[1].lower() == ".npz":
            save_npz(out, trajectories)
        else:
            save_hdf5(out, trajectories, a.env_id)
        print(f"{out}: {n} transitions in {len(trajectories)} trajectories of {a.env_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
