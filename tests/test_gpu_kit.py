"""The GPU kit (benchmarks/gpu/): its --smoke run on the CPU through all three phases and collect.py, the reading
of a GPU trace, the wheel list, and its refusals."""

import gzip
import json
import os
import subprocess
import sys
import tarfile

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))

import kit  # noqa: E402  (benchmarks/gpu/kit.py)
import throughput  # noqa: E402

KIT = os.path.join(ROOT, "benchmarks", "gpu", "kit.py")
COLLECT = os.path.join(ROOT, "benchmarks", "gpu", "collect.py")
WHEELS = os.path.join(ROOT, "benchmarks", "gpu", "wheels.py")


def run(cmd: list[str], cwd, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_smoke_runs_every_phase_and_collect_makes_the_results(tmp_path):
    out = tmp_path / "out"
    r = run([KIT, "--smoke", "--out", str(out)], tmp_path, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["phase0.json", "phase1.json", "phase1.md", "phase1_traces.tar.gz", "phase2.json",
                                       "phase2_runs.tar.gz"]

    p0 = json.loads((out / "phase0.json").read_text())
    assert p0["machine"]["platform"] == "cpu" and p0["machine"]["versions"]["jax"]
    assert {row["script"]: row["ok"] for row in p0["runs"]} == {
        "flowrl_jax": True, "sac_flow_g": True, "sac_flow_t": True, "sac_flow_o2o": True}, p0["runs"]
    assert all(row["loss_points"] > 0 and not row["nonfinite"] for row in p0["runs"])

    p1 = json.loads((out / "phase1.json").read_text())
    assert p1["problems"] == []
    assert [(row["script"], row["num_seeds"]) for row in p1["rows"]] == [("sac_flow_t", 1), ("sac_flow_t", 2)]
    for row in p1["rows"]:
        for key in ("grad_steps_per_s", "loop_env_steps_per_s", "env_step_ms", "compile_s"):
            assert 0 < row[key] < float("inf"), (key, row)
        assert row["profile"]["kernel_ms_per_update"] > 0, row["profile"]
        assert "--num-seeds" in row["loop_command"] if row["num_seeds"] > 1 else "--num-seeds" not in row["loop_command"]
    table = (out / "phase1.md").read_text()
    assert "| sac_flow_t | Hopper-v4 | 1 |" in table and "| sac_flow_t | Hopper-v4 | 2 |" in table
    with tarfile.open(out / "phase1_traces.tar.gz") as t:
        assert sorted(t.getnames()) == ["sac_flow_t_Hopper-v4_1.trace.json.gz", "sac_flow_t_Hopper-v4_2.trace.json.gz"]

    p2 = json.loads((out / "phase2.json").read_text())
    for name in ("flowrl_jax", "sac_flow_t"):
        run2 = p2["runs"][name]
        # stopped by the kit's SIGTERM, which the script takes as a clean stop
        assert run2["returncode"] == 0 and "SIGTERM: stopped after step" in run2["log_tail"], run2["log_tail"]
        assert len(run2["seeds"]) == 2 and "--num-seeds 2" in run2["command"]
    with tarfile.open(out / "phase2_runs.tar.gz") as t:
        names = t.getnames()
    assert "runs/MACHINE" in names
    assert len({os.path.dirname(n) for n in names if "events.out.tfevents" in n}) == 4  # 2 scripts x 2 seeds

    results = tmp_path / "results"
    r = run([COLLECT, str(out), "--out", str(results)], tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    md = (results / "cpu.md").read_text()
    assert "## Phase 0" in md and "| sac_flow_o2o | ok |" in md and "| sac_flow_t | Hopper-v4 | 2 |" in md and "## Phase 2" in md
    raw = json.loads((results / "cpu.json").read_text())
    assert raw["phase1"]["rows"] == p1["rows"]
    assert len([d for d in os.listdir(results / "runs_cpu") if d.startswith("Hopper-v4__")]) == 4
    assert (results / "cpu" / "curves_Hopper-v4.png").exists() and (results / "cpu" / "aggregate.md").exists()


def trace(events: list[dict], folder) -> str:
    os.makedirs(folder / "plugins" / "profile" / "run", exist_ok=True)
    with gzip.open(folder / "plugins" / "profile" / "run" / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    return str(folder)


def test_a_gpu_trace_counts_the_device_streams_once(tmp_path):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 7, "tid": 1, "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 7, "tid": 2, "args": {"name": "XLA Ops"}}]
    kernels = [("nvjet_tst_128x64_gemm", 0.0, 10.0), ("loop_add_fusion", 5.0, 10.0),  # overlapping: busy 0..15
               ("MemcpyH2D", 20.0, 2.0), ("input_reduce_fusion", 30.0, 4.0)]
    events = meta + [{"ph": "X", "pid": 7, "tid": 1, "name": n, "ts": t, "dur": d} for n, t, d in kernels]
    events += [{"ph": "X", "pid": 7, "tid": 2, "name": "fusion.1", "ts": 0.0, "dur": 40.0},  # the per-op line repeats
               {"ph": "X", "pid": 1, "tid": 5, "name": "PjitFunction(update)", "ts": 0.0, "dur": 50.0}]  # host side
    got = throughput.device_kernels(throughput.trace_events(trace(events, tmp_path)))
    assert sorted(got) == sorted(kernels)
    assert throughput.busy_us([(t, d) for _, t, d in got]) == 15.0 + 2.0 + 4.0
    assert throughput.MATMUL_KERNEL.search("nvjet_tst_128x64_gemm") and not throughput.MATMUL_KERNEL.search("loop_add_fusion")
    # a CPU trace has no device process: nothing is read as GPU work
    assert throughput.device_kernels([e for e in events if e.get("pid") != 7]) == []


@pytest.mark.parametrize("intervals, expected", [([], 0.0), ([(0, 5), (1, 2)], 5.0), ([(3, 1), (0, 1), (0.5, 1)], 2.5),
                                                 ([(0, 2), (2, 2)], 4.0)])
def test_busy_time_is_the_union_of_the_intervals(intervals, expected):
    assert throughput.busy_us(intervals) == expected


def test_wheels_check_names_what_is_missing(tmp_path):
    r = run([WHEELS, "--check", "--dir", str(tmp_path)], tmp_path)
    assert r.returncode == 1 and "missing: gymnasium==" in r.stdout and "mujoco==" in r.stdout, r.stdout + r.stderr
    import importlib.metadata

    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
    import wheels

    for name in wheels.PACKAGES:  # a wheel's file name: dist name with '_' for '-' and '.', version, tags
        dist = name.replace("-", "_")
        (tmp_path / f"{dist}-{importlib.metadata.version(name)}-py3-none-any.whl").write_bytes(b"x")
    r = run([WHEELS, "--check", "--dir", str(tmp_path)], tmp_path)
    assert r.returncode == 0 and "missing" not in r.stdout and f"{len(wheels.PACKAGES)} wheels" in r.stdout, r.stdout


def test_kit_and_collect_refuse_bad_input_in_one_line(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    r = run([KIT, "--smoke", "--out", str(not_a_folder / "out")], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "cannot write to --out" in r.stderr, r.stderr
    r = run([KIT, "--smoke", "--out", str(tmp_path / "o"), "--phases", "3"], tmp_path)
    assert r.returncode == 2 and "--phases among 0 1 2 (got [3])" in r.stderr, r.stderr
    r = run([KIT, "--smoke", "--out", str(tmp_path / "o"), "--tasks", "Hoper-v4"], tmp_path)
    assert r.returncode == 2 and "--tasks: " in r.stderr and "Hoper-v4" in r.stderr.splitlines()[-1], r.stderr
    r = run([KIT, "--out", str(tmp_path / "o"), "--phases", "0"], tmp_path)  # the full kit on a machine with no GPU
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: JAX sees no GPU here"), r.stderr
    r = run([COLLECT, str(tmp_path)], tmp_path)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: no phase0.json") and r.stderr.strip().count("\n") == 0


def test_phase1_table_pairs_rows_of_one_device_call():
    """Rows merged from two device calls: each 8-seed row is held against the 1-seed row of its own call."""
    def row(seeds, loop, call):
        return {"script": "flowrl_jax", "env_id": "Hopper-v4", "num_seeds": seeds, "compile_s": 1.0,
                "grad_steps_per_s": 100.0, "loop_env_steps_per_s": loop, "env_step_ms": 0.3, "call": call}

    info = {"device": "d", "platform": "gpu", "cpu_count": 1, "processor": "x", "python": "3", "versions": {},
            "commit": "c", "date": "t"}
    table = kit.phase1_table(info, [row(1, 100.0, "a"), row(8, 50.0, "a"), row(1, 200.0, "b"), row(8, 100.0, "b")], False)
    assert table.count("8 seeds: 2.00 times one seed's wall time") == 2, table
    assert "Hopper-v4 (a)" in table and "Hopper-v4 (b)" in table
    assert "(b): 200 env steps/s (target 1000): missed" in table
