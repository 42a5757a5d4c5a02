"""Offline-to-online SAC Flow (sac_flow_o2o.py): the dataset loaders (and their errors), the chunk sampler, the
losses, the Eq. 12 step against a by-hand computation, the three- and two-phase schedules, the per-family BC
weights, Robomimic's reward shift, flow-matching pretraining, short offline-then-online runs with both velocities,
Ctrl-C, resume through both phases, --eval-only, and every refusal."""

import dataclasses
import glob
import json
import os
import shutil
import signal

import gymnasium as gym
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sac_flow_o2o as O
from benchmarks import make_dataset
import common.env
from common.checkpoint import list_checkpoints, read_container
from common.datasets import load_dataset, robomimic_task
from common.args import ConfigError
from helpers import all_finite, assert_same_tree, assert_wandb_matches_tensorboard, only_run_dir, read_scalars, run_script
from sac_flow_o2o import ChunkBatch, chunk_add, chunk_buffer, sample_chunks

CUBE = "cube-double-singletask-task2-v0"
TINY = {"gated": dict(hidden_dim=16, gate_dim=8), "decoded": dict(d_model=16, n_heads=2, n_layers=1)}


E2E = ["--offline-steps", "150", "--total-timesteps", "150", "--learning-starts", "60", "--batch-size", "32",
       "--critic-width", "32", "--critic-depth", "2", "--flow-steps", "2", "--log-every", "50", "--eval-every", "150",
       "--eval-episodes", "1", "--buffer-size", "5000", "--no-progress"]
ONLINE = ["qf_loss", "qf_values", "actor_loss", "bc_loss", "q_pi", "entropy", "alpha", "alpha_loss"]


def tiny_args(velocity: str = "gated", **kw) -> O.Args:
    """Small networks, batches and buffer, K = 2, so that each compilation takes seconds."""
    base = dict(dataset="unused.npz", velocity=velocity, batch_size=8, critic_width=16, critic_depth=1, flow_steps=2,
                buffer_size=5000, progress=False, **TINY[velocity])
    return dataclasses.replace(O.Args(), **{**base, **kw})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Datasets made by the repo's generator: Hopper (linear policy) and cube-double (OGBench oracle), both layouts."""
    d = tmp_path_factory.mktemp("datasets")
    for env_id, name, steps in [("Hopper-v4", "hopper", 3000), (CUBE, "cube", 1500)]:  # each layout from the same rollouts
        assert make_dataset.main(["--env-id", env_id, "--steps", str(steps), "--out", str(d / f"{name}.npz"),
                                  str(d / f"{name}.hdf5"), "--episode-length", "500"]) == 0
    return d


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def test_npz_and_hdf5_of_the_same_rollouts_load_the_same(data_dir):
    a = load_dataset(str(data_dir / "hopper.npz"), "Hopper-v4")
    b = load_dataset(str(data_dir / "hopper.hdf5"), "Hopper-v4")
    assert len(a["obs"]) == 3000 and a["obs"].shape == (3000, 11) and a["actions"].shape == (3000, 3)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    # Successors: within a trajectory next_obs is the next row's obs; a terminated step always ends one.
    inside = a["ends"][:-1] == 0
    np.testing.assert_array_equal(a["next_obs"][:-1][inside], a["obs"][1:][inside])
    assert np.all(a["ends"][a["terminated"] == 1] == 1) and a["terminated"].sum() >= 1 and a["ends"][-1] == 1
    assert np.all(np.abs(a["actions"]) <= 1.0)


def test_ogbench_rewards_are_relabelled_for_the_task(data_dir):
    raw = np.load(data_dir / "cube.npz")
    assert "rewards" not in raw.files and "qpos" in raw.files  # OGBench's official key set
    d = load_dataset(str(data_dir / "cube.npz"), CUBE)
    assert d["obs"].shape == (1500, 37) and d["actions"].shape == (1500, 5)
    # cube-double: reward = -(number of misplaced cubes); a step is terminal exactly when both are placed.
    assert set(np.unique(d["rewards"])) <= {-2.0, -1.0, 0.0}
    np.testing.assert_array_equal(d["terminated"], (d["rewards"] == 0).astype(np.float32))
    h = load_dataset(str(data_dir / "cube.hdf5"), CUBE)
    np.testing.assert_allclose(h["rewards"], d["rewards"])
    np.testing.assert_allclose(h["obs"], d["obs"], atol=1e-5)


