"""The benchmark harness: plot statistics, run discovery, the runner and the throughput helpers."""

import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import aggregate  # noqa: E402
import plot  # noqa: E402
import run  # noqa: E402
import throughput  # noqa: E402


def test_iqm_by_hand():
    assert plot.iqm(np.array([4.0, 1.0, 3.0, 2.0])) == pytest.approx(2.5)  # mean of the middle two
    assert plot.iqm(np.array([1, 2, 3, 4, 5, 6, 7, 100.0])) == pytest.approx(4.5)  # the outlier is cut
    assert plot.iqm(np.array([7.0])) == 7.0


def test_curve_intervals_are_rliables_stratified_bootstrap():
    from rliable import library as rly
    from rliable import metrics

    values = np.array([[0.0, 1.0], [10.0, 1.0], [20.0, 1.0], [30.0, 1.0]])  # 4 seeds x 2 points
    mid, lo, hi = plot.iqm_curve(values, reps=500, seed=3)
    assert mid == pytest.approx([15.0, 1.0])  # the middle two of 0, 10, 20, 30; a constant point
    assert lo[1] == hi[1] == pytest.approx(1.0) and 0.0 <= lo[0] < 15.0 < hi[0] <= 30.0
    by_hand = rly.get_interval_estimates({"x": values[:, None, :]}, lambda s: np.array([metrics.aggregate_iqm(s[..., 0]),
                                         metrics.aggregate_iqm(s[..., 1])]), reps=500, random_state=plot.seeded(3))
    np.testing.assert_allclose(np.stack([lo, hi]), by_hand[1]["x"])


RANDOM = {"Hopper-v4": {"mean": 10.0}, "HalfCheetah-v4": {"mean": -100.0}}


def test_normalised_scores_and_aggregates_against_rliable_by_hand():
    from rliable import library as rly
    from rliable import metrics

    # references: Hopper 2310, HalfCheetah 9635; raw scores chosen to normalise to round numbers
    hop = lambda x: 10.0 + x * 2300.0
    cheetah = lambda x: -100.0 + x * 9735.0
    scores = {("Hopper-v4", "a"): [hop(0.1), hop(0.2), hop(0.3)], ("HalfCheetah-v4", "a"): [cheetah(0.5), cheetah(0.6), cheetah(0.7), cheetah(0.9)],
              ("Hopper-v4", "b"): [hop(0.4), hop(0.5)], ("Walker2d-v4", "b"): [1.0, 2.0]}  # Walker2d has no random score here
    matrices, tasks, left_out = aggregate.score_matrices(scores, RANDOM)
    assert left_out == ["Walker2d-v4"] and tasks == {"a": ["HalfCheetah-v4", "Hopper-v4"], "b": ["Hopper-v4"]}
    np.testing.assert_allclose(matrices["a"], [[0.5, 0.1], [0.6, 0.2], [0.7, 0.3]])  # 3 runs: the fewest of its tasks
    np.testing.assert_allclose(matrices["b"], [[0.4], [0.5]])

    point, interval = aggregate.aggregates(matrices, reps=300, seed=1)
    a = matrices["a"].reshape(-1)
    # by hand: median 0.4; IQM of the 6 sorted scores cuts one from each end (0.1 and 0.7); optimality gap 1 - mean
    np.testing.assert_allclose(point["a"], [0.4, np.mean([0.2, 0.3, 0.5, 0.6]), a.mean(), 1.0 - a.mean()], atol=1e-12)
    func = lambda x: np.array([metrics.aggregate_median(x), metrics.aggregate_iqm(x), metrics.aggregate_mean(x),
                               metrics.aggregate_optimality_gap(x)])
    ref_point, ref_interval = rly.get_interval_estimates(matrices, func, reps=300, random_state=plot.seeded(1))
    for script in matrices:
        np.testing.assert_allclose(point[script], ref_point[script])
        np.testing.assert_allclose(interval[script], ref_interval[script])

    p, p_interval = aggregate.improvement(matrices, tasks, reps=300, seed=1)
    # on Hopper, b's 0.4 and 0.5 beat each of a's 0.1, 0.2, 0.3: P(a > b) = 0
    assert list(p) == ["a,b"] and float(p["a,b"]) == 0.0
    assert float(metrics.probability_of_improvement(matrices["b"], matrices["a"][:, [1]])) == 1.0


