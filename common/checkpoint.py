"""Model files and training checkpoints: an 8-byte magic, the payload's length and CRC-32, then flax's msgpack.

The CRC refuses a truncated or damaged file before any of it is trusted. A write goes to a temp file in the same
folder, fsynced and renamed over the target: a crash mid-write leaves the previous file intact. A model file holds
{"algo", "kind": "model", "config", "params"}; a training checkpoint everything --resume needs (training_checkpoint).
"""

from __future__ import annotations

import glob
import os
import random
import re
import signal
import struct
import tempfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, fields

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from common.args import ConfigError
from common.env import rng_state, set_rng_state
from common.seeds import per_seed, stack_seeds

MAGIC = b"FLOWCKPT"
HEADER = struct.Struct("<8sQI")  # magic, payload bytes, CRC-32 of the payload
FORMAT = 2  # 2: training checkpoints carry a leading seed axis (--num-seeds); earlier files are refused


def write_atomic(path: str, payload: dict) -> None:
    blob = serialization.msgpack_serialize(payload)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from the user's group
        with os.fdopen(fd, "wb") as f:
            f.write(HEADER.pack(MAGIC, len(blob), zlib.crc32(blob)))
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_container(path: str, flag: str) -> dict:
    """Read and verify a file written by `write_atomic`; any defect is a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {flag} {path!r}: {e.strerror}") from None
    if blob[:len(MAGIC)] != MAGIC:
        raise ConfigError(f"{flag} {path!r} is corrupt or not a file these scripts wrote (model files from before "
                          "2026-11, bare msgpack, are no longer read: use the version that wrote them)")
    if len(blob) < HEADER.size:
        raise ConfigError(f"{flag} {path!r} is truncated (a {len(blob)}-byte header)")
    _, length, crc = HEADER.unpack_from(blob)
    payload = memoryview(blob)[HEADER.size:]
    if len(payload) != length:
        raise ConfigError(f"{flag} {path!r} is truncated ({len(payload)} of {length} bytes)")
    if zlib.crc32(payload) != crc:
        raise ConfigError(f"{flag} {path!r} is corrupt (its checksum does not match)")
    try:
        state = serialization.msgpack_restore(bytes(payload))
        if not isinstance(state, dict) or "format" not in state:
            raise ValueError
    except Exception:
        raise ConfigError(f"{flag} {path!r} is not a checkpoint of this version of the scripts") from None
    if state["format"] != FORMAT:
        raise ConfigError(f"{flag} {path!r} has checkpoint format {state['format']} (this version reads {FORMAT}; format 1, "
                          "from before --num-seeds, is no longer read): use the version that wrote it")
    return state


def check_algo(state: dict, algo: str, path: str, flag: str) -> None:
    if state.get("algo") != algo:
        raise ConfigError(f"{flag} {path!r} was written by {state.get('algo')}, not {algo}: use that script")


# ---- Model files (--save-model) and loading an actor for --eval-only -----------------------------------------------

def save_model(path: str, algo: str, config: dict, params: dict) -> None:
    write_atomic(path, {"format": FORMAT, "algo": algo, "kind": "model", "config": config,
                        "params": serialization.to_state_dict(params)})


def load_model(path: str, algo: str, config_keys=(), seed: int | None = None) -> tuple[dict, dict]:
    """Read a model file, a training checkpoint or a run folder's newest checkpoint of `algo`: (config, raw
    parameters with at least "actor"). Of a many-seed checkpoint, the agent of `seed` (None: the first)."""
    if os.path.isdir(path):
        path = newest_checkpoint(path, "--checkpoint")
    state = read_container(path, "--checkpoint")
    check_algo(state, algo, path, "--checkpoint")
    if state["kind"] == "train":
        config, first, count = state["args"], state["args"].get("seed", 0), state["args"].get("num_seeds", 1)
        i = 0 if seed is None or count == 1 else seed - first
        if not 0 <= i < count:
            raise ConfigError(f"--seed {seed}: {path!r} holds the agents of seeds {first} to {first + count - 1}; "
                              "pick one of them with --seed")
        actor = state["state"]["agent"]["actor"]
        raw = {name: jax.tree_util.tree_map(lambda x: np.asarray(x)[i], actor[field])
               for name, field in [("actor", "params"), ("actor_batch_stats", "batch_stats")] if actor.get(field)}
    else:
        config, raw = state["config"], state["params"]
    refuse_older(config, config_keys, path, "--checkpoint", algo)
    if not isinstance(raw, dict) or "actor" not in raw:
        raise ConfigError(f"--checkpoint {path!r} is incomplete (it holds no actor parameters)")
    return config, raw


def refuse_older(config: dict, config_keys, path: str, flag: str, algo: str) -> None:
    """A file whose arguments lack one of `config_keys` predates that setting: say so, rather than fail on a shape."""
    missing = [k for k in config_keys if k not in config]
    if missing:
        raise ConfigError(f"{flag} {path!r} was written by an older version of {algo} (it has no "
                          f"{', '.join('--' + k.replace('_', '-') for k in missing)}), whose networks this version cannot "
                          "rebuild: retrain, or use the version that wrote it")


def restore_tree(template, raw, path: str, flag: str = "--checkpoint"):
    """Restore `raw` into `template`'s structure; a mismatch of names, shapes or dtypes is a ConfigError."""
    try:
        tree = serialization.from_state_dict(template, raw)
        leaves, want = jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(template)
        dtype = lambda x: np.asarray(x).dtype
        ok = len(leaves) == len(want) and all(np.shape(a) == np.shape(b) and dtype(a) == dtype(b)
                                              for a, b in zip(leaves, want))
    except Exception:
        ok = False
    if not ok:
        raise ConfigError(f"{flag} {path!r} does not fit this network (other sizes or another env's observation/action size)")
    return tree


