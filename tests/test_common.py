"""The shared pieces: replay buffer, env construction and what an env step stores."""

import os
import subprocess
import sys

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.buffer import buffer_add, buffer_init, buffer_sample
from common.env import ConfigError, check_env_id, env_step, make_env
from helpers import ROOT, fill, run_script


def test_buffer_wraps_around_and_overwrites_the_oldest():
    buf = fill(buffer_init(5, 2, 1), range(7))
    assert int(buf.pos) == 2 and int(buf.size) == 5
    np.testing.assert_array_equal(buf.obs[:, 0], [5, 6, 2, 3, 4])
    np.testing.assert_array_equal(buf.next_obs[:, 0], [5.5, 6.5, 2.5, 3.5, 4.5])
    np.testing.assert_array_equal(buf.rewards, [5, 6, 2, 3, 4])


def test_uniform_sampling_reads_only_filled_slots_and_all_of_them():
    buf = fill(buffer_init(100, 1, 1), range(1, 11))  # slots 10..99 are empty (zeros)
    values = np.asarray(buffer_sample(buf, jax.random.PRNGKey(0), 2000).obs[:, 0])
    assert values.min() >= 1.0 and set(values.astype(int)) == set(range(1, 11))


class _ScriptedEnv(gym.Env):
    """Observation = step count; terminates or truncates at a chosen step."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def __init__(self, end_at=3, terminate=True):
        self.end_at, self.terminate, self.t = end_at, terminate, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([100.0], np.float32), {}  # a reset observation unlike any successor

    def step(self, action):
        self.t += 1
        end = self.t == self.end_at
        return np.array([self.t], np.float32), 1.0, end and self.terminate, end and not self.terminate, {}


@pytest.mark.parametrize("terminate", [True, False])
def test_episode_end_stores_the_true_successor_and_only_termination(terminate):
    env = gym.wrappers.RecordEpisodeStatistics(_ScriptedEnv(end_at=3, terminate=terminate))
    obs, _ = env.reset(seed=0)
    stored = []
    for _ in range(3):
        transition, obs, episode = env_step(env, obs, np.zeros(1, np.float32))
        stored.append(transition)
    last_obs, _, reward, next_obs, terminated = stored[-1]
    assert next_obs[0] == 3.0  # the final observation, not the reset one
    assert terminated == (1.0 if terminate else 0.0)  # a truncation is stored as not terminated: it bootstraps
    assert all(t[4] == 0.0 for t in stored[:-1])
    assert obs[0] == 100.0  # the loop continues from the reset observation
    assert episode is not None and float(episode["r"]) == 3.0 and int(episode["l"]) == 3


def test_time_limit_truncates_in_a_real_mujoco_env():
    env = make_env("Hopper-v4", 0)
    env = gym.wrappers.TimeLimit(env.unwrapped, max_episode_steps=5)  # a short limit, same dynamics
    env = gym.wrappers.RecordEpisodeStatistics(env)
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        transition, obs, episode = env_step(env, obs, np.zeros(3, np.float32))
    assert episode is not None and transition[4] == 0.0


def test_make_env_flattens_dm_control_and_rescales_actions():
    env = make_env("dm_control/cartpole-balance-v0", 0)
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (5,) and env.observation_space.shape == (5,)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    env = make_env("Pendulum-v1", 0)  # bounds [-2, 2] are rescaled to [-1, 1]
    assert np.all(env.action_space.high == 1)


def test_unknown_env_id_is_refused_with_a_hint():
    with pytest.raises(ConfigError, match="unknown --env-id 'Hoper-v4'.*Hopper-v4"):
        check_env_id("Hoper-v4")
    with pytest.raises(ConfigError, match="dm_control/<domain>-<task>-v0"):
        check_env_id("dm_control/nothing-here-v0")


def test_myosuite_ids_name_the_install_command_where_myosuite_is_missing(tmp_path, monkeypatch, capsys):
    """MyoSuite 3.0 requires gymnasium < 1.3, which requirements.txt excludes, so CI has no myosuite: a MyoSuite id is
    refused in one line naming the install (test_myosuite_task_runs_past_learning_starts runs where it is installed)."""
    import importlib.util

    import flowrl_jax

    if importlib.util.find_spec("myosuite") is not None:
        pytest.skip("myosuite is installed here: test_myosuite_task_runs_past_learning_starts covers it")
    monkeypatch.chdir(tmp_path)
    assert flowrl_jax.main(["--env-id", "myoHandReachRandom-v0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a MyoSuite task, and myosuite is not installed" in err[0], err
    assert "pip install -r requirements.txt 'myosuite==3.0.0' 'gymnasium[mujoco]<1.3'" in err[0]


def test_myosuite_task_runs_past_learning_starts(tmp_path, monkeypatch):
    """Where myosuite is installed (its own environment): FlowRL on the reach-hard task past learning_starts, with
    MyoSuite's `solved` logged as success."""
    pytest.importorskip("myosuite", reason="myosuite is not installed (it needs gymnasium < 1.3; requirements.txt pins 1.4)")
    import flowrl_jax

    from helpers import only_run_dir, read_scalars

    monkeypatch.chdir(tmp_path)
    assert flowrl_jax.main(["--env-id", "myoHandReachRandom-v0", "--total-timesteps", "260", "--learning-starts", "200",
                            "--hidden-dim", "32", "--batch-size", "32", "--eval-every", "250", "--eval-episodes", "1",
                            "--log-every", "50", "--no-progress"]) == 0
    s = read_scalars(only_run_dir(tmp_path))
    assert [p[0] for p in s["losses/qf_loss"]] == [250] and [p[0] for p in s["eval/success_rate"]] == [250]
    assert s["charts/success"] and all(v in (0.0, 1.0) for _, v in s["charts/success"])



