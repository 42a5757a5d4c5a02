"""Environment construction, seeding, stepping and evaluation shared by the four scripts."""

from __future__ import annotations

import ctypes.util
import difflib
import importlib
import json
import os
import random
import warnings

# MuJoCo and dm_control load the GL backend MUJOCO_GL names when they are imported, and one whose library is missing
# fails that import, training or not. Rendering is only for videos: headless EGL where libEGL is found, else none.
if "MUJOCO_GL" not in os.environ:
    os.environ["MUJOCO_GL"] = "egl" if ctypes.util.find_library("EGL") else "disable"

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

from common.args import ConfigError  # noqa: E402  (the scripts' bad-input error; re-exported)


_EXAMPLES = (
    "a Gymnasium MuJoCo id (Ant-v4, HalfCheetah-v4, Hopper-v4, Walker2d-v4, Humanoid-v4, "
    "HumanoidStandup-v4, Swimmer-v4, or their -v5) or a dm_control task as "
    "dm_control/<domain>-<task>-v0 (e.g. dm_control/dog-run-v0)"
)
_OGBENCH_EXAMPLE = ", or an OGBench single-task env (e.g. cube-double-singletask-task2-v0)"
RENDER_HELP = ("MuJoCo renders headless through EGL (MUJOCO_GL=egl, the default where libEGL is found): install "
               "libEGL (Debian/Ubuntu: apt install libegl1 libgl1), or run with MUJOCO_GL=osmesa and libosmesa6")


def _runnable(env_id: str) -> bool:
    """Whether a registered id can be built here: Gymnasium keeps the MuJoCo v2/v3 ids registered with an
    entry point that only raises (they need mujoco-py)."""
    entry = gym.spec(env_id).entry_point
    return not (callable(entry) and "mujoco_py" in getattr(entry, "__name__", ""))


# MyoSuite 3.0 requires gymnasium < 1.3, which requirements.txt's pins exclude: it installs in an environment of its own.
MYOSUITE_INSTALL = "pip install -r requirements.txt 'myosuite==3.0.0' 'gymnasium[mujoco]<1.3'"


def _register(package: str) -> bool:
    """Import an optional env package, which registers its ids (shimmy's, dm_control's, are registered by hand);
    False where it is not installed (its ids stay unknown, and check_env_id says so)."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        return False
    if package == "shimmy":
        gym.register_envs(module)
    return True


def check_env_id(env_id: str, ogbench: bool = False) -> None:
    """Raise ConfigError unless `env_id` names a registered environment that can be built here (without
    building it); the message suggests only such ids, and OGBench's with `ogbench` (the offline-to-online script)."""
    if env_id.startswith("dm_control/"):
        _register("shimmy")
    elif env_id.startswith("myo") and not _register("myosuite"):
        raise ConfigError(f"--env-id {env_id!r} is a MyoSuite task, and myosuite is not installed; it requires gymnasium < 1.3, "
                          f"which this project's pins exclude, so install it in an environment of its own: {MYOSUITE_INSTALL}")
    elif "singletask" in env_id or env_id.startswith(("cube-", "scene-", "puzzle-")):
        _register("ogbench")
    try:
        if _runnable(env_id):
            return
        why = f"--env-id {env_id!r} needs mujoco-py, which Gymnasium 1.x dropped (its v4 and v5 tasks run)"
    except gym.error.Error:
        why = f"unknown --env-id {env_id!r}"
    if not env_id.startswith("dm_control/"):
        _register("shimmy")
        _register("ogbench")
    runnable = [k for k in gym.registry.keys() if _runnable(k)]
    close = difflib.get_close_matches(env_id, runnable, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"{why}{hint}; use {_EXAMPLES}{_OGBENCH_EXAMPLE if ogbench else ''}")


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


def make_env(env_id: str, seed: int, render: bool = False) -> gym.Env:
    """One env with flat float32 observations, actions in [-1, 1], episode statistics and a savable state.
    The caller seeds the dynamics with the first `env.reset(seed=seed)`; the spaces are seeded here.
    `terminated` (do not bootstrap) and `truncated` (a time limit) stay apart, as Gymnasium reports them.
    `render=True`: `env.render()` returns RGB frames (--capture-video)."""
    check_env_id(env_id)
    try:
        import mujoco  # noqa: F401  (its import loads MUJOCO_GL's backend, which gym.make would fail on deep inside)
    except Exception as e:  # PyOpenGL raises AttributeError for a missing library, mujoco RuntimeError for a bad name
        raise ConfigError(f"MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: MuJoCo cannot load that GL backend ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); MUJOCO_GL=disable trains without videos. "
                          f"{RENDER_HELP}") from None
    with warnings.catch_warnings():
        # v4 tasks are the papers' benchmarks; Gymnasium's "out of date" notice is noise here.
        warnings.filterwarnings("ignore", message=".*out of date.*")
        env = gym.make(env_id, render_mode="rgb_array" if render else None)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise ConfigError(f"--env-id {env_id!r} has a {type(env.action_space).__name__} action space; only continuous (Box) actions are supported")
    if isinstance(env.observation_space, gym.spaces.Dict) or len(env.observation_space.shape) != 1:
        env = gym.wrappers.FlattenObservation(env)
    env = _Float32Obs(env)
    low, high = env.action_space.low, env.action_space.high
    if not (np.all(low == -1.0) and np.all(high == 1.0)):
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
    env = EpisodeReplay(gym.wrappers.RecordEpisodeStatistics(env))
    env.action_space.seed(seed)
    env.observation_space.seed(seed)
    return env


