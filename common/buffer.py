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
    f32 = jnp.float32
    return ReplayBuffer(
        obs=jnp.zeros((capacity, obs_dim), f32),
        actions=jnp.zeros((capacity, act_dim), f32),
        rewards=jnp.zeros((capacity,), f32),
        next_obs=jnp.zeros((capacity, obs_dim), f32),
        terminated=jnp.zeros((capacity,), f32),
        pos=jnp.zeros((), jnp.int32),
        size=jnp.zeros((), jnp.int32),
    )


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


# ---------------------------------------------------------------------------------------------
# Action chunks (offline-to-online): a buffer that remembers where trajectories end
# ---------------------------------------------------------------------------------------------


class SequenceBuffer(NamedTuple):
    """Transitions in the order they happened, with `ends` marking the last transition of each
    trajectory (episode end, time limit or a dataset's trajectory cut), so that H consecutive rows
    can be read as one action chunk. It never wraps: the capacity holds the dataset and every
    online step."""

    obs: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_obs: jax.Array
    terminated: jax.Array
    ends: jax.Array
    size: jax.Array


class ChunkBatch(NamedTuple):
    obs: jax.Array  # (B, obs_dim): s_t
    actions: jax.Array  # (B, H, act_dim): a_t .. a_{t+H-1}
    valid: jax.Array  # (B, H): 1 where the action still belongs to s_t's trajectory
    returns: jax.Array  # (B,): sum_k gamma^k r_{t+k} over the valid steps
    discount: jax.Array  # (B,): gamma^H, or 0 when the chunk's trajectory terminated
    next_obs: jax.Array  # (B, obs_dim): s_{t+H}
    critic_valid: jax.Array  # (B,): 0 when the trajectory was cut (not terminated) before the chunk's last step


def sequence_buffer(data: dict, capacity: int) -> SequenceBuffer:
    """A buffer of `capacity` rows holding the dataset `data` (numpy arrays of the FIELDS) first."""
    n = len(data["obs"])
    if capacity < n:
        raise ValueError(f"capacity {capacity} is below the dataset's {n} transitions")

    def padded(x):
        x = jnp.asarray(x, jnp.float32)
        return jnp.zeros((capacity,) + x.shape[1:], jnp.float32).at[:n].set(x)

    return SequenceBuffer(*(padded(data[k]) for k in ("obs", "actions", "rewards", "next_obs", "terminated", "ends")),
                          size=jnp.asarray(n, jnp.int32))


def sequence_add(buf: SequenceBuffer, obs, action, reward, next_obs, terminated, end) -> SequenceBuffer:
    i = buf.size
    return SequenceBuffer(buf.obs.at[i].set(obs), buf.actions.at[i].set(action), buf.rewards.at[i].set(reward),
                          buf.next_obs.at[i].set(next_obs), buf.terminated.at[i].set(terminated), buf.ends.at[i].set(end),
                          size=i + 1)


def sample_chunks(buf: SequenceBuffer, key, batch_size: int, horizon: int, gamma: float) -> ChunkBatch:
    """Draw `batch_size` chunks of `horizon` consecutive transitions, uniformly over their start.

    The chunk's return stops at the first termination or trajectory end; it bootstraps from s_{t+H}
    with gamma^H only if it reached its last step without terminating. A chunk whose trajectory was
    cut without terminating (a time limit, the end of a demonstration) before its last step has no
    valid target: `critic_valid` is 0 for it."""
    start = jax.random.randint(key, (batch_size,), 0, buf.size - horizon + 1)
    idx = start[:, None] + jnp.arange(horizon)
    term, stop = buf.terminated[idx], jnp.maximum(buf.terminated[idx], buf.ends[idx])
    # valid[k]: no stop among the steps before k, so step k still follows s_t.
    valid = jnp.cumprod(jnp.concatenate([jnp.ones((batch_size, 1)), 1.0 - stop[:, :-1]], axis=1), axis=1)
    returns = jnp.sum(valid * gamma ** jnp.arange(horizon) * buf.rewards[idx], axis=1)
    terminated = jnp.max(valid * term, axis=1)
    return ChunkBatch(obs=buf.obs[start], actions=buf.actions[idx], valid=valid, returns=returns,
                      discount=gamma**horizon * (1.0 - terminated), next_obs=buf.next_obs[idx[:, -1]],
                      critic_valid=jnp.maximum(valid[:, -1], terminated))
