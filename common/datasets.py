"""Demonstration datasets for the offline-to-online pipeline (`--dataset`).

Two layouts are read, each by its own loader:
- OGBench `.npz`: `observations` (N, obs), `actions` (N, act) and `terminals` (N,), where terminals
  marks the last row of each trajectory. Without `next_observations` (OGBench's own files), row t's
  successor is row t + 1 and a trajectory's last row has none, so it is dropped, as OGBench's
  `load_dataset` does. `rewards` and `masks` (1 - terminated) are read when present; OGBench's
  official files have neither, and for its single-task envs they are relabelled from `qpos` with
  OGBench's own `relabel_dataset`, as its `make_env_and_datasets` does.
- Robomimic low-dimensional `.hdf5`: `data/demo_<i>/{actions, rewards, dones, obs/<key>, next_obs/<key>}`;
  the observation is the concatenation of the obs keys (Robomimic's low-dim keys by default).

Both give float32 transitions: obs, actions (rescaled to the env's [-1, 1] as make_env rescales the
env), rewards, next_obs, terminated (do not bootstrap) and ends (the next row does not continue this
trajectory). Anything wrong with the file is a ConfigError of one line. `robomimic_task` tells whether a
run is a Robomimic task (by its env id or the .hdf5's recorded env), whose rewards the authors shift.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import gymnasium as gym
import numpy as np

from common.args import ConfigError
from common.env import check_env_id

ROBOMIMIC_LOW_DIM_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated", "ends")
# Robomimic's tasks: as the authors name them in env ids ("lift-mh-low_dim") and as robosuite names its envs
# in a dataset's data.attrs["env_args"] ({"env_name": "Lift", "type": 1, ...}; type 1 is robosuite).
ROBOMIMIC_ID = re.compile(r"(lift|can|square|transport|tool_hang)-(mh|ph)-low_dim")
ROBOSUITE_TASKS = {"Lift": "lift", "PickPlaceCan": "can", "NutAssemblySquare": "square", "TwoArmTransport": "transport",
                   "ToolHang": "tool_hang"}


def _make_raw(env_id: str) -> gym.Env:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*out of date.*")  # v4 tasks are the papers' benchmarks
        return gym.make(env_id)


def raw_env_spaces(env_id: str):
    """The env's observation size and its action bounds before make_env rescales them to [-1, 1]."""
    check_env_id(env_id)
    env = _make_raw(env_id)
    try:
        obs_dim = int(gym.spaces.flatdim(env.observation_space))
        return obs_dim, env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
    finally:
        env.close()


