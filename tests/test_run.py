"""common/run.py on its own: metric tags, exit statuses, and a TrainingRun driven by a stand-in agent
(logs per seed, a vector metric as one tag per entry, a signal that checkpoints and stops)."""

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.args import RunArgs
from common.checkpoint import Diverged, list_checkpoints, read_container
from common.args import ConfigError
from common.run import ExitStatus, TrainingRun, metric_scalars
from helpers import read_scalars, wandb_offline_runs


def test_metric_scalars_give_one_tag_per_entry_of_a_vector():
    values = {"qf_loss": np.array([1.0, 2.0]), "grad_norms": np.array([[0.1, 0.2, 0.3], [4.0, 5.0, 6.0]]),
              "q_values": np.array([[7.0], [8.0]])}
    assert metric_scalars(values, 1, {"grad_norms": "grad/step_"}) == [
        ("losses/qf_loss", 2.0), ("grad/step_0", 4.0), ("grad/step_1", 5.0), ("grad/step_2", 6.0), ("losses/q_values_0", 8.0)]
    # without a name from the script, a vector goes under losses/ like the scalars
    assert [tag for tag, _ in metric_scalars(values, 0)][1:4] == ["losses/grad_norms_0", "losses/grad_norms_1",
                                                                  "losses/grad_norms_2"]


@pytest.mark.parametrize("error,code,fragment", [
    (ConfigError("--tau must be in [0.0, 1.0], got 2"), 2, "x.py: error: --tau must be in"),
    (Diverged("losses/qf_loss", 7, None), 1, "x.py: error: losses/qf_loss became NaN or infinite at step 7"),
    (OSError(28, "No space left on device"), 1, "x.py: error: [Errno 28] No space left on device"),
    (KeyboardInterrupt(), 130, "x.py: interrupted twice: stopped without writing a checkpoint"),
])
def test_exit_status_is_one_line_per_kind_of_failure(capsys, error, code, fragment):
    with ExitStatus("/somewhere/x.py") as status:
        raise error
    assert status.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(fragment), err


# Faults of a second 64 MiB allocation after the first was freed (the allocator's choice decides it).
REFAULTS = """
import resource, sys
import numpy as np
sys.path.insert(0, {root!r})
from common.run import keep_freed_memory
print(keep_freed_memory() if {keep} else False)
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(64 << 20, np.uint8)
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_keep_freed_memory_serves_a_freed_large_buffer_again_without_faulting_it_in():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {keep: subprocess.run([sys.executable, "-c", REFAULTS.format(root=root, keep=keep)], capture_output=True,
                                 text=True, check=True).stdout.split() for keep in (False, True)}
    if runs[True][0] != "True":
        pytest.skip("not glibc")
    # By default the freed buffer went back to the OS and each of its pages faults in again (at most 2 MiB
    # each, where numpy asks for huge pages); kept, it is reused as it was.
    assert int(runs[False][1]) >= (64 << 20) // (2 << 20)
    assert int(runs[True][1]) < 8


def test_exit_status_is_0_and_a_bug_keeps_its_traceback():
    with ExitStatus("x.py") as status:
        pass
    assert status.code == 0
    with pytest.raises(ZeroDivisionError):
        with ExitStatus("x.py"):
            1 / 0


@dataclass
class StandInArgs(RunArgs):
    """The flags TrainingRun reads, as a script's Args has them."""

    exp_name: str = "stand_in"
    seed: int = 3
    num_seeds: int = 2
    total_timesteps: int = 60
    eval_every: int = 1000
    eval_episodes: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    progress: bool = False
    wandb_project_name: str = "tests"
    buffer_size: int = 100
    batch_size: int = 8
    learning_starts: int = 20


def stand_in_agent(args, obs_dim, act_dim, key):
    return {"w": jax.random.normal(key, (obs_dim, act_dim))}


def test_a_run_logs_per_seed_and_a_signal_checkpoints_and_stops(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = StandInArgs()
    run = TrainingRun(args, "stand_in", "stand_in.py", vector_tags={"grad_norms": "grad/step_"})
    agent, k_act, buf, obs = run.init_state(stand_in_agent)
    assert agent["w"].shape == (2, run.obs_dim, run.act_dim) and obs.shape == (2, run.obs_dim)
    update = jax.jit(lambda a: a)
    info = None
    with run:
        for step in run.steps():
            transitions, obs, episodes = run.envs.step(obs, run.envs.random_actions())
            buf = run.buffer_add(buf, *transitions)
            if run.learns(step):
                agent = update(agent)
                metrics = {"loss": jnp.full(2, float(step)), "grad_norms": jnp.ones((2, 3)) * step}
                info = {**metrics, "finite": jnp.ones((2, 2), bool)}
                run.check_update(step, info)
            run.log(step, episodes, info)
            if step == 35:
                os.kill(os.getpid(), signal.SIGINT)  # the run finishes the step, checkpoints and stops
            if run.maybe_checkpoint(step, agent, k_act, buf, obs):
                break
    summary = run.finish(agent, update, (), {})
    assert summary["stopped"] == "SIGINT" and run.step == 35 and summary["compiles"] == 1
    assert "SIGINT: stopped after step 35" in capsys.readouterr().out
    ((step, path),) = list_checkpoints(run.run_dir)
    ckpt = read_container(path, "test")
    assert step == 35 and ckpt["buffer"][1]["size"] == 35 and ckpt["meta"]["updates_from"] == 20
    assert summary["log_dirs"] == [f"{run.run_dir}__s3", f"{run.run_dir}__s4"]
    logs = read_scalars(summary["log_dirs"][1])
    assert logs["losses/loss"] == [(30, 30.0)]  # logged from the first log step after learning starts
    assert [logs[f"grad/step_{k}"] for k in range(3)] == [[(30, 30.0)]] * 3
    assert [s for s, _ in logs["charts/SPS_window"]] == [10, 20, 30]


def test_a_nan_metric_names_the_seed_and_closes_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = TrainingRun(StandInArgs(), "stand_in", "stand_in.py")
    run.init_state(stand_in_agent)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Diverged, match="losses/loss of seed 4 became NaN or infinite at step 21"):
        with run:
            for step in run.steps():
                if run.learns(step):
                    run.check_update(step, {"loss": np.array([1.0, np.nan]), "finite": np.array([[True], [False]])})
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored
    assert not list_checkpoints(run.run_dir)  # nothing written after a divergence


