"""Saving trained parameters with flax's msgpack serialization, and loading them back safely."""

from __future__ import annotations

import os
import tempfile

import jax
from flax import serialization

from common.env import ConfigError


def save_params(path: str, algo: str, config: dict, params: dict) -> None:
    """Write {"algo", "config", "params"} atomically (temp file + rename): a crash mid-write
    leaves any earlier file at `path` intact."""
    blob = serialization.msgpack_serialize({"algo": algo, "config": config, "params": serialization.to_state_dict(params)})
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".msgpack")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path: str, algo: str, config_keys=()) -> tuple[dict, dict]:
    """Read a file written by `save_params` for `algo`; return (config, raw parameter dict)."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read --checkpoint {path!r}: {e.strerror}") from None
    try:
        state = serialization.msgpack_restore(blob)
        found, config, raw = state["algo"], state["config"], state["params"]
        missing = [k for k in config_keys if k not in config]
    except Exception:
        raise ConfigError(f"--checkpoint {path!r} is corrupt or not a model file saved by these scripts") from None
    if found != algo:
        raise ConfigError(f"--checkpoint {path!r} holds a {found} model, not a {algo} one")
    if missing or not isinstance(raw, dict):
        raise ConfigError(f"--checkpoint {path!r} is incomplete (missing {', '.join(missing) or 'parameters'})")
    return config, raw


def restore_params(template, raw, path: str):
    """Restore `raw` into the structure of `template`; any mismatch of names or shapes is a ConfigError."""
    try:
        params = serialization.from_state_dict(template, raw)
    except Exception:
        params = None
    if params is None or any(
        getattr(a, "shape", None) != getattr(b, "shape", None)
        for a, b in zip(jax.tree_util.tree_leaves(template), jax.tree_util.tree_leaves(params))
    ):
        raise ConfigError(f"--checkpoint {path!r} does not fit this network (other sizes or another env)")
    return params
