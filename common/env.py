"""Environment construction and seeding shared by the three scripts."""

from __future__ import annotations

import difflib
import os
import random
import warnings

# Rendering is only used for videos; EGL keeps dm_control quiet on headless machines.
os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402


class ConfigError(ValueError):
    """Bad user input: the scripts print its message as one line and exit with status 2."""


_EXAMPLES = (
    "a Gymnasium MuJoCo id (Ant-v4, HalfCheetah-v4, Hopper-v4, Walker2d-v4, Humanoid-v4, "
    "HumanoidStandup-v4, Swimmer-v4, or their -v5) or a dm_control task as "
    "dm_control/<domain>-<task>-v0 (e.g. dm_control/dog-run-v0)"
)


def _register_dm_control() -> None:
    try:
        import shimmy

        gym.register_envs(shimmy)
    except ImportError:  # dm_control ids stay unknown and check_env_id says so
        pass


def check_env_id(env_id: str) -> None:
    """Raise ConfigError unless `env_id` names a registered environment (without building it)."""
    if env_id.startswith("dm_control/"):
        _register_dm_control()
    try:
        gym.spec(env_id)
    except gym.error.Error:
        if not env_id.startswith("dm_control/"):
            _register_dm_control()
        close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown --env-id {env_id!r}{hint}; use {_EXAMPLES}") from None


class _Float32Obs(gym.ObservationWrapper):
    """Cast (already flat) observations to float32, the dtype the networks use."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.observation_space
        self.observation_space = gym.spaces.Box(
            low=space.low.astype(np.float32), high=space.high.astype(np.float32), dtype=np.float32
        )

    def observation(self, observation):
        return np.asarray(observation, dtype=np.float32)


def make_env(env_id: str, seed: int) -> gym.Env:
    """Build one env with flat float32 observations, actions in [-1, 1] and episode statistics.

    The caller seeds the dynamics with the first `env.reset(seed=seed)`; the spaces are seeded here.
    Episodes end with `terminated` (a true end: do not bootstrap) or `truncated` (a time limit:
    bootstrap), kept apart as Gymnasium reports them; dm_control episodes only ever truncate.
    """
    check_env_id(env_id)
    with warnings.catch_warnings():
        # v4 tasks are the papers' benchmarks; Gymnasium's "out of date" notice is noise here.
        warnings.filterwarnings("ignore", message=".*out of date.*")
        env = gym.make(env_id)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise ConfigError(f"--env-id {env_id!r} has a {type(env.action_space).__name__} action space; only continuous (Box) actions are supported")
    if isinstance(env.observation_space, gym.spaces.Dict) or len(env.observation_space.shape) != 1:
        env = gym.wrappers.FlattenObservation(env)
    env = _Float32Obs(env)
    low, high = env.action_space.low, env.action_space.high
    if not (np.all(low == -1.0) and np.all(high == 1.0)):
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    env.observation_space.seed(seed)
    return env


def seed_everything(seed: int):
    """Seed Python's and numpy's global generators; return the root JAX key."""
    import jax

    random.seed(seed)
    np.random.seed(seed)
    return jax.random.PRNGKey(seed)


def env_step(env: gym.Env, obs: np.ndarray, action: np.ndarray):
    """Step `env` once. Returns the transition to store, the observation to act on next and the
    finished episode's statistics (None mid-episode).

    The stored `next_obs` is the true successor even when the episode ends (the reset comes after),
    and only `terminated` is stored: a time-limit truncation must still bootstrap from `next_obs`.
    """
    next_obs, reward, terminated, truncated, info = env.step(action)
    transition = (obs, np.asarray(action, np.float32), np.float32(reward), next_obs, np.float32(terminated))
    episode = None
    if terminated or truncated:
        episode = info.get("episode")
        next_obs, _ = env.reset()
    return transition, next_obs, episode


def evaluate(env: gym.Env, act, actor_params, key, episodes: int):
    """Run `episodes` whole episodes with `act(actor_params, obs, key) -> (action, key)`; return the
    undiscounted returns and the advanced key."""
    returns = []
    for _ in range(episodes):
        obs, _ = env.reset()
        done, total = False, 0.0
        while not done:
            action, key = act(actor_params, obs, key)
            obs, reward, terminated, truncated, _ = env.step(np.asarray(action))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns, key
