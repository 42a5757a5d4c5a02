"""Where the time of one env step's update goes, ours and the authors', from a jax.profiler trace.

    python benchmarks/profile_update.py                                    # ours: sac_flow_g, sac_flow_t on Hopper-v4
    python benchmarks/profile_update.py --authors /path/to/SAC-FLOW        # and theirs, each in its own run

For each script at its defaults (authors' sizes), in a fresh process:
- wall ms per env step of the update: ours, the compiled update with the actor branch forced off and on
  (critic + actor / policy delay), the median of --calls timed calls each; theirs, every top-level jitted
  call of their own training loop timed to completion (update_critic, update_target, actor_apply_inference
  each env step, update_actor_and_alpha on one in three), the median per function times calls per env step;
- the kernels of --cycles policy-delay cycles traced with jax.profiler, grouped by kind: matmul kernels
  (XLA:CPU's ynn fusions and dots) and each kind of elementwise fusion, copy and control flow, in ms per env step;
- GFLOP per env step (XLA's cost_analysis() of each program) and its rate against the matmul peak measured in the same run.
On XLA:CPU a dot that runs on the thread pool is traced only while it is launched, so the traced matmul
time is a lower bound; the table also gives wall minus the traced non-matmul kernels, an upper bound on
the matmul time. Writes {out}.md and {out}.json.
"""

from __future__ import annotations

import collections
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

MATMUL = re.compile(r"^(ynn_fusion|dot|gemm|matmul|convolution)")


def kernel_breakdown(trace_dir: str, env_steps: int) -> dict:
    """{kind: ms per env step} of the kernels in the trace under trace_dir, and the top kernels ({} if no trace)."""
    from throughput import RUNTIME_EVENTS, traced_kernels

    per_kernel = collections.Counter({name: us / 1e3 / env_steps for name, us in
                                      traced_kernels(trace_dir, RUNTIME_EVENTS + ("end: ", "ParseArguments")).items()})
    if not per_kernel:
        return {}
    kinds = collections.Counter()
    for name, ms in per_kernel.items():
        kinds["matmul" if MATMUL.match(name) else re.sub(r"[.\d]+$", "", name)] += ms
    return {"kinds_ms": dict(kinds.most_common()), "top_kernels_ms": per_kernel.most_common(8)}


# Run as `python record_times.py OUT CALLS_BEFORE_TRACE SCRIPT ARGS...`: SCRIPT as __main__ with jax.jit
# wrapped so that every top-level call of a jitted function is timed to completion and its program costed
# once (XLA's cost_analysis), the calls of a span of 6 update_critic calls (two policy-delay cycles) traced,
# and all of it written to OUT at exit.
RECORDER = '''import atexit, collections, json, runpy, sys, tempfile, time

import jax

sys.path.insert(0, %r)
from profile_update import kernel_breakdown

out, warm, times, _jit = sys.argv[1], int(sys.argv[2]), collections.defaultdict(list), jax.jit
trace, result, flops = tempfile.mkdtemp(), {}, {}


def jit(fun=None, **kw):
    if fun is None:
        return lambda f: jit(f, **kw)
    jitted, name = _jit(fun, **kw), getattr(fun, "__name__", repr(fun))

    class Timed:
        def __call__(self, *a, **k):
            if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((a, k))):
                return jitted(*a, **k)
            n = len(times["update_critic"])
            if name == "update_critic" and n == warm:
                jax.profiler.start_trace(trace)
            if name == "update_critic" and n == warm + 6:
                jax.profiler.stop_trace()
                result.update(kernel_breakdown(trace, 6))
            if name not in flops:
                cost = jitted.lower(*a, **k).compile().cost_analysis()
                cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                flops[name] = float(cost.get("flops", 0.0))  # absent: no arithmetic (a tanh is a transcendental)
            t = time.perf_counter()
            y = jax.block_until_ready(jitted(*a, **k))
            times[name].append(time.perf_counter() - t)
            return y

        def __getattr__(self, attr):
            return getattr(jitted, attr)

    return Timed()


jax.jit = jit
atexit.register(lambda: json.dump({"times": times, "flops": flops, **result}, open(out, "w")))
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
''' % BENCH


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["sac_flow_g", "sac_flow_t"])
    """our scripts to profile"""
    env_id: str = "Hopper-v4"
    """task (its observation and action sizes set the networks' shapes)"""
    authors: str = ""
    """a checkout of github.com/Elessar123/SAC-FLOW: also profile their script of each pair (nothing in it is changed)"""
    calls: int = 15
    """timed calls of our update with the actor branch forced off, and again forced on"""
    cycles: int = 2
    """policy-delay cycles of our update traced"""
    their_steps: int = 60
    """env steps of theirs after learning starts (at least 30: the first 20 warm up, the next 6 are traced)"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "profile_update_cpu")
    """writes {out}.md and {out}.json"""
    keep_freed_memory: bool = True
    """our worker keeps freed memory as the scripts' training runs do (common/run.py); --no-keep-freed-memory
    measures it with glibc's default malloc"""
    worker: str = ""
    """internal: profile our script of this name in this process and print its JSON"""