def _write_run(folder, evals, trains, successes=()):
    from tensorboardX import SummaryWriter

    w = SummaryWriter(folder)
    for step, v in evals:
        w.add_scalar("eval/episodic_return", v, step)
    for step, v in trains:
        w.add_scalar("charts/episodic_return", v, step)
    for step, v in successes:
        w.add_scalar("eval/success_rate", v, step)
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


def test_aggregate_writes_figures_and_the_table_from_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, (final_a, final_b) in enumerate([(240.0, 470.0), (470.0, 700.0)], start=1):  # normalised 0.1/0.2 and 0.2/0.3
        _write_run(str(runs / f"Hopper-v4__flowrl_jax__{seed}__1"), [(1000, 5.0), (2000, final_a)], [(500, 1.0)])
        _write_run(str(runs / f"Hopper-v4__sac_flow_g__{seed}__1"), [(1000, 5.0), (2000, final_b)], [(500, 1.0)])
    random_scores = tmp_path / "random.json"
    random_scores.write_text('{"scores": {"Hopper-v4": {"mean": 10.0, "std": 1.0, "episodes": 5}}}')
    out = tmp_path / "out"
    argv = ["--runs", str(runs), "--out", str(out), "--random-scores", str(random_scores), "--reps", "200"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "aggregate.py"), *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ["aggregate_metrics.png", "performance_profiles.png", "probability_of_improvement.png"]:
        assert (out / name).stat().st_size > 10_000, name
    table = (out / "aggregate.md").read_text()
    assert "| flowrl_jax | Hopper-v4 | 2 | 0.150 [0.100, 0.200] | 0.150 [0.100, 0.200] | 0.150 [0.100, 0.200] | 0.850 [0.800, 0.900] |" in table
    assert "| flowrl_jax | sac_flow_g | 0.125" in table  # by hand: of the 4 pairs (0.1 or 0.2 against 0.2 or 0.3) one tie, counted 1/2
    assert "| Hopper-v4 | 10.0 | 2310 (CleanRL SAC, 1M) |" in table
    # refusals: one line
    for bad, message in [(["--metric", "best"], "--metric must be eval, train or success"),
                         (["--random-scores", str(tmp_path / "none.json")], "does not exist"),
                         (["--runs", str(tmp_path / "out")], "no runs with a final evaluation return"),
                         (["--metric", "success"], "no runs with a final evaluation success rate")]:
        assert aggregate.main([*argv, *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_aggregate_of_success_rates_keeps_them_unnormalised(tmp_path, capsys):
    """--metric success: each run's last eval/success_rate, on tasks without a reference score too (OGBench's)."""
    runs = tmp_path / "runs"
    for seed, rate in enumerate([0.2, 0.6], start=1):
        _write_run(str(runs / f"cube-double-singletask-task2-v0__sac_flow_o2o__{seed}__1"), [(100, -30.0)], [],
                   [(100, 0.0), (200, rate)])
    out = tmp_path / "out"
    assert aggregate.main(["--runs", str(runs), "--out", str(out), "--metric", "success", "--reps", "200",
                           "--random-scores", str(tmp_path / "absent.json")]) == 0  # no random scores needed
    table = (out / "aggregate.md").read_text()
    assert table.startswith("Final evaluation success rates, aggregated")
    assert "| sac_flow_o2o | cube-double-singletask-task2-v0 | 2 | 0.400 [0.200, 0.600] |" in table, table


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
    # 4 seeds: the update of all in one call at 4 steps/s, each seed's loop at 3 env steps/s; FLOPs from the one-seed row
    four = {**row, "num_seeds": 4, "grad_steps_per_s": 4.0, "loop_env_steps_per_s": 3.0, "loop_vs_update": 0.75,
            "repeats": [12.0, 11.0], "gflop_per_env_step": None}
    table = throughput.markdown(info, {"numpy": 150.0, "jax": 200.0}, [{**row, "num_seeds": 1, "repeats": [9.0]}, four],
                                quick=False)
    assert "| flowrl_jax | Hopper-v4 | 1 | 4.0 | 10.0 | 10.00 | 50% | - | 9.0 | 0.90 | 9.0 | - | 9.0 | 1200 | 220 | - |" in table
    # 4 x 4 x 10 GFLOP/s = 80% of 200; 4 x 3 = 12 env steps/s in all, 12 / 9 = 1.33 times one seed's
    assert "| flowrl_jax | Hopper-v4 | 4 | 4.0 | 4.0 | 10.00 | 80% | - | 3.0 | 0.75 | 12.0 | 1.33 | 12.0, 11.0 | 1200 | 220 | - |" in table


def test_versus_authors_buffer_stand_in_and_refusals(tmp_path):
    import importlib.util

    import gymnasium as gym
    import versus_authors

    versus_authors.write_stand_ins(str(tmp_path))
    spec = importlib.util.spec_from_file_location("stand_in_buffers", tmp_path / "cleanrl_utils" / "buffers.py")
    buffers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(buffers)
    obs_space, act_space = gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2,))
    rb = buffers.ReplayBuffer(4, obs_space, act_space, device="cpu", handle_timeout_termination=False)
    for i in range(6):  # wraps around a capacity of 4: transitions 2..5 remain
        rb.add(np.full((1, 3), i), np.full((1, 3), i + 0.5), np.full((1, 2), -i), np.array([10.0 * i]), np.array([i % 2]), [{}])
    data = rb.sample(64)
    obs, next_obs = data.observations.numpy(), data.next_observations.numpy()
    assert obs.shape == (64, 3) and data.actions.numpy().shape == (64, 2) and data.rewards.flatten().numpy().shape == (64,)
    assert set(obs[:, 0]) == {2.0, 3.0, 4.0, 5.0}  # uniform over what is stored, the overwritten ones gone
    np.testing.assert_array_equal(next_obs[:, 0], obs[:, 0] + 0.5)
    np.testing.assert_array_equal(data.rewards.flatten().numpy(), 10.0 * obs[:, 0])
    np.testing.assert_array_equal(data.dones.flatten().numpy(), obs[:, 0] % 2)

    ok = dict(authors=str(tmp_path), scripts=["sac_flow_g"])
    with pytest.raises(SystemExit, match="SAC_flow_gru_jax.py does not exist"):
        versus_authors.check(versus_authors.Args(**ok))
    (tmp_path / "from_scratch_code").mkdir()
    (tmp_path / "from_scratch_code" / "SAC_flow_gru_jax.py").write_text("")
    versus_authors.check(versus_authors.Args(**ok))
    for bad, message in [({"authors": ""}, "--authors is required"), ({"scripts": ["sac_flow"]}, "unknown script 'sac_flow'"),
                         ({"short": 1600}, "--short < --long"), ({"repeats": 0}, "--repeats must be at least 1"),
                         ({"skip_updates": 199}, r"--skip-updates must be in \[0, --short - --learning-starts - 2\] = "
                                                 r"\[0, 198\], got 199"), ({"skip_updates": -1}, "got -1")]:
        with pytest.raises(SystemExit, match=message):
            versus_authors.check(versus_authors.Args(**{**ok, **bad}))
    cmd = versus_authors.command("theirs", "sac_flow_g", versus_authors.Args(**ok), "Humanoid-v4", 1500)
    assert cmd[1].endswith("SAC_flow_gru_jax.py") and cmd[-2:] == ["--no-track", "--no-save-model"]
    assert cmd[cmd.index("--total-timesteps") + 1] == "1500" and cmd[cmd.index("--env-id") + 1] == "Humanoid-v4"


