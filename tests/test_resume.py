"""Checkpoints and --resume for all three scripts: bit-exact continuation, signals, divergence, bad input."""

import glob
import hashlib
import importlib
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from common.checkpoint import list_checkpoints, read_container, write_atomic
from helpers import ROOT, TINY, assert_same_tree, read_scalars

# The buffer (300) wraps before the end (500); learning starts at 200, between the first two checkpoints.
COMMON = ["--env-id", "Hopper-v4", "--learning-starts", "200", "--buffer-size", "300", "--log-every", "50",
          "--eval-every", "250", "--eval-episodes", "1", "--no-progress"]
COMPARED = ["step", "state", "buffer", "env", "obs", "rng"]


def run(module, argv, code=0):
    assert module.main(argv) == code


def run_dir_named(name):
    (found,) = glob.glob(os.path.join("runs", f"*__{name}__*"))
    return found


def final(run_dir):
    return read_container(list_checkpoints(run_dir)[-1][1], "test")


@pytest.mark.parametrize("name", list(TINY))
def test_resumed_run_is_bit_identical(tmp_path, monkeypatch, name):
    """500 steps straight == 150 steps (mid-episode, before learning starts) + resume to 350 + resume to
    500: parameters, optimiser states, statistics, keys, buffer, env and RNGs, and the logged scalars."""
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    base = COMMON + TINY[name]
    run(module, base + ["--total-timesteps", "500", "--checkpoint-every", "500", "--exp-name", "straight"])
    run(module, base + ["--total-timesteps", "150", "--checkpoint-every", "150", "--exp-name", "pieces"])
    pieces = run_dir_named("pieces")
    first = final(pieces)
    assert first["step"] == 150 and len(first["env"][0]["actions"]) > 0  # checkpointed mid-episode
    run(module, ["--resume", pieces, "--total-timesteps", "350", "--no-progress"])
    assert final(pieces)["step"] == 350
    run(module, ["--resume", pieces, "--total-timesteps", "500", "--no-progress"])

    straight, resumed = final(run_dir_named("straight")), final(pieces)
    assert resumed["step"] == 500 and resumed["buffer"][0]["size"] == 300
    for key in COMPARED:
        assert_same_tree(straight[key], resumed[key], key)
    assert len(glob.glob("runs/*")) == 2  # the resumed run stayed in its own folder

    logs_straight, logs_resumed = read_scalars(run_dir_named("straight")), read_scalars(pieces)
    assert sorted(logs_straight) == sorted(logs_resumed)
    for tag, points in logs_straight.items():
        steps = [s for s, _ in logs_resumed[tag]]
        assert steps == [s for s, _ in points], tag  # no step repeated or missing
        if not tag.startswith("charts/SPS"):
            assert [v for _, v in logs_resumed[tag]] == [v for _, v in points], tag


