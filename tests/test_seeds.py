"""--num-seeds: agent i of a many-seed run is the single run --seed X+i; sharding changes nothing;
many-seed runs log per seed, resume exactly and name the seed that diverged."""

import glob
import importlib
import os

import jax
import numpy as np
import pytest

from common.buffer import buffer_init
from common.checkpoint import list_checkpoints, read_container, unpack_buffer, write_atomic
from helpers import TINY, assert_same_tree, read_scalars, run_script, stable_log_det_script, stable_tanh_log_det

# 200 random steps, then 10 updates (later, Adam's sign-like steps on near-zero gradients let float
# noise grow past any tight tolerance); the buffer (300) holds every transition.
SHORT = ["--env-id", "Hopper-v4", "--buffer-size", "300", "--log-every", "50", "--eval-every", "210", "--eval-episodes", "1",
         "--no-progress", "--total-timesteps", "210", "--learning-starts", "200", "--checkpoint-every", "210"]


def run(module, argv, code=0):
    assert module.main(argv) == code


def checkpoint_dir(name, root="runs"):
    """The run folder (the one holding checkpoints/, not a per-seed log folder) of --exp-name `name`."""
    (found,) = [d for d in glob.glob(os.path.join(root, f"*__{name}__*")) if os.path.isdir(os.path.join(d, "checkpoints"))]
    return found


def final(name, root="runs"):
    return read_container(list_checkpoints(checkpoint_dir(name, root))[-1][1], "test")


def buffer_of(ckpt, i):
    return unpack_buffer(buffer_init(300, 11, 3), ckpt["buffer"][i], "test")


def assert_close_leaves(a, b, what):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        # The vmapped and single updates differ by float noise (1e-10 after one update), which Adam (b1 0.5)
        # grows to 7e-5 in ten (seen with Flow-T's batch-renormalised actor); a wrong seed slice or key would
        # differ by whole Adam steps (1e-3 at the critics' lr)
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-3, atol=1e-4, err_msg=what)


@pytest.mark.parametrize("name", ["sac_flow_g", "sac_flow_t"])
def test_the_stable_tanh_log_det_is_the_scripts_away_from_saturation(name):
    # The comparisons below run the scripts with it: the same function as theirs up to its + 1e-6.
    module = importlib.import_module(name)
    x = np.linspace(-3.0, 3.0, 60, dtype=np.float32).reshape(-1, 3)
    for scale in (1.0, 0.4):
        np.testing.assert_allclose(stable_tanh_log_det(x, scale), module.tanh_log_det(x, scale), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", list(TINY))
def test_each_seed_of_a_many_seed_run_is_the_single_run_of_its_seed(tmp_path, monkeypatch, name):
    """--num-seeds 3 --seed 4 against --seed 4, 5, 6 alone: the same warm-up transitions bit for bit,
    then the same learned transitions and the same agent after 10 updates, to float tolerance (the
    seed axis is vmapped; a single run is not). Each seed logs to its own TensorBoard run."""
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    if hasattr(module, "tanh_log_det"):  # the authors' formula amplifies rounding: see stable_tanh_log_det
        monkeypatch.setattr(module, "tanh_log_det", stable_tanh_log_det)
    run(module, SHORT + TINY[name] + ["--num-seeds", "3", "--seed", "4", "--exp-name", "multi"])
    multi = final("multi")
    assert multi["args"]["num_seeds"] == 3 and len(multi["buffer"]) == 3 and len(multi["env"]) == 3
    for i, seed in enumerate([4, 5, 6]):
        run(module, SHORT + TINY[name] + ["--seed", str(seed), "--exp-name", f"single{seed}"])
        single = final(f"single{seed}")
        got, want = buffer_of(multi, i), buffer_of(single, 0)
        for field in ("obs", "actions", "rewards", "next_obs", "terminated"):
            a, b = np.asarray(getattr(got, field)), np.asarray(getattr(want, field))
            assert np.array_equal(a[:200], b[:200]), (seed, field)  # uniform warm-up actions: exact
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"seed {seed} {field}")
        assert int(got.size) == int(want.size) == 210
        assert_close_leaves(jax.tree_util.tree_map(lambda x: np.asarray(x)[i], multi["state"]),
                            jax.tree_util.tree_map(lambda x: np.asarray(x)[0], single["state"]), f"seed {seed} state")
        # Its own TensorBoard run, with what a single run logs.
        logs, single_logs = read_scalars(f"{checkpoint_dir('multi')}__s{seed}"), read_scalars(checkpoint_dir(f"single{seed}"))
        assert sorted(logs) == sorted(single_logs)
        assert [s for s, _ in logs["charts/episodic_return"]] == [s for s, _ in single_logs["charts/episodic_return"]]
    # Different seeds are different agents.
    assert not np.array_equal(np.asarray(buffer_of(multi, 0).obs), np.asarray(buffer_of(multi, 1).obs))