def test_env_id_hints_name_only_ids_that_run_here():
    for bad in ["Ant-v9", "Ant-v3"]:  # Ant-v3 is registered but needs mujoco-py
        with pytest.raises(ConfigError) as info:
            check_env_id(bad)
        message = str(info.value)
        assert "Ant-v5, Ant-v4?" in message and "Ant-v3," not in message and "Ant-v3?" not in message, message
        assert "OGBench" not in message and "--offline-dataset" not in message, message
    with pytest.raises(ConfigError, match="'Ant-v3' needs mujoco-py"):
        check_env_id("Ant-v3")
    with pytest.raises(ConfigError, match="or an OGBench single-task env"):
        check_env_id("cube-dble", ogbench=True)


# ---------------------------------------------------------------------------------------------
# Checkpoint pieces: buffer packing, env replay, argument adoption, pruning, divergence flags
# ---------------------------------------------------------------------------------------------


def trajectory_buffer(capacity, steps, seed=0):
    """Transitions as an env makes them: next_obs[i] is obs[i + 1] except where an episode ends."""
    rng = np.random.default_rng(seed)
    buf, obs = buffer_init(capacity, 3, 2), rng.normal(size=3).astype(np.float32)
    for i in range(steps):
        nxt = rng.normal(size=3).astype(np.float32)
        done = i % 4 == 3
        buf = buffer_add(buf, obs, rng.normal(size=2).astype(np.float32), np.float32(i), nxt, np.float32(done))
        obs = rng.normal(size=3).astype(np.float32) if done else nxt
    return buf


@pytest.mark.parametrize("steps", [0, 3, 7, 12, 15])
def test_packed_buffer_restores_exactly_across_wraparound(steps):
    from flax import serialization

    from common.checkpoint import pack_buffer, unpack_buffer

    buf = trajectory_buffer(7, steps)
    packed = serialization.msgpack_restore(serialization.msgpack_serialize(pack_buffer(buf)))
    restored = unpack_buffer(buffer_init(7, 3, 2), packed, "x")
    for name, a, b in zip(buf._fields, buf, restored):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), name
    # Only the next_obs rows that are not the following obs are stored (episode ends, the newest).
    stored = packed["fields"]["next_obs_rest"]["shape"][0]
    assert stored < max(int(buf.size), 1) or steps <= 1


