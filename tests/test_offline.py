"""Offline-to-online SAC Flow: the dataset loaders (and their errors), the chunk sampler, the losses,
flow-matching pretraining, and short offline-then-online runs of both scripts."""

import dataclasses
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sac_flow_g as G
import sac_flow_t as T
from benchmarks import make_dataset
from common.buffer import sample_chunks, sequence_add, sequence_buffer
from common.datasets import load_dataset
from common.env import ConfigError
from helpers import all_finite, only_run_dir, read_scalars, run_script

CUBE = "cube-double-singletask-task2-v0"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Datasets made by the repo's generator: Hopper (linear policy) and cube-double (OGBench oracle), both layouts."""
    d = tmp_path_factory.mktemp("datasets")
    for env_id, name, steps in [("Hopper-v4", "hopper", 3000), (CUBE, "cube", 1500)]:
        for ext in ("npz", "hdf5"):
            assert make_dataset.main(["--env-id", env_id, "--steps", str(steps), "--out", str(d / f"{name}.{ext}"),
                                      "--episode-length", "500"]) == 0
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
    buf = sequence_buffer(d, n + 3)
    buf = sequence_add(buf, np.full(1, 40.0), np.zeros(2), 1.0, np.full(1, 41.0), 0.0, 0.0)
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


def test_flow_matching_and_bc_losses_by_hand():
    v = jnp.array([[[1.0, 2.0], [0.0, 0.0]]])  # (B=1, H=2, A=2)
    x0 = jnp.array([[[0.5, 0.5], [1.0, 1.0]]])
    x1 = jnp.array([[[1.0, 1.0], [3.0, -1.0]]])
    # target x1 - x0 = [[0.5, 0.5], [2, -2]]; errors^2 = [0.25, 2.25], [4, 4]; the second action is past the end
    assert float(G.flow_matching_loss(v, x0, x1, jnp.array([[1.0, 0.0]]))) == pytest.approx((0.25 + 2.25) / 4)
    assert float(T.flow_matching_loss(v, x0, x1, jnp.ones((1, 2)))) == pytest.approx((0.25 + 2.25 + 8) / 4)
    assert float(G.bc_loss(v, x1, jnp.ones((1, 2)))) == pytest.approx((0 + 1 + 9 + 1) / 4)


# ---------------------------------------------------------------------------------------------
# Pretraining: the flow-matching loss falls and the policy imitates the data
# ---------------------------------------------------------------------------------------------


TINY_O2O = {
    G: dict(hidden_dim=64, time_emb_dim=16),
    T: dict(d_model=32, n_heads=2, n_layers=1),
}


@pytest.mark.parametrize("module", [G, T], ids=["flow_g", "flow_t"])
def test_pretraining_fits_the_demonstrations(module, data_dir):
    args = dataclasses.replace(module.Args(), offline_dataset=str(data_dir / "hopper.npz"), o2o_batch_size=128, o2o_lr=1e-3,
                               o2o_critic_width=32, o2o_critic_depth=2, **TINY_O2O[module])
    data = load_dataset(args.offline_dataset, "Hopper-v4")
    H, A = args.horizon, 3
    buf = sequence_buffer(data, len(data["obs"]))
    agent = module.create_chunk_agent(args, 11, H * A, jax.random.PRNGKey(0))
    pretrain, _ = module.make_chunk_update(args, A)
    act = jax.jit(module.make_chunk_policy(args, agent.actor.apply_fn, H * A))
    actor_apply = agent.actor.apply_fn
    held = jax.device_get(sample_chunks(buf, jax.random.PRNGKey(99), 2048, H, args.gamma))
    x0 = jax.random.normal(jax.random.PRNGKey(5), held.actions.shape)
    t = jax.random.uniform(jax.random.PRNGKey(6), (2048, 1))
    x_t = ((1 - t) * x0.reshape(2048, -1) + t * held.actions.reshape(2048, -1))

    def fm_loss(params):  # Eq. 3 on a fixed held batch
        v = actor_apply(params, held.obs, x_t, t)[0].reshape(held.actions.shape)
        return float(module.flow_matching_loss(v, x0, held.actions, held.valid))

    def imitation_error(params):  # the sampled chunk against the dataset's chunk, at the dataset's states
        a, _ = act(params, held.obs, jax.random.PRNGKey(7), args.act_noise_std)
        return float(module.bc_loss(a.reshape(held.actions.shape), held.actions, held.valid))

    before, imitation_before = fm_loss(agent.actor.params), imitation_error(agent.actor.params)
    for _ in range(800):
        agent, info = pretrain(agent, buf)
    after, imitation_after = fm_loss(agent.actor.params), imitation_error(agent.actor.params)
    assert np.all(np.asarray(info["finite"]))
    print(f"flow-matching loss {before:.3f} -> {after:.3f}, imitation error {imitation_before:.3f} -> {imitation_after:.3f}")
    assert after < 0.6 * before, (before, after)
    assert imitation_after < 0.6 * imitation_before, (imitation_before, imitation_after)