def test_versus_authors_table_gives_medians_and_spreads():
    import versus_authors

    rows = [{"env_id": "Hopper-v4", "script": "sac_flow_g", "ours": [9.0, 11.0, 10.0], "theirs": [8.0, 8.0, 8.0],
             "ratio": [1.125, 1.375, 1.25], "ours_within": [6.0, 7.0, 8.0], "theirs_within": [5.0, 5.0, 5.0],
             "ratio_within": [1.2, 1.4, 1.6], "ours_gflop": 15.81, "theirs_gflop": 16.08},
            {"env_id": "Humanoid-v4", "script": "sac_flow_t", "ours_gflop": 22.62, "theirs_gflop": 22.27}]
    lines = versus_authors.table(rows, versus_authors.Args(authors="x", repeats=3), "test machine")
    assert "3 interleaved repeats" in lines[0] and "test machine" in lines[0]
    assert lines[0].endswith("Command: python benchmarks/versus_authors.py --authors <checkout> --repeats 3")
    flops_only = versus_authors.Args(authors="x", scripts=["sac_flow_t"], timing=False, flops_steps=60,
                                     out=os.path.join(versus_authors.ROOT, "benchmarks", "results", "f"))
    assert versus_authors.table(rows, flops_only, "test machine")[0].endswith(
        "versus_authors.py --authors <checkout> --scripts sac_flow_t --out benchmarks/results/f --no-timing --flops-steps 60")
    assert lines[4] == ("| Hopper-v4 | sac_flow_g | 10.00 (9.00 to 11.00) | 8.00 (8.00 to 8.00) | 1.25 (1.12 to 1.38) | "
                        "7.00 (6.00 to 8.00) | 5.00 (5.00 to 5.00) | 1.40 (1.20 to 1.60) | 15.81 | 16.08 |")
    assert lines[5] == "| Humanoid-v4 | sac_flow_t | - | - | - | - | - | - | 22.62 | 22.27 |"


