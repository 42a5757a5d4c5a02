"""Running a script as a user would, and reading what it logged."""

import glob
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small networks and batches, so that short runs cross --learning-starts in seconds.
TINY = {
    "flowrl_jax": ["--hidden-dim", "32", "--batch-size", "32"],
    "sac_flow_g": ["--hidden-dim", "16", "--critic-width", "32", "--log-std-hidden", "16", "--batch-size", "32",
                   "--renorm-warmup", "80", "--policy-delay", "2"],
    # Flow-T's default (post-norm batch-renormalised) decoder removes the batch-constant time embedding in the
    # actor loss, so some actor parameters get float-noise gradients that Adam turns into lr-sized steps, which
    # no tolerance can compare across vmapped and single runs: the short tests keep the actor update out
    # (--policy-delay 20); Flow-G's configuration covers the actor update.
    "sac_flow_t": ["--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--critic-width", "32", "--log-std-hidden", "16",
                   "--batch-size", "32", "--renorm-warmup", "80", "--policy-delay", "20"],
}


def run_script(script: str, args: list[str], cwd: str, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", MUJOCO_GL="egl", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def only_run_dir(cwd: str) -> str:
    dirs = glob.glob(os.path.join(cwd, "runs", "*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def all_finite(points) -> bool:
    return all(math.isfinite(v) for _, v in points)


def assert_same_tree(a, b, path: str = "") -> None:
    """Bit-for-bit equality of two restored msgpack trees (dicts, lists, arrays, scalars)."""
    import numpy as np

    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b) if isinstance(b, dict) else b)
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    else:
        assert a == b, (path, a, b)
