"""Run scripts x tasks x seeds, as a user would type them, into one runs/ tree.

    python benchmarks/run.py --scripts flowrl_jax --env-ids Hopper-v4 --seeds 1 2 \
        --extra="--total-timesteps 25000 --eval-every 5000"

Each job is `python {script}.py --env-id {env} --seed {seed} {extra}` started in --workdir, so its logs
land in {workdir}/runs/{env}__{script}__{seed}__{time}; stdout and stderr go to
{workdir}/runs/logs/{env}__{script}__{seed}.log. Up to --jobs run at once. Each process gets
its own share of the cores (CPU affinity, which XLA's thread pool follows), so
parallel jobs do not fight over them. Exits non-zero if a job
failed and says which, with the tail of its log.
"""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("flowrl_jax", "sac_flow_g", "sac_flow_t")


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["flowrl_jax"])
    """scripts to run (flowrl_jax, sac_flow_g, sac_flow_t)"""
    env_ids: list[str] = field(default_factory=lambda: ["Hopper-v4"])
    """tasks"""
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    """seeds; one process per (script, task, seed)"""
    extra: str = ""
    """further flags for every script, given with = since they start with dashes: --extra="--total-timesteps 50000" """
    jobs: int = 0
    """processes at once (0: one per 2 CPU cores, at least 1)"""
    workdir: str = "."
    """the folder the scripts run in; their logs go to {workdir}/runs"""
    dry_run: bool = False
    """print the commands and exit"""


def commands(args: Args) -> list[tuple[str, list[str]]]:
    for script in args.scripts:
        if script.removesuffix(".py") not in SCRIPTS:
            raise SystemExit(f"error: unknown script {script!r}; choose from {', '.join(SCRIPTS)}")
    if not args.seeds:
        raise SystemExit("error: --seeds is empty; give at least one seed")
    out = []
    for script, env_id, seed in itertools.product(args.scripts, args.env_ids, args.seeds):
        script = script.removesuffix(".py")
        name = f"{env_id.replace('/', '_')}__{script}__{seed}"
        cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), "--env-id", env_id, "--seed", str(seed),
               "--no-progress", *shlex.split(args.extra)]
        out.append((name, cmd))
    return out


def main() -> None:
    import tyro

    args = tyro.cli(Args)
    jobs = commands(args)
    cores = os.cpu_count() or 1
    parallel = args.jobs if args.jobs > 0 else max(1, cores // 2)
    # job i is pinned to cores shares[i % parallel]; XLA sizes its thread pool from the affinity mask
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    shares = [available[i::parallel] for i in range(parallel)] if len(available) >= parallel > 1 else []
    log_dir = os.path.join(args.workdir, "runs", "logs")
    for name, cmd in jobs:
        print(f"{name}: {shlex.join(cmd)}")
    if args.dry_run:
        return
    os.makedirs(log_dir, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    pending, running, failed = list(jobs), {}, []
    free = list(range(len(shares)))
    start = time.time()
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd = pending.pop(0)
            log = open(os.path.join(log_dir, f"{name}.log"), "w")
            share = free.pop(0) if free else None
            pin = (lambda cpus=shares[share]: os.sched_setaffinity(0, cpus)) if share is not None else None
            proc = subprocess.Popen(cmd, cwd=args.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)
            running[name] = (proc, log, share)
            where = f" on cores {shares[share]}" if share is not None else ""
            print(f"[{time.time() - start:7.0f} s] started {name}{where}")
        time.sleep(1.0)
        for name, (proc, log, share) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if share is not None:
                free.append(share)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"[{time.time() - start:7.0f} s] {status} {name}")
            if proc.returncode != 0:
                failed.append(name)
                with open(os.path.join(log_dir, f"{name}.log")) as f:
                    print("".join(f.readlines()[-5:]), end="")
    if failed:
        raise SystemExit(f"{len(failed)} of {len(jobs)} runs failed: {', '.join(failed)} (logs in {log_dir})")
    print(f"all {len(jobs)} runs done in {time.time() - start:.0f} s; logs in {os.path.join(args.workdir, 'runs')}")


if __name__ == "__main__":
    main()