def rng_state(rng) -> str:
    """The state of a numpy Generator or RandomState as JSON (Python's ints hold PCG64's 128 bits)."""
    if isinstance(rng, np.random.RandomState):
        state = rng.get_state(legacy=False)
        state["state"]["key"] = state["state"]["key"].tolist()
        return json.dumps(state)
    return json.dumps(rng.bit_generator.state)


def set_rng_state(rng, state: str) -> None:
    state = json.loads(state)
    if isinstance(rng, np.random.RandomState):
        state["state"]["key"] = np.asarray(state["state"]["key"], np.uint32)
        rng.set_state(state)
    else:
        rng.bit_generator.state = state


class EpisodeReplay(gym.Wrapper):
    """Makes the env's state savable mid-episode. Gymnasium's MuJoCo envs pickle as their constructor arguments,
    not their state, so this keeps what rebuilds it: the reset's seed (or the RNG state before it) and the actions
    since. MuJoCo is deterministic: replaying them restores the simulator and every wrapper's counters bit for
    bit. The RNG of `action_space.sample()` is saved directly."""

    def reset(self, *, seed=None, options=None):
        self._reset_seed = seed
        self._rng_before_reset = None if seed is not None else rng_state(self.unwrapped.np_random)
        self._actions = []
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        self._actions.append(np.array(action, copy=True))  # its own dtype: a cast could change the rescaling
        return self.env.step(action)

    def get_state(self) -> dict:
        return {"reset_seed": self._reset_seed, "rng_before_reset": self._rng_before_reset, "actions": list(self._actions),
                "action_space_rng": rng_state(self.action_space.np_random)}

    def set_state(self, state: dict) -> np.ndarray:
        """Replay a `get_state()` on a freshly made env of the same id; return the observation."""
        if state["reset_seed"] is None:
            set_rng_state(self.unwrapped.np_random, state["rng_before_reset"])
        obs, _ = self.reset(seed=state["reset_seed"])
        for action in state["actions"]:
            obs, _, terminated, truncated, _ = self.step(action)
            if terminated or truncated:
                raise ValueError("the saved episode ends before its last action")
        set_rng_state(self.action_space.np_random, state["action_space_rng"])
        return obs


def seed_everything(seed: int) -> None:
    """Seed Python's and numpy's global generators (JAX's keys are explicit)."""
    random.seed(seed)
    np.random.seed(seed)


def env_step(env: gym.Env, obs: np.ndarray, action: np.ndarray):
    """Step `env` once: the transition to store, the observation to act on next, and the finished episode's
    statistics ("r", "l" and, where reported, "success"; None mid-episode). The stored `next_obs` is the true
    successor even at an episode's end, and only `terminated` is stored: a truncation still bootstraps."""
    next_obs, reward, terminated, truncated, info = env.step(action)
    transition = (obs, np.asarray(action, np.float32), np.float32(reward), next_obs, np.float32(terminated))
    episode = None
    if terminated or truncated:
        success = success_of(info)
        episode = dict(info.get("episode", {}), **({"success": success} if success is not None else {}))
        next_obs, _ = env.reset()
    return transition, next_obs, episode


def success_of(info: dict) -> float | None:
    """An episode's success at its last step (OGBench's info["success"], MyoSuite's "solved"): 1.0, 0.0 or None."""
    for key in ("success", "solved"):
        if key in info:
            return float(info[key])
    return None


def env_dims(env_id: str) -> tuple[int, int]:
    """(observation size, action size) of `env_id` as make_env builds it."""
    env = make_env(env_id, 0)
    try:
        return env.observation_space.shape[0], env.action_space.shape[0]
    finally:
        env.close()


def action_scale(env_id: str) -> np.ndarray:
    """The half-range (high - low) / 2 of `env_id`'s own action bounds, which make_env rescales to [-1, 1]: the
    factor between a density over [-1, 1] actions and one in the env's units."""
    env = make_env(env_id, 0)
    try:
        space = env.unwrapped.action_space
        return ((space.high - space.low) / 2.0).astype(np.float32)
    finally:
        env.close()