def test_robomimic_hdf5_concatenates_obs_keys_and_rescales_actions(tmp_path):
    """A file in Robomimic's own key layout, for an env whose actions are not in [-1, 1] (Humanoid: +-0.4)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "robomimic.hdf5"
    keys = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 367, "extra": 1}
    with h5py.File(path, "w") as f:
        for i, t in enumerate([4, 6]):
            demo = f.create_group(f"data/demo_{i}")
            for k, n in keys.items():
                demo.create_dataset(f"obs/{k}", data=rng.normal(size=(t, n)))
                demo.create_dataset(f"next_obs/{k}", data=rng.normal(size=(t, n)))
            demo.create_dataset("actions", data=rng.uniform(-0.4, 0.4, (t, 17)))
            demo.create_dataset("rewards", data=np.zeros(t))
            demo.create_dataset("dones", data=np.eye(1, t, t - 1)[0])
    d = load_dataset(str(path), "Humanoid-v4")  # 376 = 3 + 4 + 2 + 367, "extra" left out
    with h5py.File(path) as f:
        first = np.concatenate([f["data/demo_0/obs"][k][0] for k in ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")])
        np.testing.assert_allclose(d["obs"][0], first, rtol=1e-6)
        np.testing.assert_allclose(d["actions"][5], f["data/demo_1/actions"][1] / 0.4, rtol=1e-5)
    np.testing.assert_array_equal(d["ends"], [0, 0, 0, 1, 0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(d["terminated"], d["ends"])


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_loader_errors_name_the_problem(tmp_path, data_dir):
    good = dict(np.load(data_dir / "hopper.npz"))
    cases = [
        (write_npz(tmp_path / "noact.npz", **{k: v for k, v in good.items() if k != "actions"}), "Hopper-v4", "no key 'actions'"),
        (write_npz(tmp_path / "noreward.npz", **{k: v for k, v in good.items() if k not in ("rewards",)}), "Hopper-v4", "no key 'rewards'"),
        (write_npz(tmp_path / "obs.npz", **dict(good, observations=good["observations"][:, :10])), "Hopper-v4", "10 features but Hopper-v4 observes 11"),
        (write_npz(tmp_path / "act.npz", **dict(good, actions=np.zeros((len(good["actions"]), 4)))), "Hopper-v4", "takes 3"),
        (write_npz(tmp_path / "rows.npz", **dict(good, terminals=good["terminals"][:-5])), "Hopper-v4", "rows"),
        (write_npz(tmp_path / "nan.npz", **dict(good, rewards=np.full(len(good["rewards"]), np.nan))), "Hopper-v4", "NaN"),
        (write_npz(tmp_path / "big.npz", **dict(good, actions=good["actions"] * 3)), "Hopper-v4", "outside Hopper-v4's bounds"),
        (str(data_dir / "hopper.npz"), "Walker2d-v4", "observes 17"),
        (str(data_dir / "cube.hdf5"), "Hopper-v4", "observes 11"),
        (str(tmp_path / "missing.npz"), "Hopper-v4", "does not exist"),
    ]
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    (tmp_path / "garbage.hdf5").write_bytes(b"not an hdf5 file either")
    (tmp_path / "data.csv").write_text("1,2,3")
    cases += [(str(tmp_path / "garbage.npz"), "Hopper-v4", "cannot be read as a .npz"),
              (str(tmp_path / "garbage.hdf5"), "Hopper-v4", "cannot be read as HDF5"),
              (str(tmp_path / "data.csv"), "Hopper-v4", "unknown extension")]
    with h5py.File(tmp_path / "nodemo.hdf5", "w") as f:
        f.create_group("data/demo_0/obs").create_dataset("state", data=np.zeros((3, 11)))
        f["data/demo_0"].create_dataset("rewards", data=np.zeros(3))
        f["data/demo_0"].create_dataset("dones", data=np.zeros(3))
    with h5py.File(tmp_path / "nodata.hdf5", "w") as f:
        f.create_group("mask")
    cases += [(str(tmp_path / "nodemo.hdf5"), "Hopper-v4", "data/demo_0 has no 'actions'"),
              (str(tmp_path / "nodata.hdf5"), "Hopper-v4", "no group 'data'")]
    for path, env_id, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
            load_dataset(path, env_id)
        assert "\n" not in str(e.value) and os.path.basename(path) in str(e.value)
    with pytest.raises(ConfigError, match="no key 'nope'"):
        load_dataset(str(data_dir / "hopper.hdf5"), "Hopper-v4", ("nope",))


# ---------------------------------------------------------------------------------------------
# Chunks and losses
# ---------------------------------------------------------------------------------------------


def chunk_by_hand(d, start, H, gamma):
    """Walk the chunk step by step: the return stops at a termination or a trajectory end."""
    ret, discount, valid, cut = 0.0, gamma**H, [], False
    for k in range(H):
        i = start + k
        valid.append(1.0)
        ret += gamma**k * d["rewards"][i]
        if d["terminated"][i]:
            discount = 0.0
            break
        if d["ends"][i]:
            cut = k < H - 1
            break
    valid += [0.0] * (H - len(valid))
    return ret, discount, valid, 0.0 if cut else 1.0


def test_chunk_returns_against_a_step_by_step_walk():
    rng = np.random.default_rng(0)
    n, H, gamma = 40, 4, 0.9
    d = {"obs": np.arange(n, dtype=np.float32)[:, None], "actions": rng.normal(size=(n, 2)),
         "rewards": rng.normal(size=n), "next_obs": np.arange(1, n + 1, dtype=np.float32)[:, None],
         "terminated": np.zeros(n), "ends": np.zeros(n)}
    d["terminated"][[5, 17]] = 1
    d["ends"][[5, 11, 17, 30, 39]] = 1  # 11 and 30: time limits (no termination)
    buf = chunk_buffer(d, n + 3)
    buf = chunk_add(buf, np.full(1, 40.0), np.zeros(2), 1.0, np.full(1, 41.0), 0.0, 0.0)
    b = jax.device_get(sample_chunks(buf, jax.random.PRNGKey(0), 512, H, gamma))
    starts = b.obs[:, 0].astype(int)
    assert starts.min() == 0 and starts.max() == n + 1 - H  # every start whose chunk is stored, the new row included
    for k, value in [("rewards", 1.0), ("terminated", 0.0), ("ends", 0.0)]:  # the added row
        d[k] = np.append(d[k], value)
    for j, s in enumerate(starts):
        ret, discount, valid, critic_valid = chunk_by_hand(d, s, H, gamma)
        np.testing.assert_allclose(b.returns[j], ret, rtol=1e-5, atol=1e-6)
        assert b.discount[j] == pytest.approx(discount) and b.critic_valid[j] == critic_valid
        np.testing.assert_array_equal(b.valid[j], valid)
        assert b.next_obs[j, 0] == s + H
        np.testing.assert_allclose(b.actions[j], np.asarray(buf.actions)[s:s + H])


def test_the_buffer_is_a_ring_after_the_dataset_and_sparse_rewards_relabel():
    d = {"obs": np.arange(6, dtype=np.float32)[:, None], "actions": np.zeros((6, 2)), "rewards": np.array([0, -1, -2, 0, -1, 0.0]),
         "next_obs": np.arange(1, 7, dtype=np.float32)[:, None], "terminated": np.zeros(6), "ends": np.eye(1, 6, 5)[0]}
    buf = chunk_buffer(d, 8)
    for v in (6.0, 7.0, 8.0):  # the third online row overwrites the dataset's first (the authors' ring)
        buf = chunk_add(buf, np.full(1, v), np.zeros(2), -1.0, np.full(1, v + 1), 0.0, 0.0)
    assert (int(buf.pos), int(buf.size)) == (1, 8)
    np.testing.assert_array_equal(np.asarray(buf.obs[:, 0]), [8, 1, 2, 3, 4, 5, 6, 7])
    # --sparse (after any Robomimic shift): -1 wherever the reward is not 0
    np.testing.assert_array_equal(O.relabel(d["rewards"], 0.0, True), [0, -1, -1, 0, -1, 0])
    np.testing.assert_array_equal(O.relabel(np.array([0.0, 1.0]), -1.0, True), [-1, 0])
    np.testing.assert_array_equal(O.relabel(d["rewards"], 0.0, False), d["rewards"])


def test_flow_matching_and_bc_losses_by_hand():
    v = jnp.array([[[1.0, 2.0], [0.0, 0.0]]])  # (B=1, H=2, A=2)
    x0 = jnp.array([[[0.5, 0.5], [1.0, 1.0]]])
    x1 = jnp.array([[[1.0, 1.0], [3.0, -1.0]]])
    # target x1 - x0 = [[0.5, 0.5], [2, -2]]; errors^2 = [0.25, 2.25], [4, 4]; the second action is past the end
    assert float(O.flow_matching_loss(v, x0, x1, jnp.array([[1.0, 0.0]]))) == pytest.approx((0.25 + 2.25) / 4)
    assert float(O.flow_matching_loss(v, x0, x1, jnp.ones((1, 2)))) == pytest.approx((0.25 + 2.25 + 8) / 4)
    assert float(O.bc_loss(v, x1, jnp.ones((1, 2)))) == pytest.approx((0 + 1 + 9 + 1) / 4)
    # the temperature: authors alpha (mean log pi - target), Eq. 24 alpha (-mean log pi - target)
    assert float(O.alpha_loss(jnp.log(0.5), 3.0, 1.0, "authors")) == pytest.approx(0.5 * (3.0 - 1.0))
    assert float(O.alpha_loss(jnp.log(0.5), 3.0, 1.0, "sac")) == pytest.approx(0.5 * (-3.0 - 1.0))


# ---------------------------------------------------------------------------------------------
# The update steps and the schedules
# ---------------------------------------------------------------------------------------------


def random_batch(B=8, H=5, A=3, obs_dim=11, seed=0) -> ChunkBatch:
    rng = np.random.default_rng(seed)
    valid = np.ones((B, H), np.float32)
    valid[0, 3:], valid[1, 1:] = 0.0, 0.0  # two chunks that cross a trajectory's end
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return ChunkBatch(obs=f32(rng.normal(size=(B, obs_dim))), actions=f32(rng.uniform(-0.9, 0.9, (B, H, A))), valid=f32(valid),
                      returns=f32(rng.normal(size=B)), discount=f32(np.where(np.arange(B) % 3 == 0, 0.0, 0.99**H)),
                      next_obs=f32(rng.normal(size=(B, obs_dim))), critic_valid=f32(np.arange(B) != 1))


def rollout_by_hand(apply, params, s, key, steps, noise_std, dim):
    """x_0 ~ N(0, I), x_{k+1} = x_k + v / K + noise_std eps_k (keys: split(key, K + 1), x_0 from the first), a = tanh(x_K);
    log pi from the Gaussian densities written out and log(1 - a^2 + 1e-6) per dimension."""
    keys = jax.random.split(key, steps + 1)
    x = jax.random.normal(keys[0], (s.shape[0], dim))
    log_p = jnp.sum(-0.5 * x**2 - 0.5 * np.log(2 * np.pi), axis=-1)
    for k in range(steps):
        mean = x + apply(params, s, x, jnp.full((s.shape[0], 1), k / steps)) / steps
        x = mean + noise_std * jax.random.normal(keys[k + 1], x.shape)
        log_p += jnp.sum(-0.5 * ((x - mean) / noise_std) ** 2 - np.log(noise_std) - 0.5 * np.log(2 * np.pi), axis=-1)
    a = jnp.tanh(x)
    return a, log_p - jnp.sum(jnp.log(1.0 - a**2 + 1e-6), axis=-1)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_tree_close(a, b, **kw):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **kw)


def stack(tree):
    """A one-seed run's arrays, with their leading seed axis."""
    return jax.tree_util.tree_map(lambda x: x[None], tree)