# ---- Training checkpoints ------------------------------------------------------------------------------------------

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"step_(\d+)\.ckpt$")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    paths = glob.glob(os.path.join(run_dir, CHECKPOINT_DIR, "step_*.ckpt"))
    return sorted((int(m.group(1)), path) for path in paths if (m := _NAME.search(path)))


def save_checkpoint(run_dir: str, step: int, payload: dict, keep: int) -> str:
    """Write the checkpoint of `step`, then delete all but the newest `keep`."""
    os.makedirs(os.path.join(run_dir, CHECKPOINT_DIR), exist_ok=True)
    path = os.path.join(run_dir, CHECKPOINT_DIR, f"step_{step:010d}.ckpt")
    write_atomic(path, payload)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        os.unlink(old)
    return path


def newest_checkpoint(run_dir: str, flag: str) -> str:
    found = list_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"{flag} {run_dir!r} is a folder without checkpoints (looked for {CHECKPOINT_DIR}/step_*.ckpt)")
    return found[-1][1]


def load_training_checkpoint(path: str, algo: str) -> tuple[str, dict]:
    """Resolve --resume PATH (a checkpoint or a run folder) and read it. In a folder the newest readable one wins
    (a damaged newer one is renamed *.corrupt, with a warning). A file must be the newest of its run: resuming an
    older one would overwrite the later checkpoints and logs."""
    run_dir = None
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            newest_checkpoint(path, "--resume")  # raises the "no checkpoints" error
        for _, candidate in reversed(found):
            try:
                state = read_container(candidate, "--resume")
                break
            except ConfigError as e:
                print(f"warning: {e}; renamed to {os.path.basename(candidate)}.corrupt, trying the one before")
                os.replace(candidate, candidate + ".corrupt")
        else:
            raise ConfigError(f"--resume {path!r}: none of its {len(found)} checkpoint(s) is readable")
        path = candidate
    elif os.path.isfile(path):
        state = read_container(path, "--resume")
        run_dir = run_folder(os.path.dirname(path))
    else:
        raise ConfigError(f"--resume {path!r} is neither a checkpoint file nor a run folder")
    check_algo(state, algo, path, "--resume")
    if state.get("kind") != "train":
        raise ConfigError(f"--resume {path!r} is a model file (--save-model), which cannot resume training; "
                          "resume from a checkpoint written by --checkpoint-every")
    newer = [p for step, p in list_checkpoints(run_dir) if step > state["step"]] if run_dir else []
    if newer:
        raise ConfigError(f"--resume {path!r} is older than its run's newest checkpoint {newer[-1]!r}; resuming it "
                          "would overwrite later checkpoints: resume the newest, or copy this one elsewhere to branch")
    return path, state


def run_folder(folder: str) -> str | None:
    """The run folder whose checkpoints/ `folder` is (its parent); None where `folder` is no checkpoints/ folder."""
    folder = os.path.abspath(folder)
    return os.path.dirname(folder) if os.path.basename(folder) == CHECKPOINT_DIR else None


def adopt_saved_args(args, saved: dict, defaults, names, flag: str, may_change=()) -> None:
    """Take `names` from a checkpoint's arguments. Of `may_change`, a value given now wins; any other given
    value that contradicts the saved one is refused, neither ignored nor applied silently."""
    option = lambda name: "--" + name.replace("_", "-")
    for name in names:
        if name not in saved:
            continue
        given = getattr(args, name)
        if given != getattr(defaults, name):
            if name in may_change:
                continue
            if given != saved[name]:
                anew = ", ".join(map(option, sorted(may_change)))
                keeps = f": {flag} keeps the arguments it was written with (except {anew})" if may_change else ""
                raise ConfigError(f"{option(name)} {given} contradicts {flag}'s {saved[name]}{keeps}")
        setattr(args, name, saved[name])