def stand_in_run(args, resume=None, stop_at=None):
    """The loop of test_a_run_logs_per_seed_and_a_signal_checkpoints_and_stops, with a loss of `step` per
    seed; a SIGINT at `stop_at`."""
    run = TrainingRun(args, "stand_in", "stand_in.py", resume)
    agent, k_act, buf, obs = run.init_state(stand_in_agent)
    info = None
    with run:
        for step in run.steps():
            transitions, obs, episodes = run.envs.step(obs, run.envs.random_actions())
            buf = run.buffer_add(buf, *transitions)
            if run.learns(step):
                info = {"loss": jnp.full(2, float(step)), "finite": jnp.ones((2, 1), bool)}
                run.check_update(step, info)
            run.log(step, episodes, info)
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGINT)
            if run.maybe_checkpoint(step, agent, k_act, buf, obs):
                break
    return run.finish(agent, jax.jit(lambda a: a), (), {})


def test_track_logs_each_seed_to_its_wandb_run_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from common.checkpoint import read_resume

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = StandInArgs(track=True)
    try:
        first = stand_in_run(args, stop_at=35)
        assert first["stopped"] == "SIGINT"
        resumed = StandInArgs(track=True, resume=first["run_dir"])
        second = stand_in_run(resumed, resume=read_resume(resumed, "stand_in", StandInArgs()))
        assert second["stopped"] is None
    finally:  # stop this process's wandb service and forget its address, which child processes would inherit
        import wandb

        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)

    for seed, log_dir in zip([3, 4], second["log_dirs"]):
        sessions = wandb_offline_runs(log_dir)
        assert len(sessions) == 2 and {s["id"] for s in sessions} == {os.path.basename(log_dir)}  # one wandb run, continued
        assert sessions[0]["config"]["agent_seed"] == seed and sessions[0]["config"]["env_id"] == "Hopper-v4"
        steps = [[step for step, _ in s["history"]] for s in sessions]
        assert max(steps[0]) <= 35 < min(steps[1])  # no step twice
        losses = [(step, items["losses/loss"]) for s in sessions for step, items in s["history"] if "losses/loss" in items]
        assert losses == [(30, 30.0), (40, 40.0), (50, 50.0), (60, 60.0)]
        tensorboard = read_scalars(log_dir)
        for tag in ["charts/episodic_return", "charts/SPS"]:
            logged = [(step, items[tag]) for s in sessions for step, items in s["history"] if tag in items]
            assert [step for step, _ in logged] == [step for step, _ in tensorboard[tag]], tag
            assert [v for _, v in logged] == pytest.approx([v for _, v in tensorboard[tag]], rel=1e-6), tag


@pytest.mark.parametrize("script", ["flowrl_jax", "sac_flow_g", "sac_flow_t", "sac_flow_o2o"])
def test_track_without_wandb_is_refused_in_one_line(script, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    module = importlib.import_module(script)
    argv = ["--track"] + (["--dataset", "data.npz"] if script == "sac_flow_o2o" else [])
    assert module.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"{script}.py: error: --track logs to Weights & Biases, which is not installed here: pip install wandb"
    assert not os.path.exists(tmp_path / "runs")


def test_an_older_checkpoints_argument_is_read_under_its_new_name(monkeypatch):
    import common.checkpoint as C
    import flowrl_jax

    saved = {k: v for k, v in vars(flowrl_jax.Args()).items() if k != "policy_delay"}
    saved["policy_frequency"] = 5  # FlowRL's name for it before 2026-12
    monkeypatch.setattr(C, "load_training_checkpoint", lambda path, algo: (path, {"args": dict(saved), "step": 0}))
    args = flowrl_jax.Args(resume="runs/x")
    C.read_resume(args, "flowrl", flowrl_jax.Args(), flowrl_jax.RENAMED)
    assert args.policy_delay == 5
    args = flowrl_jax.Args(resume="runs/x", policy_delay=3)  # a new value that contradicts the saved one: refused
    with pytest.raises(ConfigError, match="--policy-delay 3 contradicts --resume's 5"):
        C.read_resume(args, "flowrl", flowrl_jax.Args(), flowrl_jax.RENAMED)
