"""Where the time of one env step's update goes, ours and the authors', from a jax.profiler trace.

    python benchmarks/profile_update.py                                    # ours: sac_flow_g, sac_flow_t on Hopper-v4
    python benchmarks/profile_update.py --authors /path/to/SAC-FLOW        # and theirs, each in its own run

For each script at its defaults (authors' sizes), in a fresh process:
- wall ms per env step of the update: ours, the compiled update with the actor branch forced off and on
  (critic + actor / policy delay), the median of --calls timed calls each, the two alternating; theirs,
  every top-level jitted call of their own training loop timed to completion (update_critic, update_target, actor_apply_inference
  each env step, update_actor_and_alpha on one in three), the median per function times calls per env step;
- the kernels of --cycles policy-delay cycles traced with jax.profiler, grouped by kind: matmul kernels
  (XLA:CPU's ynn fusions and dots) and each kind of elementwise fusion, copy and control flow, in ms per env step;
- GFLOP per env step (XLA's cost_analysis() of each program) and its rate against the peak: a float32
  1024 x 1024 matmul timed 3 times before each timed call (ours) or after each untraced update_critic call
  (theirs), in the same process, so that both see the same moments of a shared machine; the share is given
  median against median and best against best (a best-of peak against a median update mixes the machine's
  spread into the share);
- ours only: the update's own matmuls alone, its dot_generals (same shapes, dimension numbers and count,
  a scan's once per iteration, dead code and repeats on the same values left out as XLA leaves them out),
  each distinct one jitted alone on random inputs and timed beside the update (one call of each per round,
  less the time of an empty call, times its count): about the rate the update would reach if all its other
  work were free.
On XLA:CPU a dot that runs on the thread pool is traced only while it is launched, so the traced matmul
time is a lower bound; the table also gives wall minus the traced non-matmul kernels, an upper bound on
the matmul time. Writes {out}.md and {out}.json.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

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


PEAK_N, PEAK_CALLS = 1024, 3  # the peak: a float32 1024 x 1024 matmul, sampled 3 times before each timed update


@functools.cache
def peak_sampler(n: int = PEAK_N):
    """A function timing one jitted float32 n x n matmul (seconds): at n = 1024 the machine's matmul rate,
    sampled between the update's calls so that both see the same moments of a shared machine; at n = 1
    what a call costs beside its arithmetic."""
    import jax

    x = jax.device_put(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    mm = jax.jit(lambda m: m @ m)
    mm(x).block_until_ready()

    def sample() -> float:
        t = time.perf_counter()
        mm(x).block_until_ready()
        return time.perf_counter() - t

    return sample


def update_dots(jaxpr) -> list:
    """The dot_generals one call of `jaxpr` executes, as (lhs aval, rhs aval, params), without dead code or
    repeats of a product already computed (as XLA would): a scan's once per iteration, of a cond's branches
    the one with the most FLOPs."""
    from jax._src.interpreters import partial_eval as pe  # jax has no public dead-code pass for jaxprs

    return _dots(pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0])


def _dots(jaxpr, times: int = 1) -> list:
    from jax.extend import core

    # value numbering: an equation of the same primitive and parameters on the same values computes the
    # same value, which XLA computes once (the rollout's K products of s with the same weight, for one)
    number, seen, dots = {}, {}, []  # number: variable -> value number; seen: equation -> its number
    value = lambda v: ("literal", repr(v.val)) if isinstance(v, core.Literal) else number.get(v, ("input", id(v)))
    for eqn in jaxpr.eqns:
        params = tuple((k, id(v) if isinstance(v, (core.ClosedJaxpr, core.Jaxpr)) else repr(v))
                       for k, v in sorted(eqn.params.items()))
        key = (eqn.primitive.name, params, tuple(map(value, eqn.invars)))
        repeat = key in seen
        n = seen.setdefault(key, len(seen))
        number.update((out, (n, i)) for i, out in enumerate(eqn.outvars))
        if repeat:
            continue
        if eqn.primitive.name == "dot_general":
            dots += [(eqn.invars[0].aval, eqn.invars[1].aval, eqn.params)] * times
        elif eqn.primitive.name == "scan":
            dots += _dots(eqn.params["jaxpr"].jaxpr, times * eqn.params["length"])
        elif eqn.primitive.name == "cond":
            dots += max((_dots(b.jaxpr, times) for b in eqn.params["branches"]), key=dot_flops)
        else:
            for v in eqn.params.values():
                if isinstance(v, (core.ClosedJaxpr, core.Jaxpr)):
                    dots += _dots(getattr(v, "jaxpr", v), times)
    return dots


def dot_flops(dots: list) -> int:
    """2 x multiply-adds of each dot: the lhs's elements times the rhs's free (neither contracted nor batch) sizes."""
    total = 0
    for lhs, rhs, params in dots:
        (_, rc), (_, rb) = params["dimension_numbers"]
        free = [n for i, n in enumerate(rhs.shape) if i not in rc and i not in rb]
        total += 2 * int(np.prod(lhs.shape)) * int(np.prod(free))
    return total


def matmuls_alone(dots: list) -> list:
    """Each distinct product among `dots` (shapes, dimension numbers, precision) as (a jitted function of
    its own, random inputs, how many times the update computes it)."""
    import jax

    counts = collections.Counter((lhs, rhs, tuple(sorted(p.items()))) for lhs, rhs, p in dots)
    rng, products = np.random.default_rng(0), []
    for (lhs, rhs, params), count in counts.items():
        fn = jax.jit(lambda x, y, p=dict(params): jax.lax.dot_general(x, y, **p))
        x, y = (jax.device_put(rng.standard_normal(a.shape).astype(a.dtype)) for a in (lhs, rhs))
        fn(x, y).block_until_ready()
        products.append((fn, x, y, count))
    return products


def time_products(products: list) -> list:
    """Seconds of one call of each product (its function called once, to completion), less those of a
    call of a 1 x 1 product timed just before it: what a call costs beside its arithmetic."""
    seconds, empty = [], peak_sampler(1)
    for fn, a, b, _ in products:
        overhead = empty()
        t = time.perf_counter()
        fn(a, b).block_until_ready()
        seconds.append(max(time.perf_counter() - t - overhead, 0.0))
    return seconds


# Run as `python record_times.py OUT CALLS_BEFORE_TRACE SCRIPT ARGS...`: SCRIPT as __main__ with jax.jit
# wrapped so that every top-level call of a jitted function is timed to completion and its program costed
# once (XLA's cost_analysis), the calls of a span of 6 update_critic calls (two policy-delay cycles) traced,
# the peak matmul sampled after each other update_critic call from the fourth on, and all of it written to
# OUT at exit.
RECORDER = '''import atexit, collections, json, runpy, sys, tempfile, time

import jax

sys.path.insert(0, %r)
from profile_update import PEAK_CALLS, kernel_breakdown, peak_sampler

out, warm, times, _jit = sys.argv[1], int(sys.argv[2]), collections.defaultdict(list), jax.jit
trace, result, flops, sample_peak, peak = tempfile.mkdtemp(), {}, {}, peak_sampler(), []


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
            if name == "update_critic" and 3 <= n and not warm <= n < warm + 6:  # not while tracing
                peak.extend(sample_peak() for _ in range(PEAK_CALLS))
            return y

        def __getattr__(self, attr):
            return getattr(jitted, attr)

    return Timed()


jax.jit = jit
atexit.register(lambda: json.dump({"times": times, "flops": flops, "peak_s": peak, **result}, open(out, "w")))
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
    """rounds of timed calls of ours: the peak matmul, the update with the actor branch forced off, then on,
    each followed by its matmuls alone"""
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
    compiled, gflop, alone, alone_gflop = {}, {}, {}, {}
    for actor in (False, True):
        with throughput.forced_cond(actor):  # compiled ahead of time: no later call can trace it again
            update = module.make_update(margs, act_dim)
            compiled[actor] = update.lower(agent, buf).compile()
            dots = update_dots(jax.make_jaxpr(update)(agent, buf).jaxpr)
        gflop[actor] = throughput._flops(compiled[actor]) / 1e9
        alone[actor], alone_gflop[actor] = matmuls_alone(dots), dot_flops(dots) / 1e9
        for _ in range(3):
            agent, _ = jax.block_until_ready(compiled[actor](agent, buf))
    # one round: the peak matmul PEAK_CALLS times, then each variant of the update and its matmuls alone
    sample_peak, peak = peak_sampler(), []
    times = {(kind, actor): [] for kind in ("update", "alone") for actor in (False, True)}
    faults = dict.fromkeys((False, True), 0)
    for _ in range(args.calls):
        peak += [sample_peak() for _ in range(PEAK_CALLS)]
        for actor in (False, True):
            before, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            agent, _ = jax.block_until_ready(compiled[actor](agent, buf))
            times["update", actor].append(time.perf_counter() - t)
            faults[actor] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            times["alone", actor].append(time_products(alone[actor]))
    per_step = lambda x: x[False] + (x[True] - x[False]) / delay  # critic every step, actor one in `delay`
    ms, best = {}, {}
    for (kind, actor), t in times.items():  # "alone": a round's seconds per product, times its count
        t = np.array(t) * np.array([c for *_, c in alone[actor]]) if kind == "alone" else np.array(t)[:, None]
        ms[kind, actor] = 1e3 * float(np.median(t.sum(axis=1)))
        best[kind, actor] = 1e3 * float(t.min(axis=0).sum())
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
    pick = lambda d, kind: {a: d[kind, a] for a in (False, True)}
    return {"side": "ours", "script": name, "wall_ms": per_step(pick(ms, "update")),
            "best_wall_ms": per_step(pick(best, "update")), "gflop": per_step(gflop), **peak_rates(peak),
            "matmuls_alone": {"gflop": per_step(alone_gflop), "wall_ms": per_step(pick(ms, "alone")),
                              "best_wall_ms": per_step(pick(best, "alone"))},
            "parts_ms": {"critic step": ms["update", False], "critic and actor step": ms["update", True]},
            "page_faults": {"critic step": faults[False] / args.calls, "critic and actor step": faults[True] / args.calls},
            "keep_freed_memory": kept, **kernels}


def peak_rates(seconds: list) -> dict:
    """The peak matmul's median and best rate over its interleaved samples (GFLOP/s)."""
    flop = 2 * PEAK_N**3 / 1e9
    return {"peak_gflops": flop / float(np.median(seconds)), "best_peak_gflops": flop / float(np.min(seconds)),
            "peak_samples": len(seconds)}


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
    best = {fn: 1e3 * float(np.min(t[3:] or t)) for fn, t in rec["times"].items()}
    per_step = {fn: len(t) / steps for fn, t in rec["times"].items()}
    return {"side": "theirs", "script": name, "wall_ms": sum(parts[fn] * per_step[fn] for fn in parts),
            "best_wall_ms": sum(best[fn] * per_step[fn] for fn in parts),
            "gflop": sum(rec["flops"][fn] * per_step[fn] for fn in parts) / 1e9, **peak_rates(rec["peak_s"]),
            "parts_ms": parts,
            "kinds_ms": rec.get("kinds_ms", {}), "top_kernels_ms": rec.get("top_kernels_ms", [])}