def profile_ours(name: str, args: Args) -> dict:
    import importlib

    import jax
    import numpy as np

    import throughput
    from common.env import make_env
    from common.run import keep_freed_memory

    sys.path.insert(0, ROOT)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    module = importlib.import_module(name)
    env = make_env(args.env_id, 0)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    margs = module.Args(env_id=args.env_id)
    one_seed = lambda tree: jax.tree_util.tree_map(lambda x: x[None], tree)
    agent = one_seed(module.create_agent(margs, obs_dim, act_dim, jax.random.PRNGKey(0)))
    buf = one_seed(throughput.filled_buffer(margs, obs_dim, act_dim, max(margs.batch_size, 4096)))
    delay = throughput._policy_delay(margs)
    ms, gflop, faults = {}, {}, {}
    for actor in (False, True):
        with throughput.forced_cond(actor):  # the whole block: a call outside it could trace the update again
            update = module.make_update(margs, act_dim)
            gflop[actor] = throughput._flops(update.lower(agent, buf).compile()) / 1e9
            for _ in range(3):
                agent, _ = update(agent, buf)
            times, before = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(args.calls):
                t = time.perf_counter()
                agent, _ = jax.block_until_ready(update(agent, buf))
                times.append(time.perf_counter() - t)
        ms[actor] = 1e3 * float(np.median(times))
        faults[actor] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / args.calls
    update = module.make_update(margs, act_dim)
    for _ in range(delay):
        agent, _ = jax.block_until_ready(update(agent, buf))
    with tempfile.TemporaryDirectory() as trace:
        jax.profiler.start_trace(trace)
        for _ in range(args.cycles * delay):
            agent, _ = update(agent, buf)
        jax.block_until_ready(agent)
        jax.profiler.stop_trace()
        kernels = kernel_breakdown(trace, args.cycles * delay)
    return {"side": "ours", "script": name, "wall_ms": ms[False] + (ms[True] - ms[False]) / delay,
            "gflop": gflop[False] + (gflop[True] - gflop[False]) / delay, "parts_ms": {"critic step": ms[False],
            "critic and actor step": ms[True]}, "page_faults": {"critic step": faults[False],
            "critic and actor step": faults[True]}, "keep_freed_memory": kept, **kernels}


