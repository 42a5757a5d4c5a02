"""Layers Flax does not have, shared by the SAC Flow scripts (as sbx keeps CrossQ's in common/jax_layers.py)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def renorm_train(x, scale, bias, ra_mean, ra_var, renorm, epsilon: float, r_max: float, d_max: float):
    """Batch renormalisation in training mode over the batch axes (all but the last); returns (y, mu_B, var_B).

    y = ((x - mu_B) / sigma_B * r + d) * scale + bias, sigma_B = sqrt(var_B + epsilon), with
    r = clip(sigma_B / sigma_run, 1/r_max, r_max) and d = clip((mu_B - mu_run) / sigma_run, -d_max, d_max)
    held constant in the gradient (r = 1, d = 0 while `renorm` is False). The gradient is written out
    (`_renorm_train_bwd`): two reductions over x instead of autodiff's chain through mean, var and sqrt (about
    five per layer; docs/performance.md). Both passes fold the per-feature factors first (gain = scale r / sigma_B):
    an element costs a subtraction and a multiply-add, no division."""
    return _renorm_train_fwd(x, scale, bias, ra_mean, ra_var, renorm, epsilon, r_max, d_max)[0]


def _renorm_train_fwd(x, scale, bias, ra_mean, ra_var, renorm, epsilon, r_max, d_max):
    axes = tuple(range(x.ndim - 1))
    mean, var = jnp.mean(x, axes), jnp.var(x, axes)
    std, ra_std = jnp.sqrt(var + epsilon), jnp.sqrt(ra_var + epsilon)
    r = jnp.where(renorm, jnp.clip(std / ra_std, 1.0 / r_max, r_max), 1.0)
    d = jnp.where(renorm, jnp.clip((mean - ra_mean) / ra_std, -d_max, d_max), 0.0)
    gain = scale * r / std  # ((x - mu_B) / sigma_B * r + d) * scale + bias, its factors folded per feature
    y = (x - mean) * gain + (scale * d + bias)
    return (y, mean, var), (x, mean, std, r, d, scale)


def _renorm_train_bwd(epsilon, r_max, d_max, res, cotangents):
    """The batch-norm gradient through the batch statistics, x_hat = (x - mu_B) / sigma_B, n rows:
    dx = scale r / sigma_B (dy - mean(dy) - x_hat mean(dy x_hat)), plus the direct terms of the
    returned mu_B and var_B (zero when, as here, they only feed the running statistics);
    d scale = sum(dy (r x_hat + d)), d bias = sum(dy); none to the running statistics."""
    x, mean, std, r, d, scale = res
    dy, d_mean, d_var = cotangents
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    inv_std = 1.0 / std
    x_hat = (x - mean) * inv_std
    sum_dy, sum_dy_x_hat = jnp.sum(dy, axes), jnp.sum(dy * x_hat, axes)
    # The dx above with its factors folded per feature: gain dy + (x - mu_B) c_x + c_0.
    gain = scale * r * inv_std
    c_x = (2.0 * d_var * std - gain * sum_dy_x_hat) * inv_std / n
    dx = gain * dy + (x - mean) * c_x + (d_mean - gain * sum_dy) / n
    return dx, r * sum_dy_x_hat + d * sum_dy, sum_dy, jnp.zeros_like(mean), jnp.zeros_like(mean), None


renorm_train.defvjp(_renorm_train_fwd, _renorm_train_bwd)


class BatchRenorm(nn.Module):
    """Batch renormalisation (Ioffe, 2017); Flax has none. Training mode: `renorm_train`, the batch statistics
    corrected toward the running ones. For the first `warmup` training-mode calls r = 1 and d = 0 (plain batch
    norm: the running statistics are poor early on); each layer counts its own calls, as the authors' layers do (a
    critic layer once per update, an actor layer once per flow step of each actor update). Evaluation mode: the
    running statistics. Variances are the biased batch ones."""

    train: bool
    momentum: float = 0.99
    epsilon: float = 1e-3
    r_max: float = 3.0
    d_max: float = 5.0
    warmup: int = 100_000
    affine: bool = True
    """False: return (x_hat, scale, bias), x normalised without its scale and bias, for the next layer to
    fold them into its kernel (NormedDense); the same parameters and statistics."""

    @nn.compact
    def __call__(self, x, *more):
        """Normalise x; given more inputs, normalise their concatenation [x, *more] and return the parts
        normalised, each by its own slice of the statistics in evaluation mode: an input that is the same
        at every call (the observation at every flow step) then gets the same computation each time,
        which XLA merges into one."""
        parts = (x, *more)
        x = jnp.concatenate(parts, axis=-1) if more else x
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        calls = self.variable("batch_stats", "calls", lambda: jnp.zeros((), jnp.int32))
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        # Without affine, the layer's own output leaves scale and bias out (1 and 0 here), and returns them.
        own_scale, own_bias = (scale, bias) if self.affine else (jnp.ones_like(scale), jnp.zeros_like(bias))
        if not self.train:
            gain = own_scale / jnp.sqrt(ra_var.value + self.epsilon)  # per feature: no division per element
            y = split_features(parts, lambda p, f: (p - ra_mean.value[f]) * gain[f] + own_bias[f])
        else:
            y, mean, var = renorm_train(x, own_scale, own_bias, ra_mean.value, ra_var.value, calls.value >= self.warmup,
                                        self.epsilon, self.r_max, self.d_max)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
                ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(var)
                calls.value = calls.value + 1
            y = split_features(parts, lambda p, f: y[..., f])
        return y if self.affine else (y, scale, bias)


class NormedDense(nn.Module):
    """nn.Dense (the same kernel, bias and initialisation) on the output of BatchRenorm(affine=False), with
    that layer's scale and bias folded into the kernel: (x_hat scale + bias) W + b = x_hat (scale W) +
    (bias W + b). The same function; but the gradient of scale no longer goes through the input gradient
    d x_hat = dh W^T, a product as large as the layer's own (CrossQ's input layer: 1024 x 1024 x 393 per
    critic on Humanoid, at a poor rate for its 393 output columns). Autodiff now gets it from the kernel's
    gradient, which it computes anyway: d scale = sum_j W * (x_hat^T dh). `x_hat` may be a tuple of parts of
    the features (BatchRenorm given several inputs, in evaluation mode), each with its own product, so that a
    gradient w.r.t. one part (the action, in the actor loss) does not compute the others'."""

    features: int

    @nn.compact
    def __call__(self, x_hat, scale, bias):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (scale.shape[-1], self.features))
        out = bias @ kernel + self.param("bias", nn.initializers.zeros, (self.features,))
        folded, start = scale[:, None] * kernel, 0
        for part in x_hat if isinstance(x_hat, tuple) else (x_hat,):
            out = out + part @ folded[start:start + part.shape[-1]]
            start += part.shape[-1]
        return out


def split_features(parts, fn):
    """fn(part, its slice of the concatenated features) for each part: one array for one part, else a tuple."""
    out, start = [], 0
    for p in parts:
        out.append(fn(p, slice(start, start + p.shape[-1])))
        start += p.shape[-1]
    return out[0] if len(out) == 1 else tuple(out)
