"""Layers Flax does not have, shared by the SAC Flow scripts (as sbx keeps CrossQ's in common/jax_layers.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchRenorm(nn.Module):
    """Batch renormalisation (Ioffe, 2017); Flax has none.

    Training mode normalises with the batch statistics, corrected toward the running ones by
    r = sigma_B / sigma_run (clipped to [1/r_max, r_max]) and d = (mu_B - mu_run) / sigma_run
    (clipped to [-d_max, d_max]), both without gradient: x_hat = (x - mu_B) / sigma_B * r + d.
    For the first `warmup` training-mode calls r = 1 and d = 0 (plain batch norm), as the running
    statistics are poor early on; each layer counts its own calls, as the authors' layers do (a
    critic layer is called once per update, an actor layer once per flow step of each actor update).
    Evaluation mode uses the running statistics. Variances are the biased batch ones.
    """

    train: bool
    momentum: float = 0.99
    epsilon: float = 1e-3
    r_max: float = 3.0
    d_max: float = 5.0
    warmup: int = 100_000

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        calls = self.variable("batch_stats", "calls", lambda: jnp.zeros((), jnp.int32))
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        if not self.train:
            return (x - ra_mean.value) / jnp.sqrt(ra_var.value + self.epsilon) * scale + bias
        axes = tuple(range(x.ndim - 1))
        mean, var = jnp.mean(x, axes), jnp.var(x, axes)
        std = jnp.sqrt(var + self.epsilon)
        ra_std = jnp.sqrt(ra_var.value + self.epsilon)
        renorm = calls.value >= self.warmup
        r = jnp.where(renorm, jax.lax.stop_gradient(jnp.clip(std / ra_std, 1.0 / self.r_max, self.r_max)), 1.0)
        d = jnp.where(renorm, jax.lax.stop_gradient(jnp.clip((mean - ra_mean.value) / ra_std, -self.d_max, self.d_max)), 0.0)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
            ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(var)
            calls.value = calls.value + 1
        return ((x - mean) / std * r + d) * scale + bias