def test_packed_buffer_of_another_size_is_refused():
    from common.checkpoint import pack_buffer, unpack_buffer

    with pytest.raises(ConfigError, match="does not fit this run"):
        unpack_buffer(buffer_init(7, 4, 2), pack_buffer(trajectory_buffer(7, 5)), "x.ckpt")


def test_a_script_buffer_with_more_fields_packs_and_grows_on_restore():
    """sac_flow_o2o.py's chunk buffer (an `ends` field, pos == size): restored exactly, into a larger capacity too
    (a resumed run with a larger --total-timesteps); a row count past the capacity is refused."""
    from common.checkpoint import pack_buffer, unpack_buffer
    from sac_flow_o2o import chunk_add, chunk_buffer

    rng = np.random.default_rng(0)
    data = {"obs": rng.normal(size=(6, 3)), "actions": rng.normal(size=(6, 2)), "rewards": rng.normal(size=6),
            "next_obs": rng.normal(size=(6, 3)), "terminated": np.zeros(6), "ends": np.eye(1, 6, 5)[0]}
    buf = chunk_add(chunk_buffer(data, 8), np.ones(3), np.ones(2), 1.0, np.full(3, 2.0), 0.0, 1.0)
    packed = pack_buffer(jax.device_get(buf))
    for capacity in (8, 12):
        restored = unpack_buffer(chunk_buffer(data, capacity), packed, "x")
        assert int(restored.pos) == int(restored.size) == 7
        for name in buf._fields[:-2]:  # the rows; pos and size above
            assert np.asarray(getattr(buf, name))[:7].tobytes() == np.asarray(getattr(restored, name))[:7].tobytes(), name
    with pytest.raises(ConfigError, match="does not fit this run"):
        unpack_buffer(chunk_buffer(data, 6), packed, "x.ckpt")


def test_next_actions_plays_chunks_open_loop_and_advances_only_the_asking_seeds_keys():
    from common.env import next_actions

    calls = []

    def act(params, obs, keys):  # chunk of 3: [key, key + 0.1, key + 0.2] per seed; the key counts the calls
        calls.append(obs.copy())
        return keys[:, None, None] + np.array([0.0, 0.1, 0.2])[None, :, None], keys + 1

    keys, chunks, left, active = jnp.array([10.0, 20.0]), None, np.zeros(2, np.int64), np.ones(2, bool)
    played = []
    for t in range(5):
        if t == 1:
            left[1] = 0  # seed 1's episode ended after its first action: a new chunk at once
        actions, chunks, keys = next_actions(act, None, np.full(2, float(t)), keys, chunks, left, active)
        played.append(np.round(actions[:, 0].astype(float), 2).tolist())
    # Seed 0 asks at t = 0 and 3; seed 1 at t = 0, 1 and 4. A call at t = 1 leaves seed 0's key and chunk alone.
    assert played == [[10.0, 20.0], [10.1, 21.0], [10.2, 21.1], [11.0, 21.2], [11.1, 22.0]]
    assert [c.tolist() for c in calls] == [[0.0, 0.0], [1.0, 1.0], [3.0, 3.0], [4.0, 4.0]]
    assert np.asarray(keys).tolist() == [12.0, 23.0] and left.tolist() == [1, 2]
    # An act that returns one action per seed is a chunk of one: asked every step.
    one = lambda p, o, k: (k[:, None] + 0.5, k + 1)
    left, chunks, keys = np.zeros(2, np.int64), None, jnp.array([0.0, 5.0])
    for _ in range(3):
        actions, chunks, keys = next_actions(one, None, np.zeros(2), keys, chunks, left, active)
    assert actions[:, 0].tolist() == [2.5, 7.5] and np.asarray(keys).tolist() == [3.0, 8.0]


