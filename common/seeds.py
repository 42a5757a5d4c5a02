"""Many seeds in one process: a leading seed axis on every array of a run, spread over the devices.

Agent i of a `--num-seeds S --seed X` run is the single run `--seed X+i`: its keys, env and buffer
are built exactly as that run's, then stacked. The jitted steps map over the axis with `jax.vmap`,
and a one-axis device mesh shards it: XLA's SPMD partitioner places each seed's work on the device
that holds it, with no communication written by hand.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from common.args import ConfigError

SEED_AXIS = "seeds"


def seed_sharding(num_seeds: int) -> tuple[NamedSharding, int]:
    """Shard the seed axis over as many devices as divide `num_seeds` evenly (all of them when S is a
    multiple of the device count); returns the sharding and the number of devices used."""
    devices = jax.devices()
    used = max(d for d in range(1, len(devices) + 1) if num_seeds % d == 0)
    mesh = Mesh(np.array(devices[:used]), (SEED_AXIS,))
    return NamedSharding(mesh, PartitionSpec(SEED_AXIS)), used


def check_buffer_memory(num_seeds: int, buffer_size: int, obs_dim: int, act_dim: int, devices_used: int) -> None:
    """Refuse, in one line, replay buffers that cannot fit: on an accelerator each device holds its share
    of the seeds' buffers; on CPU all of them share the host's memory."""
    per_seed = buffer_size * (2 * obs_dim + act_dim + 2) * 4  # float32 obs, next_obs, action, reward, terminated
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit:
        need, have, where = per_seed * -(-num_seeds // devices_used), limit, "each device's"
    else:
        need, have, where = per_seed * num_seeds, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the host's"
    if need > have:
        raise ConfigError(f"--num-seeds {num_seeds} x --buffer-size {buffer_size}: the replay buffers need {need / 2**30:.1f} GiB, "
                          f"more than {where} {have / 2**30:.1f} GiB; use fewer seeds, more devices or a smaller --buffer-size")


def seed_map(fn, num_seeds: int, in_axes=0):
    """`jax.vmap(fn)` over the seed axis. With one seed the axis is dropped and restored around a plain
    call instead: the program is then exactly the single-seed one (a vmap of size 1 costs XLA:CPU up to
    a third of these updates' speed, in layout copies around batched matmuls)."""
    if num_seeds > 1:
        return jax.vmap(fn, in_axes=in_axes)
    axes = in_axes if isinstance(in_axes, (tuple, list)) else None

    def single(*args):
        squeezed = [a if (axes is not None and axes[i] is None) else per_seed(a, 0) for i, a in enumerate(args)]
        return jax.tree_util.tree_map(lambda x: x[None], fn(*squeezed))

    return single


def per_seed(tree, i: int):
    """Seed i's slice of a seed-stacked pytree."""
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def stack_seeds(trees: list):
    """The inverse of `per_seed`: stack S pytrees of the same structure along a new leading axis."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jax.numpy.stack(xs), *trees)