def unstack(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def changed(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))


@pytest.fixture(scope="module")
def eq12_step():
    return jax.jit(O.make_steps(tiny_args(), 3)[1])  # compiled once for the tests below (batch 8, chunks of 5 x 3)


def test_eq12_step_against_the_actor_loss_and_adam_step_by_hand(eq12_step):
    """Eq. 12 with beta = 7 on a fixed batch: the loss value, the actor's first Adam step (-lr g / |g|) from the
    by-hand gradient, the temperature step, the critics' H-step TD loss and the Polyak target, all from the
    parameters before the step (the actor's Q and the target's Polyak average use the critic before its TD step)."""
    beta, lr = 7.0, 3e-4
    agent = O.create_agent(tiny_args(), 11, 3, jax.random.PRNGKey(0))
    b, key = random_batch(), jax.random.PRNGKey(3)
    new, info = eq12_step(agent, b, key, beta)
    k_next, k_pi = jax.random.split(key)
    actor, critic = agent.actor.apply_fn, agent.critic.apply_fn

    def actor_loss(params):
        a, log_p = rollout_by_hand(actor, params, b.obs, k_pi, 2, 0.05, 15)  # the authors' Eq. 12 noise, the default
        bc = jnp.sum(b.valid[..., None] * (a.reshape(8, 5, 3) - b.actions) ** 2) / (8 * 5 * 3)
        return beta * bc + jnp.mean(0.2 * log_p - critic(agent.critic.params, b.obs, a).mean(axis=0)), log_p

    (value, log_p), grads = jax.jit(jax.value_and_grad(actor_loss, has_aux=True))(agent.actor.params)
    assert float(info["actor_loss"]) == pytest.approx(float(value), rel=1e-5)
    assert float(info["entropy"]) == pytest.approx(-float(jnp.mean(log_p)), rel=1e-5)
    moved = 0
    for old, now, g in zip(leaves(agent.actor.params), leaves(new.actor.params), leaves(grads), strict=True):
        big = np.abs(g) > 1e-5  # Adam's first step is lr * sign(g) up to eps; tiny gradients are left out
        np.testing.assert_allclose(now[big], (old - lr * np.sign(g))[big], rtol=1e-6, atol=2e-3 * lr)
        moved += big.sum()
    assert moved > 100
    # Temperature, the authors' form: d/d log alpha [alpha (mean log pi - 0)] = alpha mean log pi.
    assert float(info["alpha_loss"]) == pytest.approx(0.2 * float(jnp.mean(log_p)), rel=1e-5)
    assert float(new.log_alpha.params["log_alpha"]) == pytest.approx(np.log(0.2) - lr * np.sign(float(jnp.mean(log_p))), abs=1e-7)
    # Critics: y = R + gamma^H (1 - done) (mean_i Q'_i(s', a') - alpha log pi(a'|s')), a' with the acting noise 0.02.
    @jax.jit
    def td_loss(agent):
        a_next, log_p_next = rollout_by_hand(actor, agent.actor.params, b.next_obs, k_next, 2, 0.02, 15)
        y = b.returns + b.discount * (critic(agent.critic_target, b.next_obs, a_next).mean(axis=0) - 0.2 * log_p_next)
        q = critic(agent.critic.params, b.obs, b.actions.reshape(8, 15))
        return jnp.mean(b.critic_valid * (q - y) ** 2)

    assert float(info["qf_loss"]) == pytest.approx(float(td_loss(agent)), rel=1e-5)
    target = jax.tree_util.tree_map(lambda p, t: 0.005 * p + 0.995 * t, agent.critic.params, agent.critic_target)
    assert_tree_close(new.critic_target, target, rtol=1e-6, atol=1e-8)
    assert changed(new.critic.params, agent.critic.params)