def profile_theirs(name: str, args: Args, work: str) -> dict:
    import numpy as np

    import versus_authors

    env = versus_authors.write_stand_ins(os.path.join(work, "stand_ins"))
    recorder = os.path.join(work, "record_times.py")
    with open(recorder, "w") as f:
        f.write(RECORDER)
    starts = 1000
    run = versus_authors.Args(authors=args.authors, learning_starts=starts)
    cmd = versus_authors.command("theirs", name, run, args.env_id, starts + args.their_steps)
    out = os.path.join(work, f"times_{name}.json")
    cmd[1:1] = [recorder, out, "20"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: their {name} under the recorder exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    with open(out) as f:
        rec = json.load(f)
    steps = len(rec["times"]["update_critic"])
    # each function's median call (the first calls, which compile, left out) times its calls per env step
    parts = {fn: 1e3 * float(np.median(t[3:] or t)) for fn, t in rec["times"].items()}
    per_step = {fn: len(t) / steps for fn, t in rec["times"].items()}
    return {"side": "theirs", "script": name, "wall_ms": sum(parts[fn] * per_step[fn] for fn in parts),
            "gflop": sum(rec["flops"][fn] * per_step[fn] for fn in parts) / 1e9, "parts_ms": parts,
            "kinds_ms": rec.get("kinds_ms", {}), "top_kernels_ms": rec.get("top_kernels_ms", [])}


def markdown(rows: list[dict], args: Args, peak: float, machine: str) -> list[str]:
    """The table: per row the wall time, the FLOPs and their rate, the traced kernels by kind."""
    import versus_authors

    flags = versus_authors.command_flags(args, {"authors": "<checkout>"}, hidden=("worker",))
    total = collections.Counter()
    for r in rows:
        total.update(r["kinds_ms"])
    kinds = [k for k, _ in total.most_common() if k != "matmul"][:7]
    lines = [f"Where one env step's update goes at the authors' defaults on {args.env_id}: wall ms per env step, "
             f"GFLOP per env step and its rate against the matmul peak ({peak:.0f} GFLOP/s, float32 1024x1024, "
             f"measured in the same run), and the traced kernels by kind in ms per env step. Machine: {machine}; "
             f"{time.strftime('%Y-%m-%d')}. Command: python benchmarks/profile_update.py{flags}", "",
             "| side | script | wall ms | GFLOP | GFLOP/s | % of peak | matmul traced | wall - other kernels | "
             + " | ".join(kinds) + " | other kinds |",
             "|---|---|---|---|---|---|---|---|" + "---|" * (len(kinds) + 1)]
    for r in rows:
        k, rate = r["kinds_ms"], r["gflop"] / r["wall_ms"] * 1e3
        other = sum(v for n, v in k.items() if n != "matmul")
        cells = [r["side"], r["script"], f"{r['wall_ms']:.1f}", f"{r['gflop']:.2f}", f"{rate:.0f}", f"{rate / peak:.0%}",
                 f"{k.get('matmul', 0):.1f}", f"{r['wall_ms'] - other:.1f}", *(f"{k.get(n, 0):.1f}" for n in kinds),
                 f"{other - sum(k.get(n, 0) for n in kinds):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Parts, median ms per call: " + "; ".join(
        f"{r['side']} {r['script']}: " + ", ".join(f"{n} {v:.1f}" for n, v in r["parts_ms"].items()) for r in rows)]
    return lines


def check(args: Args) -> None:
    import versus_authors

    for name in args.scripts:
        if name not in versus_authors.PAIRS:
            raise SystemExit(f"error: unknown script {name!r}; choose from {', '.join(versus_authors.PAIRS)}")
    if args.authors:
        versus_authors.check(versus_authors.Args(authors=args.authors, scripts=args.scripts))
    for name, value, least in [("--calls", args.calls, 1), ("--cycles", args.cycles, 1), ("--their-steps", args.their_steps, 30)]:
        if value < least:
            raise SystemExit(f"error: {name} must be at least {least}, got {value}")


def main(argv=None) -> int:
    import tyro

    args = tyro.cli(Args, args=argv)
    if args.worker:
        print("RESULT " + json.dumps(profile_ours(args.worker, args)))
        return 0
    import throughput
    import versus_authors

    check(args)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.scripts:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--env-id", args.env_id,
                   "--calls", str(args.calls), "--cycles", str(args.cycles),
                   "--keep-freed-memory" if args.keep_freed_memory else "--no-keep-freed-memory"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"error: profiling {name} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
            rows.append(json.loads(lines[-1][7:]))
            if args.authors:
                rows.append(profile_theirs(name, args, work))
            print(f"{name}: " + ", ".join(f"{r['side']} {r['wall_ms']:.1f} ms" for r in rows[-1 - bool(args.authors):]),
                  flush=True)
        peak = max(throughput.matmul_peak_gflops().values())
    versus_authors.write_results(args, rows, markdown(rows, args, peak, versus_authors.MACHINE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