@pytest.mark.parametrize("env_id", ["Hopper-v4", "dm_control/cartpole-balance-v0"])
def test_env_replay_restores_a_mid_episode_state_bit_for_bit(env_id):
    env = make_env(env_id, 3)
    obs, _ = env.reset(seed=3)
    for i in range(130):  # several Hopper episodes, then into the next one
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset()
    state = env.get_state()
    copy = make_env(env_id, 99)  # other seeds: everything must come from the state
    assert np.array_equal(copy.set_state(state), obs)
    for _ in range(300):
        a, b = env.action_space.sample(), copy.action_space.sample()
        assert np.array_equal(a, b)
        first, second = env.step(a), copy.step(b)
        assert np.array_equal(first[0], second[0]) and first[1:4] == second[1:4]
        if first[2] or first[3]:
            assert first[4]["episode"]["r"] == second[4]["episode"]["r"]  # episode statistics replayed too
            assert np.array_equal(env.reset()[0], copy.reset()[0])


def test_adopted_arguments_refuse_a_contradiction():
    from dataclasses import dataclass

    from common.checkpoint import adopt_saved_args

    @dataclass
    class A:
        width: int = 8
        total: int = 100

    args = A()
    adopt_saved_args(args, {"width": 16, "total": 50}, A(), ["width", "total"], "--resume", may_change=("total",))
    assert (args.width, args.total) == (16, 50)  # defaults give way to the saved values
    args = A(total=300)
    adopt_saved_args(args, {"width": 16, "total": 50}, A(), ["width", "total"], "--resume", may_change=("total",))
    assert (args.width, args.total) == (16, 300)  # a flag that may change wins
    with pytest.raises(ConfigError, match="--width 32 contradicts --resume's 16"):
        adopt_saved_args(A(width=32), {"width": 16}, A(), ["width"], "--resume", may_change=("total",))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    from common.checkpoint import list_checkpoints, save_checkpoint

    for step in (100, 200, 300, 400):
        save_checkpoint(str(tmp_path), step, {"format": 1, "step": step}, keep=2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [300, 400]


def test_divergence_names_every_non_finite_metric():
    from common.checkpoint import Diverged, check_metrics, finite_flags, first_nonfinite

    metrics = {"qf_loss": jnp.float32(np.nan), "actor_loss": jnp.float32(1.0), "grad": jnp.array([1.0, np.inf])}
    info = {**metrics, "finite": finite_flags(metrics)}
    with pytest.raises(Diverged, match=r"losses/grad, losses/qf_loss became NaN or infinite at step 7: .*no checkpoint"):
        check_metrics(info, 7, None)
    check_metrics({"a": jnp.float32(1), "finite": finite_flags({"a": jnp.float32(1)})}, 7, None)
    assert first_nonfinite({"w": jnp.ones(3), "b": jnp.array([0.0, np.nan])}, "agent") == "agent['b']"
    assert first_nonfinite({"w": jnp.ones(3)}) is None


def test_a_gl_backend_that_cannot_load_is_one_line_and_no_libegl_means_no_gl(tmp_path):
    """MuJoCo loads MUJOCO_GL's backend when it is imported, so a missing library failed every run with a deep
    traceback (the H200 image has no libEGL); now a bad one is refused in one line, and with MUJOCO_GL unset and no
    libEGL the scripts train without GL and refuse --capture-video in one line."""
    tiny = ["--total-timesteps", "20", "--learning-starts", "10", "--batch-size", "4", "--hidden-dim", "8",
            "--eval-episodes", "0", "--no-progress", "--checkpoint-every", "0"]
    bad = run_script("flowrl_jax.py", tiny, tmp_path, env={"MUJOCO_GL": "nonsense"})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "MUJOCO_GL='nonsense'" in bad.stderr

    code = ("import ctypes.util, os; ctypes.util.find_library = lambda name: None; os.environ.pop('MUJOCO_GL', None)\n"
            "from common.env import ConfigError, SeedEnvs\n"
            "envs = SeedEnvs('Hopper-v4', [0], render=True); envs.reset(); print(os.environ['MUJOCO_GL'])\n"
            "try:\n    envs.render_check()\nexcept ConfigError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "MUJOCO_GL"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "disable" and lines[1].startswith("refused: --capture-video: MuJoCo cannot render"), lines