def test_offline_step_of_each_schedule(data_dir, eq12_step):
    """two-phase: critics + flow matching, alpha untouched; three-phase: that step, then Eq. 12 with the offline
    BC weight and alpha, on the same batch (both split the agent's key into key, batch, Eq. 3, Eq. 12)."""
    data = load_dataset(str(data_dir / "hopper.npz"), "Hopper-v4")
    buf = chunk_buffer(data, len(data["obs"]))
    agent = O.create_agent(tiny_args(), 11, 3, jax.random.PRNGKey(1))
    copy = lambda: jax.tree_util.tree_map(lambda x: jnp.array(x)[None], agent)  # one seed; the updates donate their agent

    two_phase, info = unstack(O.make_updates(tiny_args(schedule="two-phase"), 3, 11.0, 5.0)[0](copy(), stack(buf)))
    assert set(info) == {"qf_loss", "qf_values", "flow_loss", "finite"} and np.all(np.asarray(info["finite"]))
    assert float(two_phase.log_alpha.params["log_alpha"]) == float(agent.log_alpha.params["log_alpha"])
    assert (int(two_phase.actor.step), int(two_phase.critic.step), int(two_phase.log_alpha.step)) == (1, 1, 0)
    assert changed(two_phase.actor.params, agent.actor.params) and changed(two_phase.critic.params, agent.critic.params)

    assert tiny_args().schedule == "three-phase"  # the authors' default
    three_phase, info = unstack(O.make_updates(tiny_args(), 3, 11.0, 5.0)[0](copy(), stack(buf)))
    _, k_batch, _, k_eq12 = jax.random.split(agent.key, 4)
    b = sample_chunks(buf, k_batch, 8, 5, 0.99)
    expected, eq12_info = eq12_step(two_phase, b, k_eq12, 11.0)
    assert_tree_close(three_phase, expected, rtol=1e-5, atol=1e-6)
    for name in ("actor_loss", "bc_loss", "q_pi", "entropy", "alpha", "alpha_loss", "qf_loss"):
        assert float(info[name]) == pytest.approx(float(eq12_info[name]), rel=1e-4), name
    # The actor and the critics take two steps each, alpha one; the Eq. 12 step moved the actor again.
    assert (int(three_phase.actor.step), int(three_phase.critic.step), int(three_phase.log_alpha.step)) == (2, 2, 1)
    assert float(three_phase.log_alpha.params["log_alpha"]) != float(agent.log_alpha.params["log_alpha"])
    assert changed(three_phase.actor.params, two_phase.actor.params)


# ---------------------------------------------------------------------------------------------
# BC weights per task family, Robomimic's reward shift
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id,weights", [
    ("cube-double-singletask-task2-v0", (300, 300)), ("cube-double-play-singletask-task1-v0", (300, 300)),
    ("scene-singletask-task1-v0", (300, 300)), ("visual-scene-singletask-task3-v0", (300, 300)),
    ("cube-triple-singletask-task4-v0", (100, 100)), ("cube-quadruple-singletask-task1-v0", (100, 100)),
    ("lift-mh-low_dim", (10000, 1000)), ("can-ph-low_dim", (10000, 1000)), ("square-mh-low_dim", (10000, 1000)),
    ("Hopper-v4", (100, 100)), ("puzzle-3x3-singletask-task1-v0", (100, 100)), ("tool_hang-ph-low_dim", (100, 100)),
])
def test_bc_weights_per_task_family(env_id, weights):
    offline, online, source = O.bc_weights(O.Args(env_id=env_id), O.task_family(env_id, robomimic_task(env_id)))
    assert (offline, online) == weights
    assert ("fallback" in source) == (env_id in ("Hopper-v4", "puzzle-3x3-singletask-task1-v0", "tool_hang-ph-low_dim"))
    # An explicit weight wins; --bc-weight alone sets both phases, --online-bc-weight the online one.
    family = O.task_family(env_id, robomimic_task(env_id))
    assert O.bc_weights(O.Args(env_id=env_id, bc_weight=50.0), family)[:2] == (50.0, 50.0)
    assert O.bc_weights(O.Args(env_id=env_id, bc_weight=50.0, online_bc_weight=7.0), family)[:2] == (50.0, 7.0)
    assert O.bc_weights(O.Args(env_id=env_id, online_bc_weight=7.0), family)[:2] == (weights[0], 7.0)


def robomimic_copy(data_dir, tmp_path, env_name="Lift") -> str:
    """hopper.hdf5 labelled as a robosuite recording, as Robomimic's own files are (env_args type 1)."""
    path = tmp_path / f"robomimic_{env_name}.hdf5"
    shutil.copy(data_dir / "hopper.hdf5", path)
    with h5py.File(path, "a") as f:
        f["data"].attrs["env_args"] = json.dumps({"env_name": env_name, "type": 1, "env_kwargs": {}})
    return str(path)