@pytest.mark.parametrize("name", ["flowrl_jax", "sac_flow_g"])
def test_sharded_over_two_devices_equals_one_device(tmp_path, name):
    """The seed axis sharded over 2 forced host devices gives the run on one device."""
    args = SHORT + TINY[name] + ["--num-seeds", "4", "--seed", "3"]
    script = stable_log_det_script(name, tmp_path)  # 4 seeds vmapped against 2 and 2: see stable_tanh_log_det
    one = run_script(script, args + ["--exp-name", "one"], str(tmp_path))
    assert one.returncode == 0, one.stderr[-2000:]
    assert "on 1 device(s)" in one.stdout
    two = run_script(script, args + ["--exp-name", "two"], str(tmp_path),
                     env={"XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"})
    assert two.returncode == 0, two.stderr[-2000:]
    assert "4 seeds (3 to 6) on 2 device(s)" in two.stdout and "update compiled 1 time(s)" in two.stdout
    a, b = final("one", tmp_path / "runs"), final("two", tmp_path / "runs")
    for i in range(4):
        for x, y in zip(buffer_of(a, i), buffer_of(b, i)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
    assert_close_leaves(a["state"], b["state"], "state")


@pytest.mark.parametrize("name", ["flowrl_jax", "sac_flow_g"])
def test_many_seed_run_resumes_bit_identically(tmp_path, monkeypatch, name):
    """2 seeds for 400 steps straight == 150 steps (before learning starts) + resume to 400, in every
    array of both seeds and in both seeds' logs."""
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    base = SHORT[:-6] + TINY[name] + ["--num-seeds", "2", "--learning-starts", "200"]
    run(module, base + ["--total-timesteps", "400", "--checkpoint-every", "400", "--exp-name", "straight"])
    run(module, base + ["--total-timesteps", "150", "--checkpoint-every", "150", "--exp-name", "pieces"])
    pieces = checkpoint_dir("pieces")
    run(module, ["--resume", pieces, "--total-timesteps", "400", "--no-progress"])
    a, b = final("straight"), final("pieces")
    assert b["step"] == 400
    for key in ["step", "state", "buffer", "env", "obs", "rng"]:
        assert_same_tree(a[key], b[key], key)
    for seed in (1, 2):
        logs_a, logs_b = read_scalars(f"{checkpoint_dir('straight')}__s{seed}"), read_scalars(f"{pieces}__s{seed}")
        assert sorted(logs_a) == sorted(logs_b)
        for tag in logs_a:
            if not tag.startswith("charts/SPS"):
                assert logs_a[tag] == logs_b[tag], (seed, tag)
    # --num-seeds is the checkpoint's: another count is refused in one line.
    run(module, ["--resume", pieces, "--num-seeds", "3", "--total-timesteps", "500", "--no-progress"], code=2)


def test_a_format_1_checkpoint_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """Checkpoints written before --num-seeds had no seed axis: refused, saying which version reads them."""
    module = importlib.import_module("flowrl_jax")
    monkeypatch.chdir(tmp_path)
    run(module, SHORT + TINY["flowrl_jax"] + ["--exp-name", "now"])
    path = list_checkpoints(checkpoint_dir("now"))[-1][1]
    now = read_container(path, "test")
    old = {**now, "format": 1, "args": {k: v for k, v in now["args"].items() if k != "num_seeds"},
           "state": jax.tree_util.tree_map(lambda x: np.asarray(x)[0], now["state"]), "buffer": now["buffer"][0],
           "env": now["env"][0], "obs": now["obs"][0], "meta": {**now["meta"], "last_return": now["meta"]["last_return"][0]}}
    write_atomic(str(tmp_path / "old.ckpt"), old)
    capsys.readouterr()
    run(module, ["--resume", str(tmp_path / "old.ckpt")], code=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has checkpoint format 1 (this version reads 2" in err[0], err


def test_eval_only_picks_the_agent_of_seed(tmp_path, monkeypatch, capsys):
    module = importlib.import_module("flowrl_jax")
    monkeypatch.chdir(tmp_path)
    run(module, SHORT + TINY["flowrl_jax"] + ["--num-seeds", "2", "--seed", "7", "--save-model", "--exp-name", "m"])
    run_dir = checkpoint_dir("m")
    assert os.path.isfile(f"{run_dir}__s8/m.msgpack")  # one model file per seed
    for seed in (7, 8):
        run(module, ["--eval-only", "--checkpoint", run_dir, "--seed", str(seed), "--eval-episodes", "1"])
    run(module, ["--eval-only", "--checkpoint", run_dir, "--seed", "9", "--eval-episodes", "1"], code=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the agents of seeds 7 to 8" in err[0], err


def test_divergence_names_the_seed():
    from common.checkpoint import Diverged, check_metrics, first_nonfinite

    info = {"a": None, "b": None, "finite": np.array([[True, True], [True, False]])}
    with pytest.raises(Diverged, match=r"losses/b of seed 6 became NaN or infinite at step 9"):
        check_metrics(info, 9, None, seeds=[5, 6])
    tree = {"w": np.ones((2, 3), np.float32), "b": np.array([[0.0], [np.inf]], np.float32)}
    assert first_nonfinite(tree, "agent", seeds=[5, 6]) == "agent['b'] of seed 6"
    assert first_nonfinite({"w": np.ones((2, 3), np.float32)}, "agent", seeds=[5, 6]) is None


def test_impossible_seed_counts_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    module = importlib.import_module("sac_flow_g")
    monkeypatch.chdir(tmp_path)
    run(module, ["--num-seeds", "0"], code=2)
    # 10^5 Humanoid buffers of 10^6 transitions: about 300 TB, refused before any folder or env is made
    run(module, ["--env-id", "Humanoid-v4", "--num-seeds", "100000", "--no-progress"], code=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--num-seeds must be positive, got 0" in err[0], err
    assert "--num-seeds 100000 x --buffer-size 1000000: the replay buffers need" in err[1] and "GiB" in err[1], err
    assert not os.path.exists("runs") or not os.listdir("runs")