def markdown(rows: list[dict], args: Args, machine: str) -> list[str]:
    """The table: per row the wall time, the FLOPs and their rate against the peak sampled beside them, the
    update's matmuls alone (ours), the traced kernels by kind."""
    import versus_authors

    flags = versus_authors.command_flags(args, {"authors": "<checkout>"}, hidden=("worker",))
    total = collections.Counter()
    for r in rows:
        total.update(r["kinds_ms"])
    kinds = [k for k, _ in total.most_common() if k != "matmul"][:7]
    lines = [f"Where one env step's update goes at the authors' defaults on {args.env_id}: wall ms per env step "
             "(median), GFLOP per env step and its rate; peak: a float32 1024 x 1024 matmul timed "
             f"{PEAK_CALLS} times before each timed update call in the same process (the median sample); % of peak: "
             "the median update against the median sample; best: the fastest update calls against the fastest "
             "sample; matmuls alone: our update's own dot_generals (same shapes, dimension numbers and count), "
             "each distinct one timed alone beside the update, against the median sample: about the most the update "
             "could reach if all its other work were free; then the traced kernels by kind in ms per env step. Machine: "
             f"{machine}; {time.strftime('%Y-%m-%d')}. Command: python benchmarks/profile_update.py{flags}", "",
             "| side | script | wall ms | GFLOP | GFLOP/s | peak GFLOP/s | % of peak | best: % of peak | "
             "matmuls alone: % of peak | matmul traced | wall - other kernels | " + " | ".join(kinds) + " | other kinds |",
             "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (len(kinds) + 1)]
    for r in rows:
        k, rate = r["kinds_ms"], r["gflop"] / r["wall_ms"] * 1e3
        other = sum(v for n, v in k.items() if n != "matmul")
        best = r["gflop"] / r["best_wall_ms"] * 1e3 / r["best_peak_gflops"]
        alone = r.get("matmuls_alone")
        alone = f"{alone['gflop'] / alone['wall_ms'] * 1e3 / r['peak_gflops']:.0%}" if alone else "-"
        cells = [r["side"], r["script"], f"{r['wall_ms']:.1f}", f"{r['gflop']:.2f}", f"{rate:.0f}",
                 f"{r['peak_gflops']:.0f}", f"{rate / r['peak_gflops']:.0%}", f"{best:.0%}", alone,
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
    versus_authors.write_results(args, rows, markdown(rows, args, versus_authors.MACHINE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
