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


def fill(buf, values):
    """A replay buffer (common.buffer) after adding a transition per value v: obs v, action v, reward v, next obs v + 0.5."""
    import numpy as np

    from common.buffer import buffer_add

    for v in values:
        o = np.full(buf.obs.shape[1], v, np.float32)
        buf = buffer_add(buf, o, np.full(buf.actions.shape[1], v, np.float32), np.float32(v), o + 0.5, np.float32(0))
    return buf


def run_script(script: str, args: list[str], cwd: str, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MUJOCO_GL": "egl", **(env or {})}
    env.pop("WANDB_SERVICE", None)  # a wandb service an in-process test started is not the script's
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def stable_tanh_log_det(x_final, scale):
    """log(scale (1 - tanh(x)^2)) summed over the last axis, written stably: 2 (log 2 - x - softplus(-2 x)) + log scale.

    For tests that compare a vmapped update with an unvmapped one (many seeds against one). The authors' formula
    in the SAC Flow scripts, log(scale (1 - tanh^2) + 1e-6), loses 1 - tanh^2's precision near saturation, so two
    programs whose x_K differ by an ulp get log pi differing by up to 1e-2 on some samples; after ten updates
    4 of 6 seeds agreed to 2e-7, 2 differed by 3e-4 and 9e-3 (XLA:CPU at optimisation level 0, AVX-512). With
    this one all 6 agreed to 3e-7: it tests the seeding and the sharding, not that formula."""
    import jax
    import jax.numpy as jnp

    return jnp.sum(2.0 * (jnp.log(2.0) - x_final - jax.nn.softplus(-2.0 * x_final)) + jnp.log(scale), axis=-1)


def stable_log_det_script(name: str, folder) -> str:
    """A script in `folder` that runs {name}.py's main with stable_tanh_log_det (when it has a tanh_log_det)."""
    path = os.path.join(str(folder), f"{name}_stable_log_det.py")
    with open(path, "w") as f:
        f.write(f"import sys\nsys.path[:0] = [{ROOT!r}, {os.path.dirname(os.path.abspath(__file__))!r}]\n"
                f"import helpers\nimport {name} as module\n"
                "if hasattr(module, 'tanh_log_det'):\n    module.tanh_log_det = helpers.stable_tanh_log_det\n"
                "sys.exit(module.main())\n")
    return path


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


def read_wandb_offline(path: str) -> dict:
    """What an offline wandb run file (`run-{id}.wandb`) holds, read with our own parser of its record log
    (LevelDB's log format: 32 KiB blocks of records with a 7-byte header, after a 7-byte file header
    ':W&B' 0xBEE1 version), each record a wandb `Record` protobuf: {"id", "config", "history": [(step, {key:
    value})]}."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(chunks)
            chunks = b""
    out = {"id": None, "config": {}, "history": []}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"] = record.run.run_id
            out["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            out["history"].append((int(record.history.step.num), items))
    return out


def wandb_offline_runs(log_dir: str) -> list[dict]:
    """Every offline wandb run file under a log folder, oldest session first (read_wandb_offline). Ordered by
    when each file was last written, not by folder name: a session resumed within the same second gets the
    folder name with "-1" appended, which sorts before the first one's."""
    files = glob.glob(os.path.join(log_dir, "wandb", "offline-run-*", "run-*.wandb"))
    return [read_wandb_offline(f) for f in sorted(files, key=lambda f: os.stat(f).st_mtime_ns)]


def assert_wandb_matches_tensorboard(log_dir: str, tags, config: dict) -> None:
    """A --track run's wandb history holds every one of `tags` at the same steps and values as TensorBoard,
    and its config the given arguments."""
    import pytest

    (run,) = wandb_offline_runs(log_dir)
    assert run["id"] == os.path.basename(log_dir)
    assert {k: run["config"].get(k) for k in config} == config
    tensorboard = read_scalars(log_dir)
    for tag in tags:
        logged = [(step, items[tag]) for step, items in run["history"] if tag in items]
        assert logged and [s for s, _ in logged] == [s for s, _ in tensorboard[tag]], tag
        assert [v for _, v in logged] == pytest.approx([v for _, v in tensorboard[tag]], rel=1e-6), tag