# ---------------------------------------------------------------------------------------------
# End to end: offline, then online, from the command line and in-process
# ---------------------------------------------------------------------------------------------

E2E = ["--offline-steps", "150", "--total-timesteps", "260", "--o2o-learning-starts", "60", "--o2o-batch-size", "32",
       "--o2o-critic-width", "32", "--o2o-critic-depth", "2", "--log-every", "50", "--eval-every", "150",
       "--eval-episodes", "1", "--no-progress"]


@pytest.mark.parametrize("script,dataset,env_id,small", [
    ("sac_flow_g.py", "cube.hdf5", CUBE, ["--hidden-dim", "16", "--time-emb-dim", "8"]),
    ("sac_flow_t.py", "hopper.npz", "Hopper-v4", ["--d-model", "16", "--n-heads", "2", "--n-layers", "1"]),
], ids=["flow_g_cube_hdf5", "flow_t_hopper_npz"])
def test_offline_then_online_from_the_command_line(script, dataset, env_id, small, data_dir, tmp_path):
    r = run_script(script, ["--env-id", env_id, "--offline-dataset", str(data_dir / dataset), *E2E, *small], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = read_scalars(only_run_dir(tmp_path))
    for name in ["qf_loss", "qf_values", "flow_loss"]:
        points = s[f"losses/offline_{name}"]
        assert [p[0] for p in points] == [50, 100, 150] and all_finite(points), name
    for name in ["qf_loss", "actor_loss", "bc_loss", "q_pi", "entropy", "alpha"]:
        points = s[f"losses/online_{name}"]
        assert points and all(150 + 60 < p[0] <= 150 + 260 for p in points) and all_finite(points), name
    assert [p[0] for p in s["eval/offline_episodic_return"]] == [150]
    assert [p[0] for p in s["eval/online_episodic_return"]] == [300, 410]
    if env_id == CUBE:  # OGBench reports success; it is logged per phase
        assert [p[0] for p in s["eval/offline_success_rate"]] == [150]
        assert [p[0] for p in s["eval/online_success_rate"]] == [300, 410]
    else:
        assert "eval/online_success_rate" not in s and s["charts/episodic_return"]


def test_online_phase_extends_the_dataset_buffer(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = dataclasses.replace(G.Args(), env_id="Hopper-v4", offline_dataset=str(data_dir / "hopper.npz"), offline_steps=20,
                               total_timesteps=120, o2o_learning_starts=50, o2o_batch_size=16, o2o_critic_width=16,
                               o2o_critic_depth=1, hidden_dim=16, time_emb_dim=8, eval_episodes=0, progress=False)
    out = G.train_offline_to_online(args)
    assert out["buffer_size"] == out["n_data"] + 120 and out["compiles"] == (1, 1)
    assert out["episodes"]["returns"] and not out["stopped"]


@pytest.mark.parametrize("extra,message", [
    (["--num-seeds", "2"], "--num-seeds is not supported with --offline-dataset"),
    (["--horizon", "0"], "--horizon must be positive"),
    (["--bc-weight", "-1"], "--bc-weight must be >= 0"),
])
def test_bad_offline_flags_are_refused_in_one_line(extra, message, data_dir, tmp_path):
    r = run_script("sac_flow_g.py", ["--offline-dataset", str(data_dir / "hopper.npz"), *extra], cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_bad_dataset_is_one_line_from_the_command_line(data_dir, tmp_path):
    r = run_script("sac_flow_t.py", ["--env-id", "Walker2d-v4", "--offline-dataset", str(data_dir / "hopper.npz")], cwd=tmp_path)
    assert r.returncode == 2 and "observes 17" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / "runs")