def test_robomimic_datasets_are_recognised_and_their_rewards_shifted(data_dir, tmp_path):
    lift, can = robomimic_copy(data_dir, tmp_path), robomimic_copy(data_dir, tmp_path, "PickPlaceCan")
    assert robomimic_task("Hopper-v4", lift) == "lift" and robomimic_task("Hopper-v4", can) == "can"
    assert robomimic_task("Hopper-v4", str(data_dir / "hopper.hdf5")) is None  # make_dataset's: "gymnasium"
    assert robomimic_task("Hopper-v4", str(data_dir / "hopper.npz")) is None
    plain, _, no_shift = O.prepare_data(O.Args(env_id="Hopper-v4", dataset=str(data_dir / "hopper.hdf5")))
    shifted, task, shift = O.prepare_data(O.Args(env_id="Hopper-v4", dataset=lift))
    kept, _, zero = O.prepare_data(O.Args(env_id="Hopper-v4", dataset=lift, robomimic_reward_shift=False))
    assert (task, shift, no_shift, zero) == ("lift", -1.0, 0.0, 0.0)
    np.testing.assert_array_equal(shifted["rewards"], plain["rewards"] - 1.0)
    np.testing.assert_array_equal(kept["rewards"], plain["rewards"])
    assert O.bc_weights(O.Args(), O.task_family("Hopper-v4", task))[:2] == (10000.0, 1000.0)


class InterruptAt(gym.Wrapper):
    """Sends this process a SIGINT (Ctrl-C) during its `at`-th step."""

    def __init__(self, env, at):
        super().__init__(env)
        self.at, self.steps = at, 0

    def step(self, action):
        self.steps += 1
        if self.steps == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.env.step(action)

    def get_state(self):  # for the checkpoint the Ctrl-C writes
        return self.env.get_state()


def test_decoded_two_phase_run_shifts_robomimic_rewards_grows_the_buffer_and_stops_on_ctrl_c(data_dir, tmp_path, monkeypatch):
    """In-process: Flow-T, the paper's two-phase schedule, a Robomimic-labelled dataset; Ctrl-C at online step 150
    (run step 170) checkpoints and stops."""
    monkeypatch.chdir(tmp_path)
    make_env = common.env.make_env  # the training env (seeded --seed) is interrupted, not the evaluation env
    monkeypatch.setattr(common.env, "make_env", lambda env_id, seed, render=False:
                        InterruptAt(make_env(env_id, seed, render), 150) if seed == 1 else make_env(env_id, seed, render))
    args = tiny_args("decoded", env_id="Hopper-v4", dataset=robomimic_copy(data_dir, tmp_path), schedule="two-phase",
                     offline_steps=20, total_timesteps=1000, learning_starts=50, log_every=10, eval_every=100, eval_episodes=1)
    out = O.train(args)
    assert out["stopped"] == "SIGINT" and out["compiles"] == 2 and out["bc_weights"] == (10000.0, 1000.0)
    assert [step for step, _ in list_checkpoints(out["run_dir"])] == [170]
    n, buf = out["n_data"], jax.device_get(unstack(out["buffer"]))
    assert int(buf.size) == int(buf.pos) == n + 150  # the dataset, then every online step up to the Ctrl-C
    plain = load_dataset(str(data_dir / "hopper.hdf5"), "Hopper-v4")
    np.testing.assert_allclose(buf.rewards[:n], plain["rewards"] - 1.0)
    # Each online episode's stored rewards sum to the env's return minus its length (r - 1 per step).
    ends = np.flatnonzero(buf.ends[n:n + 150])
    assert len(out["returns"][0]) == len(ends) >= 1
    assert buf.rewards[n:n + ends[0] + 1].sum() == pytest.approx(out["returns"][0][0] - (ends[0] + 1), rel=1e-4)
    s = read_scalars(out["run_dir"])  # the logs were written and closed
    assert sorted(k for k in s if k.startswith("losses/")) == [f"losses/{k}" for k in sorted(["flow_loss"] + ONLINE)]
    assert [p[0] for p in s["losses/flow_loss"]] == [10, 20]
    for name in ONLINE:  # updates after online step 50 (run step 70): logged at 80, 90, ..., 170
        assert [p[0] for p in s[f"losses/{name}"]] == [*([10, 20] if name.startswith("qf") else []), *range(80, 171, 10)]
        assert all_finite(s[f"losses/{name}"])
    assert [p[0] for p in s["eval/episodic_return"]] == [20, 100]  # the end of the offline phase, then every 100 steps


# ---------------------------------------------------------------------------------------------
# Pretraining: the flow-matching loss falls and the policy imitates the data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("velocity", ["gated", "decoded"])
def test_pretraining_fits_the_demonstrations(velocity, data_dir):
    small = {"gated": dict(hidden_dim=64, gate_dim=32), "decoded": dict(d_model=32, n_heads=2, n_layers=1)}[velocity]
    args = dataclasses.replace(O.Args(), dataset=str(data_dir / "hopper.npz"), env_id="Hopper-v4", velocity=velocity,
                               schedule="two-phase", batch_size=128, learning_rate=1e-3, critic_width=16, critic_depth=1, **small)
    data = load_dataset(args.dataset, "Hopper-v4")
    H, A = args.horizon, 3
    buf = chunk_buffer(data, len(data["obs"]))
    agent = stack(O.create_agent(args, 11, A, jax.random.PRNGKey(0)))  # one seed
    offline, _ = O.make_updates(args, A, 0.0, 0.0)
    sample = O.make_sampler(args, agent.actor.apply_fn, H * A)
    actor_apply = agent.actor.apply_fn
    held = jax.device_get(sample_chunks(buf, jax.random.PRNGKey(99), 2048, H, args.gamma))
    x0 = jax.random.normal(jax.random.PRNGKey(5), held.actions.shape)
    t = jax.random.uniform(jax.random.PRNGKey(6), (2048, 1))
    x_t = ((1 - t) * x0.reshape(2048, -1) + t * held.actions.reshape(2048, -1))

    @jax.jit
    def fm_loss_and_imitation(params):
        v = actor_apply(params, held.obs, x_t, t).reshape(held.actions.shape)  # Eq. 3 on a fixed held batch
        a, _ = sample(params, held.obs, jax.random.PRNGKey(7), args.act_noise_std)  # the sampled chunk at the data's states
        return O.flow_matching_loss(v, x0, held.actions, held.valid), O.bc_loss(a.reshape(held.actions.shape), held.actions, held.valid)

    before, imitation_before = map(float, fm_loss_and_imitation(unstack(agent.actor.params)))
    seed_buf = stack(buf)
    for _ in range(800):
        agent, info = offline(agent, seed_buf)
    after, imitation_after = map(float, fm_loss_and_imitation(unstack(agent.actor.params)))
    assert np.all(np.asarray(info["finite"]))
    print(f"{velocity}: flow-matching loss {before:.3f} -> {after:.3f}, imitation error {imitation_before:.3f} -> {imitation_after:.3f}")
    assert after < 0.6 * before, (before, after)
    assert imitation_after < 0.6 * imitation_before, (imitation_before, imitation_after)