def load_dataset(path: str, env_id: str, obs_keys: tuple[str, ...] | None = None) -> dict:
    """Read `path` (.npz or .hdf5/.h5), check it against `env_id` and return its transitions."""
    if not os.path.isfile(path):
        raise ConfigError(f"--dataset {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        data = load_ogbench_npz(path, env_id)
    elif ext in (".hdf5", ".h5"):
        data = load_robomimic_hdf5(path, obs_keys)
    else:
        raise ConfigError(f"--dataset {path!r}: unknown extension {ext!r}; use an OGBench .npz or a Robomimic .hdf5")
    return check_against_env(data, path, env_id)


def _bad(path: str, what: str) -> ConfigError:
    return ConfigError(f"--dataset {path!r}: {what}")


def load_ogbench_npz(path: str, env_id: str) -> dict:
    try:
        file = np.load(path, allow_pickle=False)
        raw = {k: np.asarray(file[k]) for k in file.files}
    except Exception as e:  # zipfile, pickle and value errors all mean "not a readable .npz"
        raise _bad(path, f"cannot be read as a .npz ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for key in ("observations", "actions", "terminals"):
        if key not in raw:
            raise _bad(path, f"has no key {key!r} (an OGBench .npz holds observations, actions, terminals; it has {sorted(raw)})")
    n = len(raw["observations"])
    for key, value in raw.items():
        if value.ndim == 0 or len(value) != n:
            raise _bad(path, f"{key!r} has {0 if value.ndim == 0 else len(value)} rows, observations has {n}")
    if raw["observations"].ndim != 2 or raw["actions"].ndim != 2:
        raise _bad(path, "observations and actions must be 2-D (rows, features)")
    last = raw["terminals"].astype(bool)

    if "next_observations" in raw:  # every row is a transition; terminals ends its trajectory
        rows, next_obs = np.arange(n), raw["next_observations"]
    else:  # OGBench's compact layout: a trajectory's last row has no successor
        rows = np.flatnonzero(~last)
        if len(rows) and rows[-1] + 1 >= n:
            raise _bad(path, "the last row is not marked in 'terminals' but has no next row")
        next_obs = raw["observations"][rows + 1]
    ends = last[rows] if "next_observations" in raw else last[rows + 1]
    data = {"obs": raw["observations"][rows], "actions": raw["actions"][rows], "next_obs": next_obs, "ends": ends}

    if "rewards" in raw:
        data["rewards"] = raw["rewards"][rows]
        data["terminated"] = 1.0 - raw["masks"][rows] if "masks" in raw else np.zeros(len(rows))
    elif "qpos" in raw:
        data["rewards"], data["terminated"] = _ogbench_relabel(path, env_id, raw, rows)
    else:
        raise _bad(path, "has no key 'rewards' (nor 'qpos' to relabel an OGBench single-task reward from)")
    return data


def _ogbench_relabel(path: str, env_id: str, raw: dict, rows) -> tuple[np.ndarray, np.ndarray]:
    """OGBench's single-task rewards and masks, computed by OGBench from the dataset's simulator states."""
    if "singletask" not in env_id:
        raise _bad(path, f"has no 'rewards'; relabelling from 'qpos' needs an OGBench single-task env, not {env_id!r}")
    from ogbench.relabel_utils import relabel_dataset

    labelled = {k: raw[k][rows] for k in ("qpos", "qvel", "button_states") if k in raw}
    env = _make_raw(env_id)
    try:
        relabel_dataset(env_id, env, labelled)
    except (KeyError, IndexError, ValueError) as e:
        raise _bad(path, f"cannot relabel rewards for {env_id} from its 'qpos' ({type(e).__name__}: {e})") from None
    finally:
        env.close()
    return labelled["rewards"], 1.0 - labelled["masks"]


def _demo_number(name: str) -> int:
    match = re.fullmatch(r"demo_(\d+)", name)
    return int(match.group(1)) if match else -1


def load_robomimic_hdf5(path: str, obs_keys: tuple[str, ...] | None) -> dict:
    import h5py

    try:
        file = h5py.File(path, "r")
    except Exception as e:
        raise _bad(path, f"cannot be read as HDF5 ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    with file:
        if "data" not in file or not isinstance(file["data"], h5py.Group):
            raise _bad(path, f"has no group 'data' (a Robomimic file holds data/demo_<i>; it has {sorted(file.keys())})")
        demos = sorted((name for name in file["data"] if _demo_number(name) >= 0), key=_demo_number)
        if not demos:
            raise _bad(path, "has no data/demo_<i> groups")
        first_obs = file["data"][demos[0]].get("obs")
        if first_obs is None:
            raise _bad(path, f"data/{demos[0]} has no group 'obs'")
        if obs_keys is None:  # Robomimic's low-dim keys where the file has them, else every key by name
            present = set(first_obs.keys())
            obs_keys = ROBOMIMIC_LOW_DIM_KEYS if present.issuperset(ROBOMIMIC_LOW_DIM_KEYS) else tuple(sorted(present))
        parts = {f: [] for f in FIELDS}
        for name in demos:
            demo = file["data"][name]
            for key in ("actions", "rewards", "dones", "obs"):
                if key not in demo:
                    raise _bad(path, f"data/{name} has no {key!r}")

            def stacked(group_name: str):
                group = demo[group_name]
                missing = [k for k in obs_keys if k not in group]
                if missing:
                    raise _bad(path, f"data/{name}/{group_name} has no key {missing[0]!r} (it has {sorted(group.keys())})")
                return np.concatenate([np.asarray(group[k], np.float64).reshape(len(group[k]), -1) for k in obs_keys], axis=1)

            obs = stacked("obs")
            actions, rewards, dones = np.asarray(demo["actions"]), np.asarray(demo["rewards"]), np.asarray(demo["dones"])
            t = len(actions)
            if not (len(obs) == len(rewards) == len(dones) == t):
                raise _bad(path, f"data/{name}: obs, actions, rewards and dones have {len(obs)}, {t}, {len(rewards)}, {len(dones)} rows")
            if "next_obs" in demo:
                next_obs = stacked("next_obs")
            else:  # the successor of step i is step i + 1; the demo's last step has none
                obs, next_obs, actions, rewards, dones, t = obs[:-1], obs[1:], actions[:-1], rewards[:-1], dones[:-1], t - 1
            ends = np.zeros(t)
            ends[-1:] = 1.0
            for field, value in zip(FIELDS, (obs, actions, rewards, next_obs, dones, ends)):
                parts[field].append(value)
    print(f"--dataset: {len(demos)} Robomimic demos, observation = {' + '.join(obs_keys)}")
    return {f: np.concatenate(v) for f, v in parts.items()}


def check_against_env(data: dict, path: str, env_id: str) -> dict:
    """Sizes against the env, finite values, actions inside the env's bounds (then rescaled to [-1, 1])."""
    obs_dim, low, high = raw_env_spaces(env_id)
    n = len(data["obs"])
    if n == 0:
        raise _bad(path, "holds no transitions")
    if data["obs"].shape[1] != obs_dim or data["next_obs"].shape[1] != obs_dim:
        raise _bad(path, f"observations have {data['obs'].shape[1]} features but {env_id} observes {obs_dim}")
    if data["actions"].ndim != 2 or data["actions"].shape[1] != len(low):
        raise _bad(path, f"actions have {data['actions'].shape[1:]} features but {env_id} takes {len(low)}")
    out = {}
    for field in FIELDS:
        value = np.asarray(data[field], np.float64)
        if len(value) != n:
            raise _bad(path, f"{field} has {len(value)} rows, observations has {n}")
        if not np.all(np.isfinite(value)):
            raise _bad(path, f"{field} holds NaN or infinite values")
        out[field] = value
    tol = 1e-3 * (high - low)
    if np.any(out["actions"] < low - tol) or np.any(out["actions"] > high + tol):
        raise _bad(path, f"actions reach [{out['actions'].min():.3g}, {out['actions'].max():.3g}], outside {env_id}'s "
                         f"bounds [{low.min():.3g}, {high.max():.3g}]")
    out["actions"] = np.clip(2.0 * (out["actions"] - low) / (high - low) - 1.0, -1.0, 1.0)
    out["ends"][-1] = 1.0  # nothing follows the dataset's last row
    return {k: v.astype(np.float32) for k, v in out.items()}


def robomimic_task(env_id: str, path: str | None = None) -> str | None:
    """The Robomimic task of a run (lift, can, square, ...), or None when it is not one: read from an env id in
    the authors' naming (`lift-mh-low_dim`), else from an .hdf5 whose data.attrs["env_args"] says it was recorded
    in robosuite (Robomimic's own files do; the files benchmarks/make_dataset.py writes say "gymnasium")."""
    match = ROBOMIMIC_ID.fullmatch(env_id)
    if match:
        return match.group(1)
    if path is None or os.path.splitext(path)[1].lower() not in (".hdf5", ".h5") or not os.path.isfile(path):
        return None
    import h5py

    try:
        with h5py.File(path, "r") as file:
            raw = file["data"].attrs.get("env_args") if "data" in file else None
    except OSError:
        return None
    try:
        env_args = json.loads(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else {}
    except (TypeError, ValueError):
        return None
    if not isinstance(env_args, dict) or env_args.get("type") != 1:
        return None
    name = str(env_args.get("env_name", ""))
    return ROBOSUITE_TASKS.get(name, name.lower() or "robosuite")
