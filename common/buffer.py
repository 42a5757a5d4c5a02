"""A replay buffer that lives on the accelerator.

It is a pytree of fixed-size arrays with pure `add` and `sample` functions, so a script can insert
the newest transition and draw a batch inside its jitted update: no per-step host copy of a batch.
Transitions store `next_obs` as the environment returned it (before any reset) and `terminated`
only, so time-limit truncations bootstrap and true terminations do not.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ReplayBuffer(NamedTuple):
    obs: jax.Array  # (capacity, obs_dim)
    actions: jax.Array  # (capacity, act_dim), in [-1, 1]
    rewards: jax.Array  # (capacity,)
    next_obs: jax.Array  # (capacity, obs_dim)
    terminated: jax.Array  # (capacity,), 1.0 where the episode truly ended
    pos: jax.Array  # int32 scalar: where the next transition goes
    size: jax.Array  # int32 scalar: how many slots hold data


class Batch(NamedTuple):
    obs: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_obs: jax.Array
    terminated: jax.Array


def buffer_init(capacity: int, obs_dim: int, act_dim: int) -> ReplayBuffer:
    rows = lambda *shape: jnp.zeros((capacity, *shape), jnp.float32)
    return ReplayBuffer(obs=rows(obs_dim), actions=rows(act_dim), rewards=rows(), next_obs=rows(obs_dim),
                        terminated=rows(), pos=jnp.zeros((), jnp.int32), size=jnp.zeros((), jnp.int32))


def buffer_add(buf: ReplayBuffer, obs, action, reward, next_obs, terminated) -> ReplayBuffer:
    """Write one transition at `pos`, overwriting the oldest once full."""
    capacity = buf.obs.shape[0]
    i = buf.pos
    return ReplayBuffer(
        obs=buf.obs.at[i].set(obs),
        actions=buf.actions.at[i].set(action),
        rewards=buf.rewards.at[i].set(reward),
        next_obs=buf.next_obs.at[i].set(next_obs),
        terminated=buf.terminated.at[i].set(terminated),
        pos=(i + 1) % capacity,
        size=jnp.minimum(buf.size + 1, capacity),
    )


def buffer_sample(buf: ReplayBuffer, key, batch_size: int) -> Batch:
    """Draw `batch_size` transitions uniformly from the filled slots (with replacement)."""
    # The first of two keys: the stream the scripts have always drawn their indices from, so a seed's run is the same.
    idx = jax.random.randint(jax.random.split(key)[0], (batch_size,), 0, buf.size)
    return buffer_gather(buf, idx)


def buffer_gather(buf: ReplayBuffer, idx) -> Batch:
    """The transitions at the slots `idx`."""
    return Batch(buf.obs[idx], buf.actions[idx], buf.rewards[idx], buf.next_obs[idx], buf.terminated[idx])