# ---------------------------------------------------------------------------------------------
# End to end from the command line (Flow-T with two phases runs in-process above)
# ---------------------------------------------------------------------------------------------


def test_gated_three_phase_offline_then_online_from_the_command_line(data_dir, tmp_path):
    r = run_script("sac_flow_o2o.py", ["--env-id", CUBE, "--dataset", str(data_dir / "cube.hdf5"), *E2E, "--velocity", "gated",
                                       "--hidden-dim", "16", "--gate-dim", "8", "--track"], cwd=tmp_path,
                   env={"WANDB_MODE": "offline"})  # wandb offline: no network here (XLA_FLAGS from conftest)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "BC weight 300 offline, 300 online (the paper's Table 4 for cube-double)" in r.stdout
    s = read_scalars(only_run_dir(tmp_path))
    assert [p[0] for p in s["losses/flow_loss"]] == [50, 100, 150] and all_finite(s["losses/flow_loss"])
    for name in ONLINE:  # three-phase: Eq. 12 and alpha run offline too; online updates after online step 60
        points = s[f"losses/{name}"]
        assert [p[0] for p in points] == [50, 100, 150, 150 + 100, 150 + 150] and all_finite(points), name
    for tag in ("episodic_return", "success_rate"):  # OGBench reports success: the end of each phase
        assert [p[0] for p in s[f"eval/{tag}"]] == [150, 300]
    assert s["charts/SPS"]
    assert_wandb_matches_tensorboard(only_run_dir(tmp_path), ["losses/flow_loss", "losses/qf_loss", "eval/episodic_return",
                                                              "charts/SPS"], {"velocity": "gated", "schedule": "three-phase"})
    # --eval-only rebuilds the actor from the run's last checkpoint and reports OGBench's success rate.
    r = run_script("sac_flow_o2o.py", ["--eval-only", "--checkpoint", only_run_dir(tmp_path), "--eval-episodes", "2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{CUBE}: eval return" in r.stdout and "over 2 episodes, success rate" in r.stdout, r.stdout


# ---------------------------------------------------------------------------------------------
# Resume: through the offline phase and the online phase, mid-chunk, many seeds
# ---------------------------------------------------------------------------------------------


def test_resumed_run_is_bit_identical_through_both_phases(data_dir, tmp_path, monkeypatch):
    """2 seeds, 60 offline steps then 140 env steps straight == resumed at step 40 (offline) to 133 (online,
    mid-chunk), then to 200: agent, acting state (keys, chunks), buffer, envs, RNGs and the logs."""
    monkeypatch.chdir(tmp_path)
    base = ["--env-id", "Hopper-v4", "--dataset", str(data_dir / "hopper.npz"), "--num-seeds", "2", "--offline-steps", "60",
            "--learning-starts", "30", "--batch-size", "16", "--critic-width", "32", "--critic-depth", "1", "--flow-steps", "2",
            "--hidden-dim", "16", "--gate-dim", "8", "--log-every", "10", "--eval-every", "50", "--eval-episodes", "1",
            "--buffer-size", "5000", "--no-progress"]
    assert O.main(base + ["--total-timesteps", "140", "--exp-name", "straight"]) == 0
    # The offline phase alone, checkpointed at 40 and 60; the resume starts from 40 (the newer one removed).
    assert O.main(base + ["--total-timesteps", "0", "--checkpoint-every", "40", "--exp-name", "pieces"]) == 0
    (straight,), (pieces,) = ([os.path.dirname(d) for d in glob.glob(f"runs/*__{name}__*/checkpoints")]
                              for name in ("straight", "pieces"))  # the run folder (the seeds' logs are beside it)
    assert [step for step, _ in list_checkpoints(pieces)] == [40, 60]
    os.unlink(list_checkpoints(pieces)[-1][1])
    assert O.main(["--resume", pieces, "--total-timesteps", "73", "--no-progress"]) == 0
    ckpt = read_container(list_checkpoints(pieces)[-1][1], "test")
    assert ckpt["step"] == 133 and np.any(ckpt["state"]["k_act"]["2"] > 0)  # online, a chunk partly played
    assert O.main(["--resume", pieces, "--total-timesteps", "140", "--no-progress"]) == 0
    done = {name: read_container(list_checkpoints(folder)[-1][1], "test") for name, folder in
            (("straight", straight), ("pieces", pieces))}
    assert done["straight"]["step"] == done["pieces"]["step"] == 200
    for key in ["state", "buffer", "env", "obs", "rng"]:
        assert_same_tree(done["straight"][key], done["pieces"][key], key)
    for seed in (1, 2):
        logs_straight, logs_resumed = read_scalars(f"{straight}__s{seed}"), read_scalars(f"{pieces}__s{seed}")
        assert sorted(logs_straight) == sorted(logs_resumed)
        for tag, points in logs_straight.items():
            if not tag.startswith("charts/SPS"):
                assert logs_resumed[tag] == points, tag


def test_a_nan_online_reward_stops_the_run_with_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real, calls = common.env.env_step, [0]

    def env_step(env, obs, action):  # the 40th online step's reward is NaN
        transition, obs, episode = real(env, obs, action)
        calls[0] += 1
        return (transition[:2] + (np.float32("nan"),) + transition[3:] if calls[0] == 40 else transition), obs, episode

    monkeypatch.setattr(common.env, "env_step", env_step)
    argv = ["--env-id", "Hopper-v4", "--dataset", str(data_dir / "hopper.npz"), "--offline-steps", "20", "--total-timesteps",
            "3000", "--learning-starts", "10", "--batch-size", "512", "--critic-width", "16", "--critic-depth", "1",
            "--flow-steps", "2", "--hidden-dim", "16", "--gate-dim", "8", "--checkpoint-every", "50", "--eval-episodes", "0",
            "--buffer-size", "5000", "--no-progress"]
    assert O.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "losses/qf_loss" in err[0] and "became NaN or infinite at step" in err[0], err
    assert 20 + 40 <= int(err[0].split("at step ")[1].split(":")[0]) <= 3020  # once a batch holds the NaN row
    (run_dir,) = glob.glob("runs/*")
    assert f"the last good checkpoint is {list_checkpoints(run_dir)[-1][1]}" in err[0]


# ---------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing created
# ---------------------------------------------------------------------------------------------


BASE = ["--env-id", "Hopper-v4", "--dataset", "{hopper}"]


@pytest.mark.parametrize("argv,message", [
    (["--env-id", "Hopper-v4"], "--dataset is required"),
    ([*BASE, "--horizon", "0"], "--horizon must be positive"),
    ([*BASE, "--noise-std", "0"], "--noise-std must be positive"),
    ([*BASE, "--bc-weight", "-1"], "--bc-weight must be >= 0"),
    ([*BASE, "--online-bc-weight", "-1"], "--online-bc-weight must be >= 0"),
    ([*BASE, "--online-steps", "-5"], "--total-timesteps must be >= 0"),
    ([*BASE, "--offline-steps", "-1"], "--offline-steps must be >= 0"),
    ([*BASE, "--resume", "nowhere"], "--resume 'nowhere' does not exist"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    ([*BASE, "--time-emb-dim", "7"], "--time-emb-dim must be an even number"),
    ([*BASE, "--d-model", "10", "--n-heads", "4"], "a multiple of --n-heads 4"),
    ([*BASE, "--gamma", "1.5"], "--gamma must be in [0.0, 1.0]"),
    ([*BASE, "--tau", "0"], "--tau must be in (0.0, 1.0]"),
    ([*BASE, "--env-id", "lift-mh-low_dim"], "is a Robomimic task, whose simulator (robosuite) is not wired"),
    ([*BASE, "--env-id", "Hoper-v4"], "unknown --env-id 'Hoper-v4'"),
    ([*BASE, "--env-id", "Walker2d-v4"], "observes 17"),
    (["--env-id", "Hopper-v4", "--dataset", "missing.npz"], "does not exist"),
    ([*BASE, "--horizon", "4000"], "fewer than one chunk of --horizon 4000"),
    ([*BASE, "--sparse"], "--sparse needs rewards <= 0"),
    ([*BASE, "--buffer-size", "0"], "--buffer-size must be positive"),
])
def test_bad_flags_and_datasets_are_refused_in_one_line(argv, message, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert O.main([a.format(hopper=data_dir / "hopper.npz") for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "runs")


def test_a_bad_dataset_is_one_line_from_the_command_line(data_dir, tmp_path):
    r = run_script("sac_flow_o2o.py", ["--env-id", "Walker2d-v4", "--dataset", str(data_dir / "hopper.npz")], cwd=tmp_path)
    assert r.returncode == 2 and "observes 17" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / "runs")


# ---------------------------------------------------------------------------------------------
# The offline-to-online velocities are the from-scratch scripts' own modules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("velocity", ["gated", "decoded"])
def test_o2o_velocity_and_log_density_equal_the_from_scratch_modules(velocity):
    # The same parameters in both files give the same velocity, and the same chunk and log-density from
    # the fixed-noise rollout as the from-scratch rollout with the same noise (their actors without
    # batch renormalisation, which the authors' offline-to-online actors do not have).
    import sac_flow_g
    import sac_flow_t

    sizes = dict(hidden_dim=16, time_emb_dim=8, d_model=16, n_heads=2, n_layers=2, flow_steps=3)
    o2o_args = O.Args(dataset="unused.npz", velocity=velocity, architecture="from-scratch", **sizes)
    obs_dim, chunk_dim, B = 7, 10, 6
    rng = np.random.default_rng(0)
    s = jnp.array(rng.normal(size=(B, obs_dim)), jnp.float32)
    x = jnp.array(rng.normal(size=(B, chunk_dim)), jnp.float32)
    t = jnp.full((B, 1), 0.25)
    chunk_velocity = O.make_velocity(o2o_args, chunk_dim)
    params = chunk_velocity.init(jax.random.PRNGKey(1), s, x, t)
    if velocity == "gated":
        scratch = sac_flow_g.GatedVelocity(chunk_dim, 16, 8)
        v_scratch = scratch.apply({"params": params["params"]["velocity"]}, s, x, t)
    else:
        scratch = sac_flow_t.DecodedVelocity(chunk_dim, 16, 2, 2)
        v_scratch = scratch.apply({"params": params["params"]["velocity"]}, s, x, t,
                                  method=lambda m, s_, x_, t_: m(m.encode_state(s_), x_, t_)[0])
    v_o2o = np.asarray(chunk_velocity.apply(params, s, x, t))
    np.testing.assert_array_equal(v_o2o, np.asarray(v_scratch))

    noise_std, key = 0.1, jax.random.PRNGKey(5)
    chunk, log_pi = O.make_sampler(o2o_args, chunk_velocity.apply, chunk_dim)(params, s, key, noise_std)
    module = sac_flow_g if velocity == "gated" else sac_flow_t
    log_sigma = np.log(noise_std) + 0.5 * np.log(3.0)  # sigma sqrt(dt) = noise_std
    step = lambda x_, t_, k: (chunk_velocity.apply(params, s, x_, jnp.full((B, 1), t_)), jnp.full(x_.shape, log_sigma))
    want_chunk, want_log_pi, _ = module.flow_rollout(step, (B, chunk_dim), key, 3, "plain", "sqrt-dt")
    np.testing.assert_allclose(np.asarray(chunk), np.asarray(want_chunk), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(log_pi), np.asarray(want_log_pi), rtol=1e-6, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# --architecture authors: the authors' offline-to-online velocity networks, against a hand-written reference
# ---------------------------------------------------------------------------------------------


def np_dense(p, x):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def np_gelu(x):  # flax's gelu is the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_layer_norm(p, x, eps=1e-6):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)


def np_attention(p, query, memory, heads):
    """Their MultiHeadAttention: q, k, v projections, softmax(q k^T / sqrt(head_dim)) v over heads, output projection."""
    q, k, v = np_dense(p["query"], query), np_dense(p["key"], memory), np_dense(p["value"], memory)
    split = lambda y: y.reshape(y.shape[0], y.shape[1], heads, -1).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    out = (w / w.sum(-1, keepdims=True)) @ v
    return np_dense(p["out"], out.transpose(0, 2, 1, 3).reshape(query.shape))


def test_authors_flow_g_velocity_layer_by_layer():
    """Their ActorVectorFieldGRU: MLP (4 x 512 GELU, Xavier-uniform) on [s, x, t] to the candidate, a 256-wide swish
    gate starting at sigmoid(5); shapes, parameter count and one forward pass by hand."""
    obs_dim, chunk, B = 7, 10, 5
    args = O.Args(dataset="unused.npz", velocity="gated")
    assert (args.architecture, args.hidden_dim, args.gate_dim) == ("authors", 512, 256)
    module = O.make_velocity(args, chunk)
    rng = np.random.default_rng(0)
    s, x, t = (jnp.array(rng.normal(size=(B, n)), jnp.float32) for n in (obs_dim, chunk, 1))
    params = module.init(jax.random.PRNGKey(0), s, x, t)
    p = params["params"]["velocity"]
    n_in = obs_dim + chunk + 1
    shapes = {name: p[name]["kernel"].shape for name in p}
    assert shapes == {"candidate_0": (n_in, 512), "candidate_1": (512, 512), "candidate_2": (512, 512), "candidate_3": (512, 512),
                      "candidate_out": (512, chunk), "gate_hidden": (n_in, 256), "gate_out": (256, chunk)}
    count = sum(x.size for x in jax.tree_util.tree_leaves(p))
    assert count == (n_in * 512 + 512) + 3 * (512 * 512 + 512) + (512 * chunk + chunk) + (n_in * 256 + 256) + (256 * chunk + chunk)
    assert np.all(np.asarray(p["gate_out"]["kernel"]) == 0) and np.all(np.asarray(p["gate_out"]["bias"]) == 5)
    # Xavier-uniform: bound sqrt(6 / (fan_in + fan_out))
    assert np.abs(np.asarray(p["candidate_1"]["kernel"])).max() <= np.sqrt(6 / 1024) + 1e-7
    p = jax.tree_util.tree_map(lambda a: a + 0.01 * jnp.arange(a.size, dtype=a.dtype).reshape(a.shape) % 0.3, p)  # a gate that varies
    u = np.concatenate([np.asarray(a, np.float64) for a in (s, x, t)], -1)
    h = u
    for i in range(4):
        h = np_gelu(np_dense(p[f"candidate_{i}"], h))
    h = np_dense(p["candidate_out"], h)
    z = 1 / (1 + np.exp(-np_dense(p["gate_out"], (lambda g: g / (1 + np.exp(-g)))(np_dense(p["gate_hidden"], u)))))
    got = np.asarray(module.apply({"params": {"velocity": p}}, s, x, t))
    np.testing.assert_allclose(got, z * (h - np.asarray(x, np.float64)), rtol=2e-4, atol=2e-5)


def test_authors_flow_t_velocity_layer_by_layer():
    """Their FlowMatchingTransformerActor: state encoder d/2-SiLU-d, time MLP d/4-SiLU-d/2-SiLU-d, action projection,
    post-LayerNorm blocks x <- LN(x + f(x)) (self-attention, cross-attention, 4d GELU feed-forward), no final
    LayerNorm, a linear head; d_model 128. Shapes, parameter count and one forward pass by hand."""
    obs_dim, chunk, B, d, heads, layers = 7, 10, 5, 128, 4, 2
    args = O.Args(dataset="unused.npz", velocity="decoded")
    assert (args.architecture, args.d_model, args.n_heads, args.n_layers) == ("authors", d, heads, layers)
    module = O.make_velocity(args, chunk)
    rng = np.random.default_rng(1)
    s, x, t = (jnp.array(rng.normal(size=(B, n)), jnp.float32) for n in (obs_dim, chunk, 1))
    p = module.init(jax.random.PRNGKey(1), s, x, t)["params"]["velocity"]
    assert "norm_out" not in p and sorted(p) == ["action_embedding", "blocks_0", "blocks_1", "state_encoder_0",
                                                 "state_encoder_1", "time_mlp_0", "time_mlp_1", "time_mlp_2", "velocity_head"]
    dense = lambda i, o: i * o + o
    attention = 4 * dense(d, d)
    block = 2 * attention + dense(d, 4 * d) + dense(4 * d, d) + 3 * 2 * d
    want = (dense(obs_dim, d // 2) + dense(d // 2, d) + dense(1, d // 4) + dense(d // 4, d // 2) + dense(d // 2, d)
            + dense(chunk, d) + layers * block + dense(d, chunk))
    assert sum(a.size for a in jax.tree_util.tree_leaves(p)) == want
    silu = lambda y: y / (1 + np.exp(-y))
    f64 = lambda a: np.asarray(a, np.float64)
    memory = np_dense(p["state_encoder_1"], silu(np_dense(p["state_encoder_0"], f64(s))))[:, None, :]
    time = np_dense(p["time_mlp_2"], silu(np_dense(p["time_mlp_1"], silu(np_dense(p["time_mlp_0"], f64(t))))))
    token = (np_dense(p["action_embedding"], f64(x)) + time)[:, None, :]
    for i in range(layers):
        b = p[f"blocks_{i}"]
        token = np_layer_norm(b["norm_self"], token + np_attention(b["self_attention"], token, token, heads))
        token = np_layer_norm(b["norm_cross"], token + np_attention(b["cross_attention"], token, memory, heads))
        ffn = np_dense(b["Dense_0"], np_gelu(np_dense(b["Dense_1"], token)))  # flax names the outer Dense first
        token = np_layer_norm(b["norm_ffn"], token + ffn)
    want_v = np_dense(p["velocity_head"], token[:, 0, :])
    got = np.asarray(module.apply({"params": {"velocity": p}}, s, x, t))
    np.testing.assert_allclose(got, want_v, rtol=2e-4, atol=2e-4)