def test_versus_authors_names_the_cpu_model_and_its_vector_width(tmp_path):
    import versus_authors

    block = "processor\t: {0}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {1}\nmodel name\t: AMD EPYC\nflags\t\t: {2}\n"
    for model, flags, isa in [(1, "fpu sse2 avx fma avx2", "AVX2"), (17, "avx2 avx512f avx512_bf16", "AVX-512"),
                              (2, "sse2 avx", "no AVX2")]:
        (tmp_path / "cpuinfo").write_text(block.format(0, model, flags) + "\n" + block.format(1, model, flags))
        assert versus_authors.cpu_model(str(tmp_path / "cpuinfo")) == f"AMD EPYC, family 25 model {model}, {isa}"
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: avx2 avx512f amx_tile\n")
    assert versus_authors.cpu_model(str(tmp_path / "cpuinfo")) == "Intel Xeon, AVX-512, AMX"
    assert versus_authors.cpu_model(str(tmp_path / "missing")) == ""
    arm = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd sve sve2 bf16\nCPU implementer\t: 0x41\nCPU part\t: 0xd4f\n"
    (tmp_path / "cpuinfo").write_text(arm)  # an Arm Neoverse V2 (Graviton 4, Grace): no model name, no flags
    assert versus_authors.cpu_model(str(tmp_path / "cpuinfo")) == "Arm CPU, implementer 0x41 part 0xd4f, SVE2"
    (tmp_path / "cpuinfo").write_text(arm.replace(" sve sve2", ""))
    assert versus_authors.cpu_model(str(tmp_path / "cpuinfo")) == "Arm CPU, implementer 0x41 part 0xd4f, NEON"


FAKE_FLOWRL = {
    # The parts of bytedance/FlowRL the runner touches, each failing the way theirs does on this machine
    # unless the runner has supplied its stand-in; main.py records what it saw.
    "torch/__init__.py": "import os\n\nOMP_AT_IMPORT = os.environ.get('OMP_NUM_THREADS')\n\n\n"
                         "class Tensor:\n    def cuda(self):\n        raise AssertionError('Torch not compiled with CUDA enabled')\n\n\n"
                         "def device(name):\n    return name\n",
    "utilis/__init__.py": "",
    "utilis/default_config.py": "default_config = dict(start_steps=5000, num_steps=2000001, eval=True, save=True, cuda=True)\n",
    "model/__init__.py": "",
    "model/model.py": "import torch\n\n\nclass Policy_flow:\n    def __init__(self):\n        torch.Tensor().cuda()\n"
                      "        self.device = torch.device('cuda:0')\n",
    "model/algo.py": "from .model import Policy_flow\n\n\nclass flowAC:\n    def __init__(self, cuda):\n"
                     "        self.amp_enabled = False  # theirs: args.cuda and torch.cuda.is_available()\n"
                     "        self.policy = Policy_flow()\n",
    "envs/__init__.py": "",
    "envs/dm_control.py": "from gym import spaces  # the old gym, not installed\n",
    "main.py": """import json, sys
import wandb
wandb.login()
from torchvision.io import write_video
from envs.dm_control import DMControlEnv
from model.algo import flowAC
from utilis.default_config import default_config as config

env = DMControlEnv(domain_name="dog", task_name="run")
env.seed(int(sys.argv[sys.argv.index("--seed") + 1]))
agent = flowAC(config["cuda"])
steps, episodes = 0, 0
with open("seen.json", "w") as f:
    import torch
    json.dump({"config": config, "amp": agent.amp_enabled, "device": agent.policy.device, "omp": torch.OMP_AT_IMPORT,
               "max_steps": env._max_episode_steps, "obs": list(env.observation_space.shape)}, f)
while True:
    state, done = env.reset(), False
    while not done:
        state, reward, done, info = env.step(env._action_space.sample())
        steps += 1
        with open("steps", "w") as f:
            f.write(str(steps))
""",
}


