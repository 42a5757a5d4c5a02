"""The benchmark harness: plot statistics, run discovery, the runner and the throughput helpers."""

import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import plot  # noqa: E402
import run  # noqa: E402
import throughput  # noqa: E402


def test_iqm_by_hand():
    assert plot.iqm(np.array([4.0, 1.0, 3.0, 2.0])) == pytest.approx(2.5)  # mean of the middle two
    assert plot.iqm(np.array([1, 2, 3, 4, 5, 6, 7, 100.0])) == pytest.approx(4.5)  # the outlier is cut
    assert plot.iqm(np.array([7.0])) == 7.0


def test_bootstrap_ci_brackets_the_mean():
    same = np.full((5, 3), 2.0)
    lo, hi = plot.bootstrap_ci(same)
    np.testing.assert_allclose(lo, 2.0) and np.testing.assert_allclose(hi, 2.0)
    x = np.array([[0.0], [10.0], [20.0], [30.0]])
    lo, hi = plot.bootstrap_ci(x)
    assert 0.0 <= lo[0] < 15.0 < hi[0] <= 30.0


def _write_run(folder, evals, trains):
    from tensorboardX import SummaryWriter

    w = SummaryWriter(folder)
    for step, v in evals:
        w.add_scalar("eval/episodic_return", v, step)
    for step, v in trains:
        w.add_scalar("charts/episodic_return", v, step)
    w.close()


def test_find_runs_keeps_the_newest_folder_per_seed(tmp_path):
    for name in ["Hopper-v4__flowrl_jax__1__100", "Hopper-v4__flowrl_jax__1__200", "Hopper-v4__flowrl_jax__2__150",
                 "dm_control_dog-run-v0__sac_flow_t__1__5",
                 # a --num-seeds 2 --seed 2 run: seed 2's newer folder replaces the one above, seed 3 is new
                 "Hopper-v4__flowrl_jax__2__250__s2", "Hopper-v4__flowrl_jax__2__250__s3"]:
        _write_run(str(tmp_path / name), [(10, 1.0)], [])
    (tmp_path / "logs").mkdir()
    (tmp_path / "Hopper-v4__flowrl_jax__3__300").mkdir()  # no events: a run that never logged (or a --num-seeds run's own folder)
    groups = plot.find_runs(str(tmp_path))
    assert sorted(groups) == [("Hopper-v4", "flowrl_jax"), ("dm_control/dog-run-v0", "sac_flow_t")]
    assert [os.path.basename(d) for d in groups[("Hopper-v4", "flowrl_jax")]] == [
        "Hopper-v4__flowrl_jax__1__200", "Hopper-v4__flowrl_jax__2__250__s2", "Hopper-v4__flowrl_jax__2__250__s3"]


def test_plot_writes_a_png_per_task_and_the_final_table(tmp_path):
    runs = tmp_path / "runs"
    _write_run(str(runs / "Hopper-v4__flowrl_jax__1__1"), [(1000, 10.0), (2000, 20.0)], [(500, 1.0), (1900, 5.0)])
    _write_run(str(runs / "Hopper-v4__flowrl_jax__2__1"), [(1000, 30.0), (2000, 40.0)], [(600, 3.0), (1900, 7.0)])
    (runs / "MACHINE").write_text("test machine\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "plot.py"), "--runs", str(runs), "--out",
                           str(out), "--bins", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "curves_Hopper-v4.png").stat().st_size > 10_000
    table = (out / "final_returns.md").read_text()
    assert "test machine" in table
    # final evals 20 and 40; the last training bin holds 5 and 7
    assert "| Hopper-v4 | flowrl_jax | 2 | 2000 | 30 +- 10 | 30 | 6 +- 1 | 6 |" in table


def test_plot_without_runs_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "plot.py"), "--runs", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no runs" in proc.stderr and "Traceback" not in proc.stderr


def test_run_builds_the_users_commands():
    args = run.Args(scripts=["flowrl_jax", "sac_flow_t.py"], env_ids=["Hopper-v4", "dm_control/dog-run-v0"],
                    seeds=[3, 4], extra="--total-timesteps 100 --eval-every 50")
    jobs = run.commands(args)
    assert len(jobs) == 8
    name, cmd = jobs[-1]
    assert name == "dm_control_dog-run-v0__sac_flow_t__4"
    assert cmd[1].endswith("sac_flow_t.py") and cmd[2:6] == ["--env-id", "dm_control/dog-run-v0", "--seed", "4"]
    assert cmd[-4:] == ["--total-timesteps", "100", "--eval-every", "50"]
    with pytest.raises(SystemExit, match="unknown script 'sac_flow'"):
        run.commands(run.Args(scripts=["sac_flow"]))


def test_run_runs_jobs_in_parallel_and_reports_the_failed_one(tmp_path):
    small = "--total-timesteps 60 --learning-starts 40 --hidden-dim 16 --batch-size 8 --eval-episodes 0 --log-every 20"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--workdir", str(tmp_path), "--seeds", "1", "2",
           "--jobs", "2", f"--extra={small}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(os.listdir(tmp_path / "runs"))
    assert [n.rsplit("__", 1)[0] for n in names if n != "logs"] == ["Hopper-v4__flowrl_jax__1", "Hopper-v4__flowrl_jax__2"]
    assert "update compiled 1 time(s)" in (tmp_path / "runs" / "logs" / "Hopper-v4__flowrl_jax__2.log").read_text()
    # a flag the script refuses: run.py names the failed run and exits non-zero
    proc = subprocess.run(cmd[:-1] + ["--seeds", "7", "--extra=--batch-size 0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Hopper-v4__flowrl_jax__7" in proc.stderr and "batch" in proc.stdout


def test_forced_cond_takes_the_chosen_branch():
    import jax

    def fresh():  # a new function each time, as make_update gives: jit would reuse an old trace
        return jax.jit(lambda x: jax.lax.cond(x > 0, lambda y: y + 1.0, lambda y: y - 1.0, x))

    with throughput.forced_cond(True):
        assert float(fresh()(-5.0)) == -4.0
    with throughput.forced_cond(False):
        assert float(fresh()(5.0)) == 4.0
    assert float(fresh()(5.0)) == 6.0 and float(fresh()(-5.0)) == -6.0  # restored


def test_throughput_table_marks_missing_figures():
    info = {"device": "cpu", "platform": "cpu", "device_count": 1, "cpu_count": 2, "processor": "x86_64",
            "python": "3.11", "versions": {"jax": "0"}, "date": "2026-01-01"}
    row = {"script": "flowrl_jax", "env_id": "Hopper-v4", "compile_s": 4.0, "grad_steps_per_s": 10.0,
           "gflop_per_env_step": 10.0, "update_gflops": 100.0, "loop_env_steps_per_s": 9.0, "loop_vs_update": 0.9,
           "peak_host_rss_mb": 1200.0, "xla_update_memory_mb": 220.0, "peak_device_mb": float("nan")}
    table = throughput.markdown(info, {"numpy": 150.0, "jax": 200.0}, [row], quick=False)
    assert "| flowrl_jax | Hopper-v4 | 4.0 | 10.0 | 10.00 | 50% | - | 9.0 | 0.90 | 1200 | 220 | - |" in table