class SeedEnvs:
    """One env per seed (`seeds[i]` for agent i), stepped in turn like Gymnasium's SyncVectorEnv, but each exactly
    as a single run's env (`make_env`, `env_step`), so seed i's transitions are the single run's. Gymnasium's
    vector envs reset a finished episode on the next step and would lose that match and the per-env replay state."""

    def __init__(self, env_id: str, seeds, render: bool = False):
        self.seeds, self.envs = list(seeds), []
        try:
            for seed in self.seeds:
                self.envs.append(make_env(env_id, seed, render))
        except BaseException:
            self.close()
            raise
        self.observation_space, self.action_space = self.envs[0].observation_space, self.envs[0].action_space

    def __len__(self) -> int:
        return len(self.envs)

    def reset(self, seeds=None) -> np.ndarray:
        seeds = self.seeds if seeds is None else seeds
        return np.stack([env.reset(seed=seed)[0] for env, seed in zip(self.envs, seeds)])

    def random_actions(self) -> np.ndarray:
        """Uniform actions from each env's own seeded action space (the single runs' warm-up actions)."""
        return np.stack([env.action_space.sample() for env in self.envs])

    def step(self, obs: np.ndarray, actions: np.ndarray):
        """`env_step` on every env: the transitions and next observations stacked over seeds, and the episodes."""
        transitions, next_obs, episodes = zip(*(env_step(env, o, a) for env, o, a in zip(self.envs, obs, actions)))
        return tuple(np.stack(field) for field in zip(*transitions)), np.stack(next_obs), list(episodes)

    def get_state(self) -> list:
        return [env.get_state() for env in self.envs]

    def set_state(self, states: list) -> np.ndarray:
        if len(states) != len(self.envs):
            raise ValueError(f"{len(states)} saved env states for {len(self.envs)} envs")
        return np.stack([env.set_state(state) for env, state in zip(self.envs, states)])

    def render_check(self) -> None:
        """Render one frame now, so a machine without EGL fails before training rather than at the first video."""
        self.envs[0].reset(seed=self.seeds[0])
        try:
            frame = self.envs[0].render()
            if frame is None or frame.ndim != 3:
                raise RuntimeError("no RGB frame")
        except Exception as e:  # the GL backends raise many types
            raise ConfigError(f"--capture-video: MuJoCo cannot render ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); {RENDER_HELP}") from None

    def close(self) -> None:
        for env in self.envs:
            env.close()


def next_actions(act, actor_params, obs, keys, chunks, left, active):
    """Each seed's next action when actions come in open-loop chunks: seed i plays `chunks[i]` (H, act_dim), of
    which `left[i]` are unplayed (counted down in place). `active` seeds with none left get a new chunk from
    `act(actor_params, obs, keys) -> (chunks, keys)` and only their keys advance, so that seed i acts as its single
    run would; one action per seed (S, act_dim) is a chunk of one. Returns (actions, chunks, keys)."""
    import jax.numpy as jnp

    ask = active & (left == 0)
    if ask.any():
        new, new_keys = act(actor_params, obs, keys)
        new = np.asarray(new)
        new = new[:, None] if new.ndim == 2 else new
        if ask.all() or chunks is None:
            chunks, keys = new, new_keys
        else:
            chunks = np.where(ask[:, None, None], new, chunks)
            keys = jnp.where(ask.reshape((-1,) + (1,) * (np.ndim(keys) - 1)), new_keys, keys)
        left[ask] = chunks.shape[1]
    actions = chunks[np.arange(len(left)), -np.maximum(left, 1)]
    left[active] -= 1
    return actions, chunks, keys


def evaluate(envs: SeedEnvs, act, actor_params, keys, episodes: int, seeds=None, videos=None):
    """`episodes` whole episodes on every env of `envs` at once, env i acting with seed i's slice of
    `act(actor_params, obs, keys) -> (actions or chunks, keys)` (next_actions). Returns each seed's undiscounted
    returns and its successes (success_of; empty where the env reports none). `seeds[i]` reseeds env i's first
    reset, so an evaluation depends on its arguments alone (and survives a resume). Seed i's episode j is recorded
    to `videos[i][j]` where given (envs made with render=True). An env done with its episodes waits, its key kept."""
    n = len(envs)
    videos = videos or [[] for _ in range(n)]
    obs = envs.reset(seeds if seeds is not None else [None] * n)
    returns, successes, totals = [[] for _ in range(n)], [[] for _ in range(n)], np.zeros(n)
    frames = [[env.render()] if videos[i] else None for i, env in enumerate(envs.envs)]
    active, chunks, left = np.full(n, episodes > 0), None, np.zeros(n, np.int64)
    while active.any():
        actions, chunks, keys = next_actions(act, actor_params, obs, keys, chunks, left, active)
        for i in np.flatnonzero(active):
            env = envs.envs[i]
            obs[i], reward, terminated, truncated, info = env.step(actions[i])
            totals[i] += float(reward)
            if frames[i] is not None:
                frames[i].append(env.render())
            if terminated or truncated:
                j = len(returns[i])
                returns[i].append(totals[i])
                if success_of(info) is not None:
                    successes[i].append(success_of(info))
                totals[i], left[i] = 0.0, 0
                if frames[i] is not None:
                    write_video(videos[i][j], frames[i], env.metadata.get("render_fps", 30))
                active[i] = len(returns[i]) < episodes
                if active[i]:
                    obs[i], _ = env.reset()
                    frames[i] = [env.render()] if j + 1 < len(videos[i]) else None
    return returns, successes


def write_video(path: str, frames, fps: float) -> None:
    import imageio.v2 as imageio  # imageio-ffmpeg brings its own ffmpeg

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)