@pytest.mark.parametrize("bf16", [0, 1])
def test_versus_flowrl_runner_supplies_what_their_main_needs_and_stops_at_the_step(tmp_path, bf16):
    import json

    import versus_flowrl

    for path, text in FAKE_FLOWRL.items():
        (tmp_path / "flowrl" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "flowrl" / path).write_text(text)
    (tmp_path / "runner.py").write_text(versus_flowrl.RUNNER)
    args = versus_flowrl.Args(authors=str(tmp_path / "flowrl"), torch_python=sys.executable, learning_starts=300, seed=3)
    cmd = versus_flowrl.command("theirs_bf16" if bf16 else "theirs", args, "Hopper-v4", 77, str(tmp_path / "runner.py"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "flowrl"))  # the fake torch
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped after 77 env steps" in proc.stdout
    assert (tmp_path / "steps").read_text() == "77"  # across episode ends (random Hopper episodes are short)
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["config"] == {"start_steps": 300, "num_steps": 10 ** 12, "eval": False, "save": False, "cuda": False}
    assert seen["amp"] is bool(bf16) and seen["device"] == "cpu" and seen["max_steps"] == 1000 and seen["obs"] == [11]
    assert seen["omp"] == "1"  # their main.py's setting, in force when torch loads (before their main.py runs)


def test_versus_flowrl_interleaves_the_runs_and_refuses_bad_input(tmp_path, monkeypatch):
    import versus_flowrl

    seconds = {"ours": 0.1, "theirs": 0.2, "theirs_bf16": 0.4}  # per learning step; start-up 10 s
    order = []

    def fake_timed(cmd, cwd):
        side = "ours" if cmd[1].endswith("flowrl_jax.py") else ("theirs_bf16" if cmd[-2] == "1" else "theirs")
        steps = int(cmd[cmd.index("--total-timesteps") + 1] if side == "ours" else cmd[4])
        order.append((side, steps))
        return 10.0 + seconds[side] * (steps - 1000)

    monkeypatch.setattr(versus_flowrl, "timed", fake_timed)
    args = versus_flowrl.Args(authors="x", torch_python="y", repeats=2)
    rates = versus_flowrl.time_task(args, "Hopper-v4", str(tmp_path), "runner.py")
    first = [("ours", 1200), ("theirs", 1200), ("theirs_bf16", 1200), ("theirs_bf16", 1500), ("theirs", 1500), ("ours", 1500)]
    assert order == [("theirs", 1010), ("theirs_bf16", 1010)] + first + first[::-1]  # their caches warmed, untimed
    assert rates["ours"] == pytest.approx([10.0, 10.0]) and rates["theirs_bf16"] == pytest.approx([2.5, 2.5])
    assert rates["ours/theirs"] == pytest.approx([2.0, 2.0]) and rates["ours/theirs_bf16"] == pytest.approx([4.0, 4.0])
    lines = versus_flowrl.table([{"env_id": "Hopper-v4", **rates}], args, "test machine")
    assert lines[4] == ("| Hopper-v4 | 10.00 (10.00 to 10.00) | 5.00 (5.00 to 5.00) | 2.50 (2.50 to 2.50) | "
                        "2.00 (2.00 to 2.00) | 4.00 (4.00 to 4.00) |")
    assert "OMP_NUM_THREADS=1" in lines[0]
    assert lines[0].endswith("Command: python benchmarks/versus_flowrl.py --authors <checkout> --torch-python <python with torch>")
    every_core = versus_flowrl.Args(authors="x", torch_python="y", env_ids=["Humanoid-v4"], bf16=False, their_threads=0)
    first = versus_flowrl.table([{"env_id": "Humanoid-v4", **rates}], every_core, "test machine")[0]
    assert "torch on every core" in first and "float32 (its bf16 autocast not timed)" in first
    assert versus_flowrl.table([{"env_id": "Humanoid-v4", **rates}], every_core, "m")[2:] == [
        "| task | ours | authors' (float32) | ours / authors' float32 |", "|---|---|---|---|",
        "| Humanoid-v4 | 10.00 (10.00 to 10.00) | 5.00 (5.00 to 5.00) | 2.00 (2.00 to 2.00) |"]
    assert first.endswith("--torch-python <python with torch> --env-ids Humanoid-v4 --no-bf16 --their-threads 0")
    seconds["theirs"] = -0.1  # a long run no longer than the short one (a start-up that varied): refused
    with pytest.raises(SystemExit, match="theirs's 1500-step run took no longer than its 1200-step run"):
        versus_flowrl.time_task(args, "Hopper-v4", str(tmp_path), "runner.py")

    (tmp_path / "model").mkdir()
    (tmp_path / "main.py").write_text("")
    (tmp_path / "model" / "algo.py").write_text("")
    ok = dict(authors=str(tmp_path), torch_python=sys.executable)
    for bad, message in [({"authors": str(tmp_path / "model")}, "is not a checkout of https://github.com/bytedance/FlowRL"),
                         ({"torch_python": ""}, "--torch-python is required"),
                         ({"torch_python": "/no/python"}, "cannot import torch"),
                         ({"learning_starts": 100}, "need 256 <= --learning-starts"),
                         ({"short": 1600}, "--short < --long"), ({"repeats": 0}, "--repeats must be at least 1"),
                         ({"their_threads": -1}, "--their-threads must be 0")]:
        with pytest.raises(SystemExit, match=message):
            versus_flowrl.check(versus_flowrl.Args(**{**ok, **bad}))