@pytest.mark.parametrize("script,sig", [("flowrl_jax.py", signal.SIGTERM), ("sac_flow_g.py", signal.SIGINT)])
def test_signal_mid_run_checkpoints_and_resumes_exactly(tmp_path, script, sig):
    args = [*COMMON, *TINY[script[:-3]], "--total-timesteps", "2500", "--checkpoint-every", "0"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", MUJOCO_GL="egl")

    def launch(*extra):
        return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args, *extra], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    straight = launch("--exp-name", "straight", "--checkpoint-every", "2500")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-2000:]
    stopped = launch("--exp-name", "stopped")
    deadline = time.time() + 300
    while not glob.glob(os.path.join(tmp_path, "runs", "*stopped*", "events.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(random.uniform(1.0, 8.0))  # somewhere in the run: compiling, collecting or learning
    stopped.send_signal(sig)
    out, err = stopped.communicate(timeout=300)
    assert stopped.returncode == 0, err[-2000:]
    assert f"{sig.name}: stopped after step" in out and "--resume" in out, out[-1000:]
    run_dir = glob.glob(os.path.join(tmp_path, "runs", "*stopped*"))[0]
    ((step, _),) = list_checkpoints(run_dir)
    assert 0 < step < 2500

    resumed = subprocess.run([sys.executable, os.path.join(ROOT, script), "--resume", run_dir, "--no-progress",
                              "--checkpoint-every", "2500"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {step}" in resumed.stdout
    a = final(glob.glob(os.path.join(tmp_path, "runs", "*straight*"))[0])
    b = final(run_dir)
    for key in COMPARED:
        assert_same_tree(a[key], b[key], key)


def inject_nan_reward(monkeypatch, module, at_step):
    import common.env

    real, calls = common.env.env_step, [0]

    def env_step(env, obs, action):
        transition, obs, episode = real(env, obs, action)
        calls[0] += 1
        if calls[0] == at_step:
            transition = (transition[0], transition[1], np.float32("nan"), *transition[3:])
        return transition, obs, episode

    monkeypatch.setattr(common.env, "env_step", env_step)


@pytest.mark.parametrize("name", ["flowrl_jax", "sac_flow_t"])
def test_nan_in_a_batch_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, name):
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    inject_nan_reward(monkeypatch, module, 230)
    base = [*COMMON, *TINY[name], "--buffer-size", "240", "--total-timesteps", "600", "--checkpoint-every", "100"]
    run(module, base, code=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "losses/qf_loss" in err[0] and "became NaN or infinite at step" in err[0], err
    step = int(err[0].split("at step ")[1].split(":")[0])
    assert 230 <= step < 330
    run_dir = glob.glob("runs/*")[0]
    good = list_checkpoints(run_dir)
    assert good[-1][0] == 200 and f"the last good checkpoint is {good[-1][1]}" in err[0]
    state = read_container(good[-1][1], "test")
    leaves = [np.asarray(x) for x in _leaves(state["state"])]
    assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")


def test_debug_nans_names_jax_check(tmp_path, monkeypatch, capsys):
    module = importlib.import_module("flowrl_jax")
    monkeypatch.chdir(tmp_path)
    inject_nan_reward(monkeypatch, module, 50)
    run(module, [*COMMON, *TINY["flowrl_jax"], "--total-timesteps", "300", "--debug-nans"], code=1)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowrl_jax.py")]
    assert len(err) == 1 and "jax_debug_nans" in err[0] and "at step 50" in err[0], err


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, np.ndarray):
        yield tree


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints and bad input: one line, exit 2, nothing existing overwritten
# ---------------------------------------------------------------------------------------------


def digest(folder):
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(p)}


def refused(module, argv, capsys, *fragments):
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def flowrl_run(tmp_path, monkeypatch):
    """A FlowRL run with checkpoints at 100, 200, 300 and a model file."""
    module = importlib.import_module("flowrl_jax")
    monkeypatch.chdir(tmp_path)
    run(module, [*COMMON, *TINY["flowrl_jax"], "--total-timesteps", "300", "--checkpoint-every", "100",
                 "--keep-checkpoints", "3", "--save-model"])
    return module, glob.glob("runs/*")[0]


def test_truncated_newest_checkpoint_is_refused_and_the_previous_one_used(flowrl_run, capsys):
    module, run_dir = flowrl_run
    (_, c100), (_, c200), (_, c300) = list_checkpoints(run_dir)
    with open(c300, "r+b") as f:
        f.truncate(os.path.getsize(c300) // 2)
    refused(module, ["--resume", c300], capsys, "truncated")
    run(module, ["--resume", run_dir, "--total-timesteps", "300", "--no-progress"])
    out = capsys.readouterr().out
    assert "is truncated" in out and "trying the one before" in out and f"at step 200 from {c200}" in out
    assert os.path.exists(c300 + ".corrupt")  # kept aside, not deleted
    assert read_container(c300, "test")["step"] == 300  # rewritten whole by the resumed run


def test_damaged_and_foreign_checkpoints_are_refused(flowrl_run, capsys, tmp_path):
    module, run_dir = flowrl_run
    before = digest(run_dir)
    (_, c100), _, (_, c300) = list_checkpoints(run_dir)
    flipped = tmp_path / "flipped.ckpt"
    data = bytearray(open(c300, "rb").read())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    refused(module, ["--resume", str(flipped)], capsys, "is corrupt (its checksum does not match)")
    refused(module, ["--eval-only", "--checkpoint", str(flipped)], capsys, "is corrupt")
    refused(module, ["--resume", c100], capsys, "older than its run's newest checkpoint")
    refused(module, ["--resume", os.path.join(run_dir, "flowrl_jax.msgpack")], capsys, "is a model file")
    refused(module, ["--resume", run_dir, "--hidden-dim", "64"], capsys, "--hidden-dim 64 contradicts --resume's 32")
    refused(module, ["--resume", "nowhere"], capsys, "--resume 'nowhere' does not exist")
    refused(module, ["--resume", run_dir, "--eval-only"], capsys, "give one of them")
    refused(module, ["--checkpoint", c300], capsys, "use --resume")
    sac = importlib.import_module("sac_flow_g")
    refused(sac, ["--resume", run_dir], capsys, "written by flowrl, not sac_flow_g")
    refused(sac, ["--eval-only", "--checkpoint", c300], capsys, "written by flowrl, not sac_flow_g")

    # The same network on another env (Walker2d: 17 observations, 6 actions against Hopper's 11 and 3).
    other = read_container(c300, "test")
    other["args"]["env_id"] = "Walker2d-v4"
    walker = str(tmp_path / "walker.ckpt")
    write_atomic(walker, other)
    refused(module, ["--eval-only", "--checkpoint", walker], capsys, "does not fit this network")
    refused(module, ["--resume", walker], capsys, "does not fit this network")
    assert digest(run_dir) == before  # nothing existing was touched


def test_unwritable_output_folder_is_refused(tmp_path, monkeypatch, capsys):
    module = importlib.import_module("flowrl_jax")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    refused(module, [*COMMON, *TINY["flowrl_jax"], "--total-timesteps", "100"], capsys, "cannot write the run folder")
    assert (tmp_path / "runs").read_text() == "a file where the runs folder should be"


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "c.ckpt")
    write_atomic(path, {"format": 2, "value": 1})

    def crash(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_atomic(path, {"format": 2, "value": 2})
    monkeypatch.undo()
    assert read_container(path, "test")["value"] == 1
    assert os.listdir(tmp_path) == ["c.ckpt"]  # no temp file left behind


def test_without_buffer_a_resumed_run_refills_before_updating(tmp_path, monkeypatch, capsys):
    module = importlib.import_module("flowrl_jax")
    monkeypatch.chdir(tmp_path)
    run(module, [*COMMON, *TINY["flowrl_jax"], "--total-timesteps", "250", "--checkpoint-every", "250",
                 "--no-checkpoint-buffer"])
    assert "leave out the replay buffer" in capsys.readouterr().out
    run_dir = glob.glob("runs/*")[0]
    ckpt = final(run_dir)
    assert ckpt["buffer"] is None and not ckpt["args"]["checkpoint_buffer"]
    run(module, ["--resume", run_dir, "--total-timesteps", "550", "--no-progress"])
    assert "no buffer saved: refilling until step 450" in capsys.readouterr().out
    losses = [s for s, _ in read_scalars(run_dir)["losses/qf_loss"]]
    assert losses == [250, 500, 550]  # updates before the checkpoint, none while refilling, then again


def can_render() -> bool:
    code = "from common.env import make_env; e = make_env('Hopper-v4', 0, render=True); e.reset(seed=0); assert e.render().ndim == 3; e.close()"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, env=dict(os.environ, MUJOCO_GL="egl")).returncode == 0


@pytest.mark.skipif(not can_render(), reason="MuJoCo cannot render here (no EGL)")
def test_capture_video_in_training_and_eval_only(flowrl_run, capsys):
    module, run_dir = flowrl_run
    run(module, ["--eval-only", "--checkpoint", run_dir, "--eval-episodes", "2", "--capture-video"])
    out = capsys.readouterr().out
    assert "Hopper-v4: eval return" in out and "over 2 episodes" in out
    videos = glob.glob(os.path.join(run_dir, "videos", "eval_only_*.mp4"))
    assert len(videos) == 2 and all(os.path.getsize(v) > 1000 for v in videos)

    run(module, [*COMMON, *TINY["flowrl_jax"], "--total-timesteps", "100", "--eval-every", "100", "--capture-video",
                 "--exp-name", "video"])
    assert os.path.getsize(glob.glob("runs/*video*/videos/eval_step0000000100.mp4")[0]) > 1000
