"""Turn what the GPU kit brought back into the results files the docs cite.

    python benchmarks/gpu/collect.py /work/.device/<...>/files_at       # the device tool's files_at folder
    python benchmarks/gpu/collect.py /tmp/kit --out /tmp/results         # anywhere else

Writes, with <name> from the device (gpu_h200 for an NVIDIA H200; cpu for a --smoke run), replacing an earlier one:
- <name>.md: the machine, phase 0's checks, phase 1's table (with the targets), phase 2's summary;
- <name>.json: every row the kit measured (the raw figures, tagged with the machine and the commit);
- runs_<name>/: phase 2's TensorBoard logs, and <name>/: their curves (benchmarks/plot.py) and the scores across
  tasks (benchmarks/aggregate.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, HERE)

import kit  # noqa: E402  (the phase 1 table, drawn as the kit draws it)


def name_of(info: dict) -> str:
    """gpu_h200 for 'NVIDIA H200', cpu on a CPU."""
    if info["platform"] != "gpu":
        return info["platform"]
    return "gpu_" + re.sub(r"[^a-z0-9]+", "_", info["device"].lower().replace("nvidia", "")).strip("_")


def load(folder: str, name: str):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def phase0_lines(p0: dict) -> list[str]:
    lines = ["## Phase 0: the four scripts on the device", "",
             "| script | result | loss points after learning starts | last step | wall s |", "|---|---|---|---|---|"]
    for r in p0["runs"]:
        lines.append(f"| {r['script']} | {'ok' if r['ok'] else 'FAILED: ' + r.get('problem', '')} | {r.get('loss_points', '-')} "
                     f"| {r.get('last_step', '-')} | {r.get('wall_s', float('nan')):.0f} |")
    return lines


def phase2_lines(p2: dict) -> list[str]:
    lines = [f"## Phase 2: learning on {p2['env_id']}, {p2['num_seeds']} seeds in one process per script", "",
             "| script | command | seeds | env steps reached | last evaluation (mean over seeds) | exit |",
             "|---|---|---|---|---|---|"]
    for script, run in p2["runs"].items():
        seeds = run["seeds"].values()
        last = [s["eval"][-1][1] for s in seeds if s["eval"]]
        reached = min((s["last_step"] for s in seeds), default=0)
        mean = f"{sum(last) / len(last):.1f} ({len(last)} seeds)" if last else "-"
        lines.append(f"| {script} | `python {run['command']}` | {len(run['seeds'])} | {reached} | {mean} | {run['returncode']} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="what the kit wrote (its --out; the device tool's files_at)")
    parser.add_argument("--out", default=RESULTS, help="where the results go (default benchmarks/results)")
    args = parser.parse_args(argv)
    p0, p1, p2 = (load(args.folder, f"phase{i}.json") for i in range(3))
    if p0 is None and p1 is None and p2 is None:
        raise SystemExit(f"error: no phase0.json, phase1.json or phase2.json in {args.folder!r}: is it the kit's --out?")
    info = next(p["machine"] for p in (p0, p1, p2) if p is not None)
    if info["commit"] == "unknown":  # the device tool sends no .git: the checkout this runs in is the one that ran
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True)
        if head.returncode == 0:
            changes = " with uncommitted changes" if dirty.stdout.strip() else ""
            info["commit"] = f"{head.stdout.strip()}{changes} (where collect.py ran: the device gets no .git)"
    name = name_of(info)
    os.makedirs(args.out, exist_ok=True)
    lines = [f"# The GPU kit on {info['device']}", "",
             f"Machine: {info['device']} ({info['platform']}, {info.get('nvidia_smi') or 'no nvidia-smi'}), {info['cpu_count']} "
             f"CPU cores, Python {info['python']}; commit {info['commit']}; {info['date']}. Command: `bash benchmarks/gpu/device.sh` "
             "(benchmarks/gpu/README.md).", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()), ""]
    if p0:
        lines += phase0_lines(p0) + [""]
    if p1:
        table = kit.phase1_table(info, p1["rows"], p1["smoke"])
        lines += ["## Phase 1: speed at the authors' sizes", "", table.strip(), *[f"\nProblem: {p}" for p in p1["problems"]], ""]
    if p2:
        lines += phase2_lines(p2) + ["", f"Curves: {name}/ (benchmarks/plot.py), scores across tasks: {name}/aggregate.md "
                                         "(benchmarks/aggregate.py)."]
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"machine": info, "phase0": p0, "phase1": p1, "phase2": p2}, f, indent=1)
    print(f"wrote {os.path.join(args.out, name)}.md and .json")
    failed = []
    tar = os.path.join(args.folder, "phase2_runs.tar.gz")
    if os.path.exists(tar):
        runs, figures = os.path.join(args.out, f"runs_{name}"), os.path.join(args.out, name)
        shutil.rmtree(runs, ignore_errors=True)
        with tarfile.open(tar) as t:
            members = [m for m in t.getmembers() if m.isfile() and m.name.startswith("runs/") and ".." not in m.name]
            for m in members:
                m.name = m.name[len("runs/"):]
            t.extractall(runs, members=members, filter="data")
        machine_line = os.path.join(runs, "MACHINE")
        if os.path.exists(machine_line):  # the commit filled in above
            with open(machine_line) as f:
                line = f.read().replace("commit unknown", f"commit {info['commit']}")
            with open(machine_line, "w") as f:
                f.write(line)
        for tool, extra in (("plot.py", []), ("aggregate.py", ["--metric", "train"])):
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", tool), "--runs", runs, "--out", figures, *extra],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                failed.append(f"{tool}: {(proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]}")
        print(f"wrote {runs}/ and {figures}/")
    for f in failed:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