FAKE_AUTHORS_SCRIPT = """
import sys
import jax
import jax.numpy as jnp

steps = int(sys.argv[sys.argv.index("--total-timesteps") + 1])
starts = int(sys.argv[sys.argv.index("--learning-starts") + 1])


@jax.jit
def actor_apply_inference(x):
    return jnp.tanh(x)


@jax.jit
def update_critic(w, x):
    return w @ x  # 2 * 64**3 FLOPs


@jax.jit
def update_actor_and_alpha(w):
    return w @ w @ w  # twice that


@jax.jit
def update_target(w):
    inner = update_critic(w, w)  # traced inside: counted in its caller's program, not as a call
    return 0.5 * w + 0.5 * inner


w = jnp.eye(64)
for step in range(steps):
    if step >= starts:
        actor_apply_inference(w)
        update_critic(w, w)
        if step % 3 == 0:
            update_actor_and_alpha(w)
        update_target(w)
"""


def test_versus_authors_stamps_each_top_level_per_step_call_from_outside(tmp_path):
    import versus_authors

    checkout = tmp_path / "SAC-FLOW" / "from_scratch_code"
    checkout.mkdir(parents=True)
    # run as `python script` runs it: as __main__, its own folder first on the path
    (checkout / "beside.py").write_text("NAME = 'beside'\n")
    (checkout / "SAC_flow_gru_jax.py").write_text("import beside\nassert __name__ == '__main__'\n" + FAKE_AUTHORS_SCRIPT)
    env = versus_authors.write_stand_ins(str(tmp_path / "stand_ins"))
    (tmp_path / "stand_ins" / "record_stamps.py").write_text(versus_authors.STAMPS_RECORDER)
    args = versus_authors.Args(authors=str(tmp_path / "SAC-FLOW"), learning_starts=4)
    cmd = versus_authors.command("theirs", "sac_flow_g", args, "Hopper-v4", 12)
    seconds, stamps = versus_authors.timed(cmd, env, str(tmp_path), versus_authors.PER_STEP["theirs"])
    # one stamp per step after learning starts; the update_critic traced inside update_target is not a call
    assert len(stamps) == 8 and stamps == sorted(stamps) and 0 < stamps[-1] - stamps[0] < seconds

    within = versus_authors.within_rate
    assert within([[0.0, 5.0, 6.0, 7.0], [10.0, 20.0, 20.5, 21.0, 21.5]], skip=1) == pytest.approx(5 / 3.5)
    assert within([[0.0, 1.0], [0.0, 0.5, 1.0, 1.5]], skip=1) == pytest.approx(2 / 1.0)  # the first run has 1 left
    assert np.isnan(within([[0.0, 1.0]], skip=1))


