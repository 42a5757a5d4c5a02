"""Every repeat of every committed `versus_authors.py` run, pooled per task and script.

    python benchmarks/pool_versus_authors.py                     # the committed tables
    python benchmarks/pool_versus_authors.py --files a.json b.json --target 1.25 --out pooled

One run of `versus_authors.py` gives two or three repeats per row; on a shared machine whose speed moves
by a fifth within the hour, a row's median over three repeats moves by about as much as the row clears
the target by. Each repeat is one interleaved comparison of the same code, so the repeats of all runs
can be pooled: per (task, script), the ours / authors' ratio of every repeat (the marginal rate of every
run; the within-run rate of the runs that have it), with the median, the quartiles, the range, and how
many repeats reach --target. Writes {out}.md and {out}.json.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(BENCH, "results")


@dataclass
class Args:
    files: list[str] = field(default_factory=list)
    """versus_authors.py result files (.json); none: every benchmarks/results/versus_authors*.json with timings"""
    target: float = 1.25
    """the ratio a repeat is counted against"""
    out: str = os.path.join(RESULTS, "versus_authors_pooled")
    """output path without extension"""


def read_runs(paths: list[str]) -> list[dict]:
    """The runs with timings among `paths` (a FLOPs-only run has no ratios), each {file, machine, rows}; ValueError
    naming the file that is not a versus_authors.py result."""
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
            rows = [{"env_id": str(r["env_id"]), "script": str(r["script"]), "ratio": [float(x) for x in r["ratio"]],
                     "ratio_within": [float(x) for x in r.get("ratio_within") or []]}
                    for r in data.get("rows", []) if isinstance(r.get("ratio"), list) and r["ratio"]]
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{path} is not a versus_authors.py result ({type(e).__name__}: {e})") from None
        if rows:
            runs.append({"file": os.path.basename(path), "machine": str(data.get("machine", "")), "rows": rows})
    return runs


def pool(runs: list[dict], target: float) -> list[dict]:
    """Per (task, script), in order of first appearance: each kind of ratio's repeats pooled over the runs."""
    pooled = {}
    for run in runs:
        for row in run["rows"]:
            entry = pooled.setdefault((row["env_id"], row["script"]), {"ratio": [], "ratio_within": [], "files": []})
            entry["files"].append(run["file"])
            for kind in ("ratio", "ratio_within"):
                entry[kind] += row[kind]
    out = []
    for (env_id, script), entry in pooled.items():
        row = {"env_id": env_id, "script": script, "runs": len(entry["files"])}
        for kind in ("ratio", "ratio_within"):
            values = np.array(entry[kind], dtype=float)
            row[kind] = None if values.size == 0 else {
                "n": int(values.size), "median": float(np.median(values)),
                "q1": float(np.percentile(values, 25)), "q3": float(np.percentile(values, 75)),
                "min": float(values.min()), "max": float(values.max()), "at_target": int(np.sum(values >= target))}
        out.append(row)
    return out


def cell(stats: dict | None) -> str:
    if stats is None:
        return "-"
    return (f"{stats['median']:.2f} ({stats['q1']:.2f} to {stats['q3']:.2f}; {stats['min']:.2f} to {stats['max']:.2f}), "
            f"{stats['at_target']} of {stats['n']}")


def markdown(rows: list[dict], runs: list[dict], target: float) -> list[str]:
    return [f"Ours / authors' env steps/s, every repeat of {len(runs)} runs of versus_authors.py pooled per row: median "
            f"(quartiles; min to max), and how many repeats reach {target}. Marginal: the difference of a short and a "
            "long run; within: between the per-step update calls of each run (the runs that time it). Runs, with the "
            "machine as each file records it: " + "; ".join(f"{run['file']} ({run['machine'] or 'not recorded'})"
                                                           for run in runs) + ".",
            "",
            "| task | script | runs | ours / authors', marginal | ours / authors', within |",
            "|---|---|---|---|---|",
            *[f"| {r['env_id']} | {r['script']} | {r['runs']} | {cell(r['ratio'])} | {cell(r['ratio_within'])} |"
              for r in rows]]


def main(argv=None) -> int:
    import tyro

    args = tyro.cli(Args, args=argv)
    paths = args.files or sorted(p for p in glob.glob(os.path.join(RESULTS, "versus_authors*.json"))
                                 if os.path.abspath(p) != os.path.abspath(args.out + ".json"))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        print(f"error: --files: {missing[0]} is not a file", file=sys.stderr)
        return 2
    if not args.target > 0:
        print(f"error: --target must be positive, got {args.target}", file=sys.stderr)
        return 2
    try:
        runs = read_runs(paths)
    except ValueError as e:
        print(f"error: --files: {e}", file=sys.stderr)
        return 2
    if not runs:
        print("error: --files: none of them holds a timed versus_authors.py run", file=sys.stderr)
        return 2
    rows = pool(runs, args.target)
    lines = markdown(rows, runs, args.target)
    print("\n".join(lines))
    try:
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"target": args.target, "runs": [{k: run[k] for k in ("file", "machine")} for run in runs],
                       "rows": rows}, f, indent=1)
    except OSError as e:
        print(f"error: --out {args.out}: cannot write ({e.strerror})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