# A resumed run keeps the checkpoint's arguments; these may be given anew. The display and where the
# run comes from are never taken from the checkpoint.
MAY_CHANGE_ON_RESUME = ("total_timesteps", "checkpoint_every", "keep_checkpoints", "checkpoint_buffer", "debug_nans",
                        "capture_video", "track", "wandb_project_name", "wandb_entity")
NOT_RESUMED = ("progress", "resume", "eval_only", "checkpoint")


def read_resume(args, algo: str, defaults, renamed: dict | None = None, before: dict | None = None) -> tuple[str, dict]:
    """Read --resume and adopt the run's arguments into `args` (a flag that contradicts them is refused); `renamed`
    maps an argument's name in older checkpoints to its name now, `before` gives arguments they lack a value."""
    path, ckpt = load_training_checkpoint(args.resume, algo)
    ckpt["args"] = {**(before or {}), **{(renamed or {}).get(k, k): v for k, v in ckpt["args"].items()}}
    names = [f.name for f in fields(args) if f.name not in NOT_RESUMED]
    adopt_saved_args(args, ckpt["args"], defaults, names, "--resume", MAY_CHANGE_ON_RESUME)
    return path, ckpt


def prepare_run_dir(run_dir: str, resumed: bool) -> None:
    """Create the run folder (a new run must not reuse one) and prove that it is writable, before any work."""
    try:
        os.makedirs(run_dir, exist_ok=resumed)
        os.makedirs(os.path.join(run_dir, CHECKPOINT_DIR), exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=os.path.join(run_dir, CHECKPOINT_DIR), prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"cannot write the run folder {run_dir!r}: {e.strerror}") from None


def training_checkpoint(algo: str, args, step: int, state, buf, envs, obs, meta: dict) -> dict:
    """A training checkpoint: `state` (every array the run carries: agent, optimisers, keys) and `buf` (the
    replay buffer or None), seed-stacked; `envs`, the run's SeedEnvs. The buffer is packed seed by seed."""
    host_buf = None if buf is None else jax.device_get(buf)
    return {"format": FORMAT, "algo": algo, "kind": "train", "step": step, "args": asdict(args),
            "state": serialization.to_state_dict(jax.device_get(state)),
            "buffer": None if buf is None else [pack_buffer(per_seed(host_buf, i)) for i in range(len(envs))],
            "env": envs.get_state(), "obs": np.asarray(obs),
            "rng": {"numpy": rng_state(np.random.mtrand._rand), "python": list(random.getstate()[1]),
                    "python_gauss": random.getstate()[2]}, "meta": meta}


def restore_training(path: str, ckpt: dict, state_template, buf_template, envs):
    """Inverse of `training_checkpoint` on freshly built (seed-stacked) templates; returns (state, buffer, obs)."""
    state = restore_tree(state_template, ckpt["state"], path, "--resume")
    if ckpt["buffer"] is None:
        buf = buf_template
    elif len(ckpt["buffer"]) != len(envs):
        raise ConfigError(f"--resume {path!r}: its replay buffer does not fit this run (another number of seeds)")
    else:
        template = per_seed(buf_template, 0)
        buf = stack_seeds([unpack_buffer(template, packed, path) for packed in ckpt["buffer"]])
    try:
        obs = envs.set_state(ckpt["env"])
    except Exception as e:
        raise ConfigError(f"--resume {path!r}: the environment cannot be replayed to its saved state ({e})") from None
    if not np.array_equal(obs, ckpt["obs"]):
        raise ConfigError(f"--resume {path!r}: the environment replays to another state than the saved one "
                          "(another MuJoCo, dm_control or Gymnasium version?)")
    set_rng_state(np.random.mtrand._rand, ckpt["rng"]["numpy"])
    random.setstate((3, tuple(ckpt["rng"]["python"]), ckpt["rng"]["python_gauss"]))
    return state, buf, obs


# ---- The replay buffer in a training checkpoint; the stops on divergence and on a signal ---------------------------

_BLOCK = 1 << 26  # 64 MiB: compressed independently, on all cores (zlib releases the GIL)


def _compress(array: np.ndarray) -> dict:
    data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    blocks = [data[i:i + _BLOCK] for i in range(0, len(data), _BLOCK)]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        chunks = list(pool.map(lambda b: zlib.compress(b, 1), blocks))
    return {"dtype": array.dtype.str, "shape": list(array.shape), "chunks": chunks}


def _decompress(packed: dict) -> np.ndarray:
    data = b"".join(zlib.decompress(c) for c in packed["chunks"])
    return np.frombuffer(data, dtype=np.dtype(packed["dtype"])).reshape(packed["shape"]).copy()