def test_versus_authors_gathers_every_run_and_pools_the_repeats(tmp_path, capsys, monkeypatch):
    import json

    import versus_authors

    row = lambda env, script, ratio, within=None: {"env_id": env, "script": script, "ours": [1.0] * len(ratio),
                                                    "theirs": [1.0] * len(ratio), "ratio": ratio,
                                                    **({"ratio_within": within} if within else {})}
    out = str(tmp_path / "va")
    args = versus_authors.Args(authors="x", out=out)
    monkeypatch.setattr(versus_authors, "MACHINE", "m1")
    versus_authors.write_results(args, [row("Hopper-v4", "sac_flow_g", [1.0, 1.5, 1.3]), row("Humanoid-v4", "sac_flow_t", [2.0])],
                                 ["the first run's table"])
    versus_authors.write_results(args, [{"env_id": "Hopper-v4", "script": "sac_flow_g", "ours_gflop": 15.6}], ["flops"])
    monkeypatch.setattr(versus_authors, "MACHINE", "m2")
    versus_authors.write_results(args, [row("Hopper-v4", "sac_flow_g", [1.2], [1.25, 1.4])], ["the third run's table"])
    runs = json.loads((tmp_path / "va.json").read_text())["runs"]
    assert [r["machine"] for r in runs] == ["m1", "m1", "m2"] and all(r["date"] and "commit" in r for r in runs)
    hopper, humanoid = versus_authors.pool(runs, 1.25)  # the FLOPs-only run has no ratios
    # 1.0, 1.2, 1.3, 1.5: median 1.25, quartiles by linear interpolation 1.15 and 1.35, two at 1.25 or above
    assert (hopper["runs"], hopper["ratio"]["n"], hopper["ratio"]["at_target"]) == (2, 4, 2)
    assert [hopper["ratio"][k] for k in ("median", "q1", "q3", "min", "max")] == pytest.approx([1.25, 1.15, 1.35, 1.0, 1.5])
    assert hopper["ratio_within"]["n"] == 2 and hopper["ratio_within"]["at_target"] == 2  # 1.25 counts
    assert humanoid["ratio_within"] is None and humanoid["ratio"]["median"] == 2.0
    table = (tmp_path / "va.md").read_text()
    assert "| Hopper-v4 | sac_flow_g | 2 | 1.25 (1.15 to 1.35; 1.00 to 1.50), 2 of 4 | 1.32 (1.29 to 1.36; 1.25 to 1.40), 2 of 2 |" in table
    assert "| Humanoid-v4 | sac_flow_t | 1 | 2.00 (2.00 to 2.00; 2.00 to 2.00), 1 of 1 | - |" in table
    assert table.rstrip().endswith("## The latest run\n\nthe third run's table") and "(FLOPs only)" in table
    before = (tmp_path / "va.md").read_text()
    assert versus_authors.main(["--pool-only", "--out", out]) == 0  # the same pooled table, no run added
    assert (tmp_path / "va.md").read_text() == before  # every run keeps its table
    assert len(json.loads((tmp_path / "va.json").read_text())["runs"]) == 3
    capsys.readouterr()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "norow.json").write_text(json.dumps({"runs": [{"rows": [{"script": "sac_flow_g", "ratio": [1.3]}]}]}))
    (tmp_path / "flops.json").write_text(json.dumps({"runs": [{"machine": "m", "rows": [{"env_id": "H", "script": "s"}]}]}))
    for kwargs, message in (({"out": out, "target": 0.0}, "--target must be positive"),
                            ({"out": str(tmp_path / "bad")}, "bad.json is not a file of runs of this benchmark"),
                            ({"out": str(tmp_path / "norow")}, "norow.json is not a file of runs of this benchmark"),
                            ({"out": str(tmp_path / "flops"), "pool_only": True}, "flops.json holds no timed run"),
                            ({"out": str(tmp_path / "none"), "pool_only": True}, "none.json holds no timed run")):
        with pytest.raises(SystemExit, match=message):  # before anything is measured
            versus_authors.check(versus_authors.Args(**kwargs))
