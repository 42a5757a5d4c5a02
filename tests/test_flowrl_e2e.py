"""flowrl_jax.py run as a user runs it: short trainings that cross --learning-starts, reload, bad input."""

import os

import pytest

from helpers import all_finite, only_run_dir, read_scalars, run_script

SMALL = ["--hidden-dim", "32", "--batch-size", "32", "--buffer-size", "5000", "--log-every", "100",
         "--eval-episodes", "1", "--no-progress", "--save-model"]
LOSSES = ["losses/qf_loss", "losses/qf_values", "losses/q_beta_loss", "losses/q_beta_values", "losses/value_loss",
          "losses/v_values", "losses/actor_loss", "losses/q_term", "losses/cfm_loss", "losses/weight"]


@pytest.mark.parametrize("env_id,steps,starts", [("Hopper-v4", 1200, 500), ("dm_control/cartpole-balance-v0", 1400, 400)])
def test_short_run_learns_logs_saves_and_reloads(tmp_path, env_id, steps, starts):
    result = run_script("flowrl_jax.py", ["--env-id", env_id, "--total-timesteps", str(steps), "--learning-starts",
                                          str(starts), "--eval-every", str(steps), *SMALL], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "update compiled 1 time(s)" in result.stdout  # no retracing across the run

    run_dir = only_run_dir(tmp_path)
    scalars = read_scalars(run_dir)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "eval/episodic_return", *LOSSES]:
        assert tag in scalars and scalars[tag] and all_finite(scalars[tag]), tag
    # real gradient steps ran: losses are logged from the first log point after learning starts
    assert scalars["losses/qf_loss"][0][0] == (starts // 100 + 1) * 100
    assert len(scalars["losses/qf_loss"]) == steps // 100 - starts // 100
    # both tasks pay about +1 a step, so the learned values climb from their near-zero start
    assert scalars["losses/qf_values"][-1][1] > scalars["losses/qf_values"][0][1] + 1.0
    assert scalars["losses/q_beta_values"][-1][1] > scalars["losses/q_beta_values"][0][1] + 1.0
    weights = [v for _, v in scalars["losses/weight"]]
    assert all(1e-3 <= w <= 1.0 for w in weights)

    model = os.path.join(run_dir, "flowrl_jax.msgpack")
    assert os.path.isfile(model)
    result = run_script("flowrl_jax.py", ["--eval-only", "--checkpoint", model, "--eval-episodes", "2", "--no-progress"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{env_id}: eval return" in result.stdout and "over 2 episodes" in result.stdout


def check_refused(tmp_path, args, *fragments):
    result = run_script("flowrl_jax.py", args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not os.path.exists(os.path.join(tmp_path, "runs"))  # nothing was started
    return lines[0]


@pytest.mark.parametrize("args,fragments", [
    (["--env-id", "Hoper-v4"], ["unknown --env-id 'Hoper-v4'", "Hopper-v4", "dm_control/<domain>-<task>-v0"]),
    (["--env-id", "dm_control/dog-sprint-v0"], ["unknown --env-id 'dm_control/dog-sprint-v0'"]),
    (["--keep-checkpoints", "0"], ["--keep-checkpoints must be at least 1, got 0"]),
    (["--batch-size", "512", "--buffer-size", "100"], ["--batch-size 512", "--buffer-size 100"]),
    (["--learning-rate", "0"], ["--learning-rate must be positive, got 0"]),
    (["--batch-size", "-4"], ["--batch-size must be positive, got -4"]),
    (["--tau", "1.5"], ["--tau must be in [0.0, 1.0], got 1.5"]),
    (["--expectile", "1.0"], ["--expectile must be in (0, 1)"]),
    (["--flow-steps", "0"], ["--flow-steps must be positive, got 0"]),
    (["--eval-only"], ["--eval-only needs --checkpoint"]),
    (["--eval-only", "--checkpoint", "missing.msgpack"], ["--checkpoint 'missing.msgpack' does not exist"]),
])
def test_bad_input_is_one_line_and_no_traceback(tmp_path, args, fragments):
    check_refused(tmp_path, args, *fragments)


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    garbage = tmp_path / "garbage.msgpack"
    garbage.write_bytes(b"\x00not a model at all" * 10)
    check_refused(tmp_path, ["--eval-only", "--checkpoint", str(garbage)], "corrupt")

    from flax import serialization

    from common.checkpoint import save_model

    foreign = tmp_path / "foreign.msgpack"
    save_model(str(foreign), "sac_flow_g", {}, {})
    check_refused(tmp_path, ["--eval-only", "--checkpoint", str(foreign)], "was written by sac_flow_g, not flowrl")

    truncated = tmp_path / "truncated.msgpack"
    empty_actor = tmp_path / "empty.msgpack"
    save_model(str(empty_actor), "flowrl", {"env_id": "Hopper-v4", "hidden_dim": 8, "flow_steps": 1, "integrator": "midpoint"},
               {"actor": {}})
    good = empty_actor.read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    check_refused(tmp_path, ["--eval-only", "--checkpoint", str(truncated)], "truncated")
    check_refused(tmp_path, ["--eval-only", "--checkpoint", str(empty_actor)], "does not fit this network")

    bare = tmp_path / "bare.msgpack"  # a model file of the format before the checkpoint container
    bare.write_bytes(serialization.msgpack_serialize({"algo": "flowrl", "config": {}, "params": {}}))
    check_refused(tmp_path, ["--eval-only", "--checkpoint", str(bare)], "bare msgpack, are no longer read")


def test_same_seed_same_run(tmp_path):
    """Env, action space, numpy and JAX are all seeded: two runs with one seed log the same numbers."""
    logged = []
    for i in range(2):
        cwd = tmp_path / str(i)
        cwd.mkdir()
        result = run_script("flowrl_jax.py", ["--env-id", "Hopper-v4", "--total-timesteps", "800", "--learning-starts", "500",
                                              "--seed", "7", "--hidden-dim", "16", "--batch-size", "16", "--buffer-size", "1000",
                                              "--log-every", "100", "--eval-every", "800", "--eval-episodes", "1", "--no-progress"], cwd=cwd)
        assert result.returncode == 0, result.stderr[-2000:]
        scalars = read_scalars(only_run_dir(cwd))
        logged.append({tag: values for tag, values in scalars.items() if not tag.startswith("charts/SPS")})
    assert logged[0] == logged[1]
    assert len(logged[0]["losses/actor_loss"]) == 3