def pack_buffer(buf) -> dict:
    """The filled part of a replay buffer (a NamedTuple of per-row arrays with `pos` and `size`), zlib-compressed.
    next_obs[i] is obs[i + 1] except where an episode ended, so it is stored only where it differs: that halves
    the largest part before compression."""
    size, pos = int(buf.size), int(buf.pos)
    names = [name for name in buf._fields if name not in ("pos", "size")]
    host = {name: np.asarray(getattr(buf, name))[:size] for name in names}
    capacity = buf.obs.shape[0]
    following = host["obs"][(np.arange(size) + 1) % capacity] if size == capacity else np.concatenate(
        [host["obs"][1:], np.zeros_like(host["obs"][:1])])
    same = np.all(host["next_obs"].view(np.uint32) == following.view(np.uint32), axis=1)
    if size:
        same[(pos - 1) % capacity] = False  # the newest transition's successor is not in the buffer yet
    packed = {name: _compress(host[name]) for name in names if name != "next_obs"}
    packed["next_obs_same"] = _compress(np.packbits(same))
    packed["next_obs_rest"] = _compress(host["next_obs"][~same])
    return {"size": size, "pos": pos, "fields": packed}


def unpack_buffer(template, packed: dict, path: str):
    size, pos, f = packed["size"], packed["pos"], packed["fields"]
    names = [name for name in template._fields if name not in ("pos", "size")]
    capacity = template.obs.shape[0]
    bad = ConfigError(f"--resume {path!r}: its replay buffer does not fit this run (another size or env)")
    if not 0 <= pos <= size <= capacity:
        raise bad
    try:
        host = {name: _decompress(f[name]) for name in names if name != "next_obs"}
        same = np.unpackbits(_decompress(f["next_obs_same"]))[:size].astype(bool)
        host["next_obs"] = host["obs"][(np.arange(size) + 1) % max(size, 1)]
        host["next_obs"][~same] = _decompress(f["next_obs_rest"])
        out = {}
        for name in names:
            full = np.zeros(getattr(template, name).shape, np.float32)
            full[:size] = host[name]
            out[name] = jnp.asarray(full)
    except Exception:
        raise bad from None
    return type(template)(**out, pos=jnp.asarray(pos, jnp.int32), size=jnp.asarray(size, jnp.int32))


def first_nonfinite(tree, prefix: str = "", seeds=None) -> str | None:
    """The path of the first leaf of `tree` holding a NaN or an infinity, or None (one device sync); with
    `seeds` (seed-stacked leaves), naming the seed too."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    arrays = [(p, x) for p, x in leaves if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    if not arrays:
        return None
    finite = lambda x: jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) if seeds is not None else jnp.all(jnp.isfinite(x))
    flags = np.asarray(jnp.stack([finite(x) for _, x in arrays]))  # (leaves,) or (leaves, seeds)
    bad = np.argwhere(~flags)
    if not bad.size:
        return None
    name = prefix + jax.tree_util.keystr(arrays[bad[0][0]][0])
    return name if seeds is None else f"{name} of seed {seeds[bad[0][1]]}"


class Diverged(RuntimeError):
    """A loss or a parameter became NaN or infinite: the scripts print it as one line and exit 1."""

    def __init__(self, what: str, step: int, last_checkpoint: str | None):
        hint = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                else "no checkpoint was written before it (see --checkpoint-every)")
        super().__init__(f"{what} became NaN or infinite at step {step}: the run diverged and was stopped; {hint}")


def check_metrics(info: dict, step: int, last_checkpoint: str | None, seeds=None) -> None:
    """Raise Diverged if `info["finite"]` (flags in sorted-name order; with `seeds`, a row per seed) has a False."""
    finite = np.asarray(info["finite"])
    if not finite.all():
        names = sorted(k for k in info if k != "finite")
        row = 0
        if seeds is not None:
            row = int(np.flatnonzero(~finite.all(axis=1))[0])
            finite = finite[row]
        what = ", ".join(f"losses/{names[i]}" for i in np.flatnonzero(~finite))
        raise Diverged(what if seeds is None else f"{what} of seed {seeds[row]}", step, last_checkpoint)


def finite_flags(metrics: dict):
    """Inside a jitted update: one flag per metric (sorted by name, as jit returns dicts), for check_metrics."""
    return jnp.stack([jnp.all(jnp.isfinite(metrics[k])) for k in sorted(metrics)])


class StopOnSignal:
    """While active, SIGINT and SIGTERM only set `self.signal`: the loop finishes its step, writes a checkpoint
    and exits. A second Ctrl-C interrupts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signal, self._previous = None, {}

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
