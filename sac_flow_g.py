"""SAC Flow-G: SAC on a K-step flow policy with a GRU-gated velocity, in one JAX/Flax file.

The actor is a flow rollout x_{k+1} = x_k + dt * v(s, x_k, t_k), a = tanh(x_K). Seen as a
sequence model this is a residual RNN in k, whose gradients explode or vanish; Flow-G gates the
velocity like a GRU update, v = z * (h - x_k), so each step interpolates between keeping x_k and
moving to a candidate h. Gaussian noise on every step (the noise-augmented rollout) makes the path
density tractable, which gives SAC its entropy term -log pi.

The critic setup is the authors' (built on CrossQ): batch-renormalised critics, no target network,
(s, a) and (s', a') in one joint forward pass; --target-network switches to a standard
target-network critic. --velocity mlp is the paper's "naive SAC Flow" (no gate) for ablations.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np

from common.env import ConfigError, check_env_id, check_run_flags


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the environment, numpy and JAX"""
    num_seeds: int = 1
    """train this many independent agents at once, seeded --seed, --seed + 1, ... (vmapped; sharded over all devices)"""
    env_id: str = "Hopper-v4"
    """Gymnasium MuJoCo id (e.g. Ant-v4) or dm_control task (e.g. dm_control/dog-run-v0)"""
    total_timesteps: int = 1_000_000
    """total environment steps"""
    buffer_size: int = 1_000_000
    """replay buffer capacity"""
    gamma: float = 0.99
    """discount factor"""
    batch_size: int = 512
    """batch size of every gradient step"""
    learning_starts: int = 50_000
    """env steps of uniform random actions before the first gradient step"""
    policy_lr: float = 3e-4
    """Adam learning rate of the actor"""
    q_lr: float = 1e-3
    """Adam learning rate of the critics"""
    alpha_lr: float = 1e-3
    """Adam learning rate of log alpha (the authors use the critic's)"""
    adam_b1: float = 0.5
    """Adam beta1 of all optimisers (CrossQ's 0.5)"""
    policy_delay: int = 3
    """update the actor and alpha every this many critic updates"""
    alpha: float = 0.2
    """initial entropy coefficient"""
    autotune: bool = True
    """tune log alpha toward --target-entropy (otherwise alpha stays at --alpha)"""
    target_entropy: float = 0.0
    """entropy target of the alpha update (the authors use 0 for flow policies)"""
    flow_steps: int = 4
    """rollout steps K, for training, acting and evaluation"""
    drift: Literal["plain", "marginal"] = "plain"
    """drift of the noisy rollout: plain b = v (the authors'), or marginal, which keeps the deterministic flow's final law"""
    velocity: Literal["gated", "mlp"] = "gated"
    """gated: Flow-G's v = z * (h - x); mlp: a plain MLP velocity (the paper's naive SAC Flow, for ablations)"""
    hidden_dim: int = 512
    """width of the gate, candidate (and naive MLP) hidden layers"""
    time_emb_dim: int = 32
    """size of the sinusoidal time embedding (half as many frequencies)"""
    log_std_hidden: int = 512
    """width of the two hidden layers of the log-std head"""
    log_std_min: float = -5.0
    """lower end of the tanh-mapped log sigma"""
    log_std_max: float = 2.0
    """upper end of the tanh-mapped log sigma"""
    n_critics: int = 2
    """critics in the ensemble (the target takes their minimum)"""
    critic_width: int = 1024
    """width of the critics' two hidden layers"""
    batch_norm: bool = True
    """batch renormalisation in the critics (CrossQ); without it use --target-network"""
    bn_momentum: float = 0.99
    """momentum of the running statistics of batch renormalisation"""
    bn_eps: float = 1e-3
    """epsilon of batch renormalisation"""
    r_max: float = 3.0
    """clip of the renormalisation scale r to [1/r_max, r_max]"""
    d_max: float = 5.0
    """clip of the renormalisation shift d to [-d_max, d_max]"""
    renorm_warmup: int = 100_000
    """critic updates of plain batch norm before the r/d corrections switch on"""
    target_network: bool = False
    """use a Polyak-averaged target critic (standard SAC) instead of CrossQ's joint pass without one"""
    tau: float = 0.005
    """target-network rate, with --target-network"""
    eval_every: int = 10_000
    """evaluate every this many env steps"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    eval_deterministic: bool = True
    """evaluate with the noise off (x_0 = 0, no step noise); otherwise sample as when acting"""
    log_every: int = 1000
    """write losses and SPS every this many env steps"""
    save_model: bool = False
    """save the trained parameters to runs/{run_name}/{exp_name}.msgpack"""
    checkpoint_every: int = 100_000
    """write a training checkpoint to runs/{run_name}/checkpoints every this many env steps and at the end
    (0: only when stopped by Ctrl-C or SIGTERM)"""
    keep_checkpoints: int = 2
    """how many of the newest training checkpoints to keep"""
    checkpoint_buffer: bool = True
    """put the replay buffer (compressed) in checkpoints; without it a resumed run refills the buffer before updating"""
    resume: Optional[str] = None
    """continue the run of this training checkpoint, or of a run folder's newest one"""
    debug_nans: bool = False
    """turn on JAX's own NaN check (jax_debug_nans), which names the operation that made one"""
    capture_video: bool = False
    """record the first episode of each evaluation to runs/{run_name}/videos (with --eval-only: every episode)"""
    eval_only: bool = False
    """load --checkpoint, evaluate it for --eval-episodes and exit"""
    checkpoint: Optional[str] = None
    """a model file (--save-model), a training checkpoint or a run folder, for --eval-only"""
    progress: bool = True
    """show a progress bar on the terminal"""

    # Offline-to-online (the paper's second pipeline), switched on by --offline-dataset
    offline_dataset: Optional[str] = None
    """demonstrations (an OGBench .npz or a Robomimic low-dim .hdf5): pretrain on them, then fine-tune online from a
    replay buffer seeded with them; --total-timesteps then counts the online env steps"""
    dataset_obs_keys: Optional[tuple[str, ...]] = None
    """Robomimic obs keys concatenated into the observation (default: its low-dim keys, else every key of the file)"""
    offline_steps: int = 1_000_000
    """gradient steps on the dataset alone: flow matching (Eq. 3) for the actor, TD learning for the critics"""
    horizon: int = 5
    """action chunk length H: the actor emits H actions, executed open-loop; the critics score chunks by H-step returns"""
    bc_weight: float = 100.0
    """beta of Eq. 12, the weight of ||a_pi - a_data||^2 in the online actor loss (authors: 100 to 300 for OGBench
    cube tasks, 1000 to 10000 for Robomimic)"""
    noise_std: float = 0.10
    """std of the fixed Gaussian noise of every rollout step in the actor's loss (there is no log-std head)"""
    act_noise_std: float = 0.02
    """that noise when acting, evaluating and sampling the critic target's next chunk (the authors' inference noise)"""
    o2o_batch_size: int = 256
    """batch size (chunks) of the offline and online gradient steps"""
    o2o_lr: float = 3e-4
    """Adam learning rate (default betas) of the actor, the critics and alpha in the offline-to-online pipeline"""
    o2o_learning_starts: int = 5000
    """online env steps before the online gradient steps begin (the buffer already holds the dataset)"""
    o2o_critic_width: int = 512
    """width of the offline-to-online critics (GELU + LayerNorm MLPs with a Polyak target, rate --tau)"""
    o2o_critic_depth: int = 4
    """hidden layers of the offline-to-online critics"""
    flow_target: Literal["action", "atanh"] = "action"
    """x_1 of Eq. 3, matched by the pre-tanh rollout output: the data action itself (the authors' code), or its atanh,
    so that the squashed action tanh(x_K) is what imitates the data"""
    alpha_loss: Literal["authors", "sac"] = "authors"
    """temperature loss online: authors, alpha (mean log pi - target), their code's sign, which lowers alpha while
    log pi is above the target (always, with fixed noise); sac, alpha (-mean log pi - target) (Eq. 24), which then
    raises alpha without bound"""


def check_args(args: Args) -> None:
    """Refuse impossible settings with one line, before anything is built or compiled."""
    positive = ["num_seeds", "total_timesteps", "buffer_size", "batch_size", "policy_lr", "q_lr", "alpha_lr", "alpha", "flow_steps",
                "hidden_dim", "log_std_hidden", "n_critics", "critic_width", "policy_delay", "eval_every", "log_every",
                "bn_eps"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.time_emb_dim < 4 or args.time_emb_dim % 2:
        raise ConfigError(f"--time-emb-dim must be an even number >= 4, got {args.time_emb_dim}")
    for name in ["learning_starts", "eval_episodes", "renorm_warmup", "checkpoint_every"]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size > args.buffer_size:
        raise ConfigError(f"--batch-size {args.batch_size} is above --buffer-size {args.buffer_size}; it must be at most the buffer size")
    if not 0.0 <= args.gamma <= 1.0:
        raise ConfigError(f"--gamma must be in [0.0, 1.0], got {args.gamma}")
    if not 0.0 < args.tau <= 1.0:
        raise ConfigError(f"--tau must be in (0.0, 1.0], got {args.tau}")
    for name in ["adam_b1", "bn_momentum"]:
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0.0, 1.0), got {getattr(args, name)}")
    if args.r_max < 1.0 or args.d_max < 0.0:
        raise ConfigError(f"--r-max must be >= 1 and --d-max >= 0, got {args.r_max} and {args.d_max}")
    if not args.log_std_min < args.log_std_max:
        raise ConfigError(f"--log-std-min {args.log_std_min} must be below --log-std-max {args.log_std_max}")
    if args.keep_checkpoints < 1:
        raise ConfigError(f"--keep-checkpoints must be at least 1, got {args.keep_checkpoints}")
    if args.offline_dataset is not None:
        check_offline_args(args)
    check_run_flags(args)
    check_env_id(args.env_id)


def check_offline_args(args: Args) -> None:
    for flag, value in [("--num-seeds", args.num_seeds != 1), ("--resume", args.resume), ("--eval-only", args.eval_only),
                        ("--save-model", args.save_model)]:
        if value:
            raise ConfigError(f"{flag} is not supported with --offline-dataset (the offline-to-online pipeline runs one "
                              "seed, without checkpoints or saved models)")
    for name in ["horizon", "noise_std", "act_noise_std", "o2o_batch_size", "o2o_lr", "o2o_critic_width", "o2o_critic_depth"]:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["offline_steps", "bc_weight", "o2o_learning_starts"]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


# JAX and the env libraries load after the arguments are checked, so bad input fails fast.
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import struct  # noqa: E402
from flax.training.train_state import TrainState  # noqa: E402

from common.buffer import (ReplayBuffer, SequenceBuffer, buffer_add, buffer_init, buffer_sample, sample_chunks,  # noqa: E402
                           sequence_add, sequence_buffer)
from common.checkpoint import (Diverged, StopOnSignal, adopt_saved_args, check_metrics, finite_flags,  # noqa: E402
                               first_nonfinite, load_model, prepare_run_dir, read_resume,
                               restore_training, restore_tree, resume_run_dir, save_checkpoint, save_model,
                               training_checkpoint, video_dir)
from common.datasets import load_dataset  # noqa: E402
from common.env import SeedEnvs, env_dims, evaluate, evaluate_chunks, make_env, seed_everything  # noqa: E402
from common.seeds import check_buffer_memory, per_seed, seed_map, seed_sharding  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Critics: CrossQ's batch-renormalised MLPs, evaluated as one vmapped ensemble
# ---------------------------------------------------------------------------------------------


class BatchRenorm(nn.Module):
    """Batch renormalisation (Ioffe, 2017); Flax has none.

    Training mode normalises with the batch statistics, corrected toward the running ones by
    r = sigma_B / sigma_run (clipped to [1/r_max, r_max]) and d = (mu_B - mu_run) / sigma_run
    (clipped to [-d_max, d_max]), both without gradient: x_hat = (x - mu_B) / sigma_B * r + d.
    While `renorm` is off, r = 1 and d = 0 (plain batch norm), as the running statistics are poor
    early on. Evaluation mode uses the running statistics. Variances are the biased batch ones.
    """

    train: bool
    momentum: float = 0.99
    epsilon: float = 1e-3
    r_max: float = 3.0
    d_max: float = 5.0

    @nn.compact
    def __call__(self, x, renorm=False):
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        if self.train:
            axes = tuple(range(x.ndim - 1))
            mean, var = jnp.mean(x, axes), jnp.var(x, axes)
            std = jnp.sqrt(var + self.epsilon)
            ra_std = jnp.sqrt(ra_var.value + self.epsilon)
            r = jax.lax.stop_gradient(jnp.clip(std / ra_std, 1.0 / self.r_max, self.r_max))
            d = jax.lax.stop_gradient(jnp.clip((mean - ra_mean.value) / ra_std, -self.d_max, self.d_max))
            r, d = jnp.where(renorm, r, 1.0), jnp.where(renorm, d, 0.0)
            x_hat = (x - mean) / std * r + d
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
                ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(var)
        else:
            x_hat = (x - ra_mean.value) / jnp.sqrt(ra_var.value + self.epsilon)
        return x_hat * scale + bias


class QNetwork(nn.Module):
    """One critic, CrossQ's layout: BRN on the input, then (Dense, ReLU, BRN) twice, then Dense 1."""

    width: int
    batch_norm: bool
    train: bool
    momentum: float
    epsilon: float
    r_max: float
    d_max: float

    @nn.compact
    def __call__(self, s, a, renorm):
        def norm(x):
            if not self.batch_norm:
                return x
            return BatchRenorm(self.train, self.momentum, self.epsilon, self.r_max, self.d_max)(x, renorm)

        x = norm(jnp.concatenate([s, a], axis=-1))
        x = norm(nn.relu(nn.Dense(self.width)(x)))
        x = norm(nn.relu(nn.Dense(self.width)(x)))
        return nn.Dense(1)(x).squeeze(-1)


class CriticEnsemble(nn.Module):
    """`n_critics` independent critics as one vmapped module; returns Q of shape (n_critics, batch).

    `train` selects batch statistics (and updates the running ones) or the running statistics."""

    n_critics: int
    width: int
    batch_norm: bool
    train: bool
    momentum: float = 0.99
    epsilon: float = 1e-3
    r_max: float = 3.0
    d_max: float = 5.0

    @nn.compact
    def __call__(self, s, a, renorm=False):
        ensemble = nn.vmap(QNetwork, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True},
                           in_axes=None, out_axes=0, axis_size=self.n_critics)
        return ensemble(self.width, self.batch_norm, self.train, self.momentum, self.epsilon, self.r_max,
                        self.d_max)(s, a, jnp.asarray(renorm))


def make_critics(args: Args) -> tuple[CriticEnsemble, CriticEnsemble]:
    """The same ensemble in training mode (batch statistics) and evaluation mode (running ones)."""
    kw = dict(n_critics=args.n_critics, width=args.critic_width, batch_norm=args.batch_norm, momentum=args.bn_momentum,
              epsilon=args.bn_eps, r_max=args.r_max, d_max=args.d_max)
    return CriticEnsemble(train=True, **kw), CriticEnsemble(train=False, **kw)


# ---------------------------------------------------------------------------------------------
# Actor: Flow-G velocity v(s, x_k, t_k) and the per-step noise level sigma(s, t_k)
# ---------------------------------------------------------------------------------------------


def sinusoidal_embedding(t, dim: int):
    """[sin(t w_i), cos(t w_i)] with dim/2 frequencies w_i from 1 down to 1/10000 (geometric)."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half) / (half - 1))
    angles = t * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class TimeEmbedding(nn.Module):
    """The authors' time features: sinusoidal(dim) -> Dense 2*dim -> swish -> Dense dim."""

    dim: int

    @nn.compact
    def __call__(self, t):
        return nn.Dense(self.dim)(nn.swish(nn.Dense(2 * self.dim)(sinusoidal_embedding(t, self.dim))))


class GatedVelocity(nn.Module):
    """Flow-G (Eq. 6): z = sigmoid(g(s, x, t)), h = c(s, x, t), v = z * (h - x).

    The gate's last layer starts with zero weights and bias 5, so z = sigmoid(5) = 0.993 for every
    input: each step starts close to the plain x + dt * (h - x) update, and the gate learns where to
    hold x back, which bounds how much a step can amplify the gradient flowing through it."""

    act_dim: int
    hidden_dim: int
    time_emb_dim: int

    @nn.compact
    def __call__(self, s, x, t):
        features = jnp.concatenate([s, x, TimeEmbedding(self.time_emb_dim)(t)], axis=-1)
        gate_logit = nn.Dense(self.act_dim, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.constant(5.0),
                              name="gate_out")(nn.swish(nn.Dense(self.hidden_dim, name="gate_hidden")(features)))
        z = nn.sigmoid(gate_logit)
        self.sow("intermediates", "gate", z)
        h = nn.Dense(self.act_dim, name="candidate_out")(nn.swish(nn.Dense(self.hidden_dim, name="candidate_hidden")(features)))
        return z * (h - x)


class MLPVelocity(nn.Module):
    """The naive flow policy's velocity: a plain ReLU MLP on (s, x, time features), no gate."""

    act_dim: int
    hidden_dim: int
    time_emb_dim: int

    @nn.compact
    def __call__(self, s, x, t):
        features = jnp.concatenate([s, x, TimeEmbedding(self.time_emb_dim)(t)], axis=-1)
        h = nn.relu(nn.Dense(self.hidden_dim)(features))
        h = nn.relu(nn.Dense(self.hidden_dim)(h))
        return nn.Dense(self.act_dim)(h)


def squash_log_std(raw, log_std_min: float, log_std_max: float):
    """Map a raw head output smoothly into [log_std_min, log_std_max] (the authors' tanh map)."""
    return log_std_min + 0.5 * (log_std_max - log_std_min) * (jnp.tanh(raw) + 1.0)


class LogStdHead(nn.Module):
    """log sigma_k = f(s, t_k), tanh-mapped to [log_std_min, log_std_max].

    It sees the state and the step time but not x_k: the marginal-preserving drift assumes a
    diffusion that does not depend on x (otherwise a divergence term of sigma^2 is missing)."""

    act_dim: int
    hidden_dim: int
    log_std_min: float
    log_std_max: float

    @nn.compact
    def __call__(self, s, t):
        h = nn.relu(nn.Dense(self.hidden_dim)(jnp.concatenate([s, t], axis=-1)))
        h = nn.relu(nn.Dense(self.hidden_dim)(h))
        return squash_log_std(nn.Dense(self.act_dim)(h), self.log_std_min, self.log_std_max)


class FlowActor(nn.Module):
    """One rollout step's networks: (s, x_k, t_k) -> (v_k, log sigma_k); log sigma_k is None without the
    log-std head (offline-to-online, where the noise is fixed)."""

    act_dim: int
    velocity: str
    hidden_dim: int
    time_emb_dim: int
    log_std_hidden: int
    log_std_min: float
    log_std_max: float
    learn_std: bool = True

    @nn.compact
    def __call__(self, s, x, t):
        net = GatedVelocity if self.velocity == "gated" else MLPVelocity
        v = net(self.act_dim, self.hidden_dim, self.time_emb_dim, name="velocity")(s, x, t)
        if not self.learn_std:
            return v, None
        log_std = LogStdHead(self.act_dim, self.log_std_hidden, self.log_std_min, self.log_std_max, name="log_std")(s, t)
        return v, log_std


def make_actor(args: Args, act_dim: int, learn_std: bool = True) -> FlowActor:
    return FlowActor(act_dim, args.velocity, args.hidden_dim, args.time_emb_dim, args.log_std_hidden,
                     args.log_std_min, args.log_std_max, learn_std)


# ---------------------------------------------------------------------------------------------
# The noise-augmented rollout and its path log-density (REFERENCE section 2, paper App. A)
# ---------------------------------------------------------------------------------------------


def plain_drift(v, x, t, sigma):
    """The authors' step: b = v; the noise widens the final law beyond the deterministic flow's."""
    return v


def marginal_drift(v, x, t, sigma):
    """b = v + sigma^2 / 2 * score, with the straight-path score -(x - t v) / (1 - t) (Eq. 13-14):
    b = v (1 + sigma^2 t / (2 (1 - t))) - sigma^2 x / (2 (1 - t)). In continuous time the noisy
    rollout then ends in the deterministic flow's law. t < 1 on every step, so 1 - t > 0."""
    return v * (1.0 + sigma**2 * t / (2.0 * (1.0 - t))) - sigma**2 * x / (2.0 * (1.0 - t))


DRIFTS = {"plain": plain_drift, "marginal": marginal_drift}


def gaussian_log_prob(x, mean, std):
    """log N(x; mean, diag(std^2)), summed over the last axis, with its -log std terms."""
    z = (x - mean) / std
    return jnp.sum(-0.5 * z**2 - jnp.log(std) - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)


def tanh_log_det(x_final, scale):
    """log |da/dx_K| of a = tanh(x_K) * scale + bias, per dimension log(scale (1 - tanh^2) + 1e-6)."""
    return jnp.sum(jnp.log(scale * (1.0 - jnp.tanh(x_final) ** 2) + 1e-6), axis=-1)


def path_log_prob(xs, means, stds, scale=1.0):
    """Joint log-density of the path (x_0, ..., x_K) and the squashed action (Eq. 15):
    log N(x_0; 0, I) + sum_k log N(x_{k+1}; x_k + dt b_k, sigma_k^2 dt I) - log |da/dx_K|.
    `means[k]` = x_k + dt b_k, `stds[k]` = sigma_k sqrt(dt)."""
    log_prob = gaussian_log_prob(xs[0], 0.0, 1.0)
    for k in range(len(means)):
        log_prob = log_prob + gaussian_log_prob(xs[k + 1], means[k], stds[k])
    return log_prob - tanh_log_det(xs[-1], scale)


def flow_rollout(step_fn, s, key, act_dim: int, steps: int, drift: str = "plain", deterministic: bool = False,
                 perturb=None, scale=1.0, bias=0.0):
    """Sample a = tanh(x_K) * scale + bias by the noise-augmented rollout (Eq. 13):
    x_0 ~ N(0, I); x_{k+1} = x_k + dt b_k + sigma_k sqrt(dt) eps_k, t_k = k / K.

    `step_fn(s, x, t)` returns (v, log sigma). Deterministic: x_0 = 0 and no step noise, i.e. the
    Euler-integrated flow ODE (both drifts reduce to v at sigma = 0). `perturb` (K, ..., act_dim),
    zeros, is added to each x_k so that its gradient is d loss / d x_k, the backward pass of the
    rollout seen as an RNN. Returns the action, the path log-density (None when deterministic) and
    the path with the mean log sigma."""
    shape = s.shape[:-1] + (act_dim,)
    keys = jax.random.split(key, steps + 1)
    x = jnp.zeros(shape) if deterministic else jax.random.normal(keys[0], shape)
    dt = 1.0 / steps
    ones = jnp.ones(shape[:-1] + (1,))
    xs, means, stds, log_stds = [], [], [], []
    for k in range(steps):
        xs.append(x)
        if perturb is not None:
            # Added to the state carried into step k only, not to the density's x_k: with the noise
            # held fixed (reparameterised), the gradient is the recurrence's own d loss / d x_k,
            # without the score term -(x_k - mean) / std^2 of the previous transition.
            x = x + perturb[k]
        t = k * dt
        v, log_std = step_fn(s, x, t * ones)
        if deterministic:
            x = x + dt * v
            continue
        sigma = jnp.exp(log_std)
        mean = x + dt * DRIFTS[drift](v, x, t, sigma)
        std = sigma * jnp.sqrt(dt)
        x = mean + std * jax.random.normal(keys[k + 1], shape)
        means.append(mean)
        stds.append(std)
        log_stds.append(log_std)
    xs.append(x)
    action = jnp.tanh(x) * scale + bias
    if deterministic:
        return action, None, {"xs": xs}
    return action, path_log_prob(xs, means, stds, scale), {"xs": xs, "log_std": jnp.mean(jnp.stack(log_stds))}


# ---------------------------------------------------------------------------------------------
# Agent state and the jitted update
# ---------------------------------------------------------------------------------------------


class CriticState(TrainState):
    batch_stats: dict  # running statistics of batch renormalisation ({} without it)


@struct.dataclass
class Agent:
    actor: TrainState
    critic: CriticState
    critic_target: Optional[dict]  # {"params", "batch_stats"} with --target-network, else None
    log_alpha: TrainState
    key: jax.Array
    updates: jax.Array  # critic updates done so far
    actor_info: dict  # metrics of the latest actor/alpha update, for logging between them


ACTOR_METRICS = ("actor_loss", "alpha_loss", "entropy", "log_std", "q_pi")


def create_agent(args: Args, obs_dim: int, act_dim: int, key) -> Agent:
    actor_net = make_actor(args, act_dim)
    critic_train, _ = make_critics(args)
    k_actor, k_critic, key = jax.random.split(key, 3)
    s, a, t = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim)), jnp.zeros((1, 1))
    adam = lambda lr: optax.adam(lr, b1=args.adam_b1)
    as_array = lambda ts: ts.replace(step=jnp.zeros((), jnp.int32))  # one compiled signature from the start

    actor = as_array(TrainState.create(apply_fn=actor_net.apply, params=actor_net.init(k_actor, s, a, t),
                                       tx=adam(args.policy_lr)))
    variables = critic_train.init(k_critic, s, a)
    critic = as_array(CriticState.create(apply_fn=critic_train.apply, params=variables["params"],
                                         batch_stats=variables.get("batch_stats", {}), tx=adam(args.q_lr)))
    log_alpha = as_array(TrainState.create(apply_fn=None, params={"log_alpha": jnp.log(jnp.float32(args.alpha))},
                                           tx=adam(args.alpha_lr)))
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # own buffers: the update donates them
    target = copy({"params": critic.params, "batch_stats": critic.batch_stats}) if args.target_network else None
    info = {name: jnp.zeros((), jnp.float32) for name in ACTOR_METRICS}
    info["grad_norms"] = jnp.zeros((args.flow_steps,), jnp.float32)
    return Agent(actor=actor, critic=critic, critic_target=target, log_alpha=log_alpha, key=key,
                 updates=jnp.zeros((), jnp.int32), actor_info=info)


def make_policy(args: Args, actor_apply, act_dim: int):
    """pi(s): the K-step rollout of the actor; returns (action, log pi, path info)."""

    def policy(actor_params, s, key, deterministic: bool = False, perturb=None):
        step_fn = lambda s_, x_, t_: actor_apply(actor_params, s_, x_, t_)
        return flow_rollout(step_fn, s, key, act_dim, args.flow_steps, args.drift, deterministic, perturb)

    return policy


def make_update(args: Args, act_dim: int, sharding=None):
    """Build the jitted gradient step of every seed: sample a batch from the device buffer, update the critics;
    every `policy_delay` critic updates also the actor and log alpha. One compiled call per env
    step, the agent donated (updated in place). The buffer is only read here; the newest transition
    goes in by its own donated call just before. Inserting inside this function made XLA copy the
    whole buffer on every step (the batch gather fuses with the insert): 36 ms per step at 1e6
    transitions on CPU, against 0.1 ms for the separate insert."""
    critic_train, critic_eval = make_critics(args)
    actor_apply = make_actor(args, act_dim).apply
    policy = make_policy(args, actor_apply, act_dim)
    B, K = args.batch_size, args.flow_steps

    def update(agent: Agent, buf: ReplayBuffer, do_actor):
        key, k_batch, k_next, k_pi = jax.random.split(agent.key, 4)
        b = buffer_sample(buf, k_batch, B)
        alpha = jnp.exp(agent.log_alpha.params["log_alpha"])
        renorm = agent.updates >= args.renorm_warmup

        # Critic: y = r + gamma (1 - terminated) (min_i Q_i(s', a') - alpha log pi(a'|s')), a' ~ pi(s').
        next_a, next_log_pi, _ = policy(agent.actor.params, b.next_obs, k_next)

        def critic_loss(params):
            variables = {"params": params, "batch_stats": agent.critic.batch_stats}
            if args.target_network:
                q, new_vars = critic_train.apply(variables, b.obs, b.actions, renorm, mutable=["batch_stats"])
                q_next = critic_eval.apply(agent.critic_target, b.next_obs, next_a)
            else:
                # CrossQ: one pass over [(s, a); (s', a')] so both halves share the batch statistics.
                q_all, new_vars = critic_train.apply(variables, jnp.concatenate([b.obs, b.next_obs]),
                                                     jnp.concatenate([b.actions, next_a]), renorm, mutable=["batch_stats"])
                q, q_next = q_all[:, :B], q_all[:, B:]
            soft_next = jnp.min(q_next, axis=0) - alpha * next_log_pi
            y = jax.lax.stop_gradient(b.rewards + args.gamma * (1.0 - b.terminated) * soft_next)
            loss = 0.5 * jnp.sum(jnp.mean((q - y) ** 2, axis=1))
            return loss, (q, jnp.mean(q_next), new_vars.get("batch_stats", {}))

        (qf_loss, (q_data, next_q, batch_stats)), grads = jax.value_and_grad(critic_loss, has_aux=True)(agent.critic.params)
        critic = agent.critic.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
        critic_target = agent.critic_target
        if args.target_network:
            online = {"params": critic.params, "batch_stats": critic.batch_stats}
            critic_target = optax.incremental_update(online, critic_target, args.tau)

        def actor_step(carry):
            actor, log_alpha, _ = carry
            critic_vars = {"params": critic.params, "batch_stats": critic.batch_stats}

            # Actor: mean(alpha log pi(a|s) - min_i Q_i(s, a)), a = pi(s) reparameterised through the
            # whole rollout; the critics use running statistics (CrossQ). Differentiating w.r.t. the
            # zero `perturb` gives the gradient at every intermediate action x_k.
            def actor_loss(params, perturb):
                a, log_pi, path = policy(params, b.obs, k_pi, perturb=perturb)
                q_pi = jnp.min(critic_eval.apply(critic_vars, b.obs, a), axis=0)
                return jnp.mean(alpha * log_pi - q_pi), (log_pi, path["log_std"], jnp.mean(q_pi))

            perturb = jnp.zeros((K, B, act_dim))
            (loss, (log_pi, log_std, q_pi)), (grads, grad_x) = jax.value_and_grad(
                actor_loss, argnums=(0, 1), has_aux=True)(actor.params, perturb)
            actor = actor.apply_gradients(grads=grads)
            # Per-sample gradient norm at x_k (the loss is a batch mean, hence the factor B), averaged.
            grad_norms = jnp.mean(jnp.linalg.norm(B * grad_x, axis=-1), axis=-1)

            # Temperature: alpha (-log pi - H_target), minimised over log alpha (Eq. 24).
            entropy = -jnp.mean(log_pi)
            alpha_loss_fn = lambda p: jnp.exp(p["log_alpha"]) * (entropy - args.target_entropy)
            alpha_loss, alpha_grad = jax.value_and_grad(alpha_loss_fn)(log_alpha.params)
            if args.autotune:
                log_alpha = log_alpha.apply_gradients(grads=alpha_grad)
            info = {"actor_loss": loss, "alpha_loss": alpha_loss, "entropy": entropy, "log_std": log_std, "q_pi": q_pi,
                    "grad_norms": grad_norms}
            return actor, log_alpha, info

        carry = (agent.actor, agent.log_alpha, agent.actor_info)
        actor, log_alpha, actor_info = jax.lax.cond(do_actor, actor_step, lambda c: c, carry)

        agent = Agent(actor=actor, critic=critic, critic_target=critic_target, log_alpha=log_alpha, key=key,
                      updates=agent.updates + 1, actor_info=actor_info)
        info = {"qf_loss": qf_loss, "qf_values": jnp.mean(q_data), "next_q_values": next_q,
                "alpha": jnp.exp(log_alpha.params["log_alpha"]), **actor_info}
        return agent, {**info, "finite": finite_flags(info)}  # one flag per metric, for the divergence check

    def update_seeds(agent: Agent, buf: ReplayBuffer):
        # Every seed is at the same update, so the policy delay is decided once, outside the vmap: a
        # per-seed predicate would turn lax.cond into a select that runs the actor update every step.
        do_actor = (agent.updates[0] + 1) % args.policy_delay == 0
        return seed_map(update, args.num_seeds, in_axes=(0, 0, None))(agent, buf, do_actor)

    # --debug-nans re-runs a call that made a NaN on its inputs, so they must not be donated.
    # The outputs keep the inputs' seed sharding, so the next call finds the same signature (one compile).
    return jax.jit(update_seeds, donate_argnums=() if args.debug_nans else 0, out_shardings=sharding)


# ---------------------------------------------------------------------------------------------
# Acting, evaluation, saving, loading
# ---------------------------------------------------------------------------------------------


def make_act(args: Args, actor_apply, act_dim: int, num_seeds: int):
    """Jitted (evaluation, exploration) actions for all seeds at once: (params, obs, key) stacked over seeds."""
    policy = make_policy(args, actor_apply, act_dim)

    def act(actor_params, obs, key, deterministic: bool):
        key, sub = jax.random.split(key)
        return policy(actor_params, obs[None], sub, deterministic)[0][0], key

    act_eval = lambda p, o, k: act(p, o, k, args.eval_deterministic)
    act_explore = lambda p, o, k: act(p, o, k, False)
    return jax.jit(seed_map(act_eval, num_seeds)), jax.jit(seed_map(act_explore, num_seeds))


ALGO = "sac_flow_g"
MODEL_CONFIG = ("env_id", "flow_steps", "drift", "velocity", "hidden_dim", "time_emb_dim", "log_std_hidden",
                "log_std_min", "log_std_max")


def eval_only(args: Args) -> None:
    """Rebuild the actor that the checkpoint was trained with and evaluate it on its env."""
    config, raw = load_model(args.checkpoint, ALGO, MODEL_CONFIG, args.seed)
    adopt_saved_args(args, config, Args(), MODEL_CONFIG, "--checkpoint")
    check_env_id(args.env_id)
    env = SeedEnvs(args.env_id, [args.seed], render=args.capture_video)
    try:
        if args.capture_video:
            env.render_check()
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        actor = make_actor(args, act_dim)
        template = actor.init(jax.random.PRNGKey(0), jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim)), jnp.zeros((1, 1)))
        params = restore_tree(template, raw.get("actor"), args.checkpoint)
        act, _ = make_act(args, actor.apply, act_dim, 1)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        videos = [os.path.join(video_dir(args.checkpoint), f"eval_only_{stamp}_episode{i}.mp4")
                  for i in range(args.eval_episodes)] if args.capture_video else []
        params, key = jax.tree_util.tree_map(lambda x: x[None], (params, jax.random.PRNGKey(args.seed)))
        returns = evaluate(env, act, params, key, args.eval_episodes, [args.seed], [videos])[0]
    finally:
        env.close()
    print(f"{args.env_id}: eval return {np.mean(returns):.2f} +- {np.std(returns):.2f} over {len(returns)} episodes")
    if videos:
        print(f"videos written to {os.path.dirname(videos[0])}")


def prepare_resume(args: Args):
    """Read --resume and adopt the run's arguments, then check them as a new run's."""
    path, ckpt = read_resume(args, ALGO, Args())
    check_args(args)
    return path, ckpt


# ---------------------------------------------------------------------------------------------
# Offline-to-online (--offline-dataset): flow-matching pretraining (Eq. 3), then SAC with a BC term (Eq. 12)
# ---------------------------------------------------------------------------------------------


class ChunkQNetwork(nn.Module):
    """Q(s, a_{t:t+H}), the critic of the offline-to-online pipeline (the authors' QC-FQL layout):
    `depth` layers of Dense, GELU and LayerNorm, then Dense 1, Xavier-uniform weights."""

    width: int
    depth: int

    @nn.compact
    def __call__(self, s, chunk):
        x = jnp.concatenate([s, chunk], axis=-1)
        for _ in range(self.depth):
            x = nn.LayerNorm()(nn.gelu(nn.Dense(self.width, kernel_init=nn.initializers.xavier_uniform())(x)))
        return nn.Dense(1, kernel_init=nn.initializers.xavier_uniform())(x).squeeze(-1)


def make_chunk_critics(args: Args) -> nn.Module:
    """`n_critics` chunk critics as one vmapped module; returns Q of shape (n_critics, batch)."""
    ensemble = nn.vmap(ChunkQNetwork, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0,
                       axis_size=args.n_critics)
    return ensemble(args.o2o_critic_width, args.o2o_critic_depth)


@struct.dataclass
class ChunkAgent:
    actor: TrainState  # the velocity field over whole chunks (H * act_dim), without a log-std head
    critic: TrainState
    critic_target: dict  # Polyak average of the critics' parameters (rate --tau)
    log_alpha: TrainState
    key: jax.Array


def create_chunk_agent(args: Args, obs_dim: int, chunk_dim: int, key) -> ChunkAgent:
    actor_net, critic_net = make_actor(args, chunk_dim, learn_std=False), make_chunk_critics(args)
    k_actor, k_critic, key = jax.random.split(key, 3)
    s, a, t = jnp.zeros((1, obs_dim)), jnp.zeros((1, chunk_dim)), jnp.zeros((1, 1))
    adam = optax.adam(args.o2o_lr)
    as_array = lambda ts: ts.replace(step=jnp.zeros((), jnp.int32))  # one compiled signature from the start
    actor = as_array(TrainState.create(apply_fn=actor_net.apply, params=actor_net.init(k_actor, s, a, t), tx=adam))
    critic = as_array(TrainState.create(apply_fn=critic_net.apply, params=critic_net.init(k_critic, s, a), tx=adam))
    log_alpha = as_array(TrainState.create(apply_fn=None, params={"log_alpha": jnp.log(jnp.float32(args.alpha))}, tx=adam))
    return ChunkAgent(actor=actor, critic=critic, critic_target=jax.tree_util.tree_map(jnp.array, critic.params),
                      log_alpha=log_alpha, key=key)


def flow_matching_loss(v_pred, x0, x1, valid):
    """Eq. 3 on action chunks: ||v(s, x_t, t) - (x_1 - x_0)||^2, x_t = (1 - t) x_0 + t x_1 being where
    `v_pred` was evaluated. Shapes (B, H, act_dim); the actions of a chunk past its trajectory's end
    (valid 0) are left out of the mean, which runs over every action dimension (the authors')."""
    return jnp.mean(valid[..., None] * (v_pred - (x1 - x0)) ** 2)


def bc_loss(a_pi, a_data, valid):
    """The proximity term of Eq. 12, ||a_pi - a_data||^2, averaged like flow_matching_loss."""
    return jnp.mean(valid[..., None] * (a_pi - a_data) ** 2)


def make_chunk_policy(args: Args, actor_apply, chunk_dim: int):
    """pi(chunk | s) with fixed noise: x_{k+1} = x_k + dt b_k + noise_std eps_k (so sigma_k sqrt(dt) =
    noise_std on every step); returns (chunk in [-1, 1], path log-density)."""
    log_sqrt_dt = 0.5 * jnp.log(1.0 / args.flow_steps)

    def policy(actor_params, s, key, noise_std: float):
        def step_fn(s_, x_, t_):
            return actor_apply(actor_params, s_, x_, t_)[0], jnp.full(x_.shape, jnp.log(noise_std) - log_sqrt_dt)

        return flow_rollout(step_fn, s, key, chunk_dim, args.flow_steps, args.drift)[:2]

    return policy


def make_chunk_update(args: Args, act_dim: int):
    """The pipeline's two jitted gradient steps, each on chunks drawn from the device buffer:
    `pretrain` (offline: critics, and Eq. 3 for the actor) and `finetune` (online: critics, Eq. 12
    for the actor, and alpha). The agent is donated."""
    H, B = args.horizon, args.o2o_batch_size
    chunk_dim = H * act_dim
    actor_apply = make_actor(args, chunk_dim, learn_std=False).apply
    critic_apply = make_chunk_critics(args).apply
    policy = make_chunk_policy(args, actor_apply, chunk_dim)

    def critic_step(agent: ChunkAgent, b, key):
        # y = sum_k gamma^k r_{t+k} + gamma^H (1 - terminated) (mean_i Q'_i(s_{t+H}, a') - alpha log pi(a'|s_{t+H})),
        # a' sampled with the acting noise, as the authors do; chunks cut short by a time limit are masked out.
        alpha = jnp.exp(agent.log_alpha.params["log_alpha"])
        next_a, next_log_pi = policy(agent.actor.params, b.next_obs, key, args.act_noise_std)
        q_next = jnp.mean(critic_apply(agent.critic_target, b.next_obs, next_a), axis=0)
        y = jax.lax.stop_gradient(b.returns + b.discount * (q_next - alpha * next_log_pi))

        def critic_loss(params):
            q = critic_apply(params, b.obs, b.actions.reshape(B, chunk_dim))
            return jnp.mean(b.critic_valid * (q - y) ** 2), q

        (loss, q), grads = jax.value_and_grad(critic_loss, has_aux=True)(agent.critic.params)
        critic = agent.critic.apply_gradients(grads=grads)
        target = optax.incremental_update(critic.params, agent.critic_target, args.tau)
        return agent.replace(critic=critic, critic_target=target), {"qf_loss": loss, "qf_values": jnp.mean(q)}

    def pretrain(agent: ChunkAgent, buf: SequenceBuffer):
        key, k_batch, k_next, k_x0, k_t = jax.random.split(agent.key, 5)
        b = sample_chunks(buf, k_batch, B, H, args.gamma)
        agent, info = critic_step(agent, b, k_next)
        x1 = b.actions if args.flow_target == "action" else jnp.arctanh(jnp.clip(b.actions, -0.999, 0.999))
        x0 = jax.random.normal(k_x0, x1.shape)
        t = jax.random.uniform(k_t, (B, 1))
        x_t = (1.0 - t) * x0.reshape(B, chunk_dim) + t * x1.reshape(B, chunk_dim)

        def actor_loss(params):
            v = actor_apply(params, b.obs, x_t, t)[0]
            return flow_matching_loss(v.reshape(x1.shape), x0, x1, b.valid)

        loss, grads = jax.value_and_grad(actor_loss)(agent.actor.params)
        agent = agent.replace(actor=agent.actor.apply_gradients(grads=grads), key=key)
        info = {**info, "flow_loss": loss}
        return agent, {**info, "finite": finite_flags(info)}

    def finetune(agent: ChunkAgent, buf: SequenceBuffer):
        key, k_batch, k_next, k_pi = jax.random.split(agent.key, 4)
        b = sample_chunks(buf, k_batch, B, H, args.gamma)
        agent, info = critic_step(agent, b, k_next)
        alpha = jnp.exp(agent.log_alpha.params["log_alpha"])

        # Eq. 12: beta ||a_pi - a_data||^2 + mean(alpha log pi(a|s) - mean_i Q_i(s, a)), a = pi(s)
        # reparameterised through the noisy rollout.
        def actor_loss(params):
            a, log_pi = policy(params, b.obs, k_pi, args.noise_std)
            q_pi = jnp.mean(critic_apply(agent.critic.params, b.obs, a), axis=0)
            bc = bc_loss(a.reshape(b.actions.shape), b.actions, b.valid)
            return args.bc_weight * bc + jnp.mean(alpha * log_pi - q_pi), (bc, jnp.mean(log_pi), jnp.mean(q_pi))

        (loss, (bc, mean_log_pi, q_pi)), grads = jax.value_and_grad(actor_loss, has_aux=True)(agent.actor.params)
        actor = agent.actor.apply_gradients(grads=grads)
        sign = 1.0 if args.alpha_loss == "authors" else -1.0
        alpha_loss_fn = lambda p: jnp.exp(p["log_alpha"]) * (sign * mean_log_pi - args.target_entropy)
        alpha_loss, alpha_grad = jax.value_and_grad(alpha_loss_fn)(agent.log_alpha.params)
        log_alpha = agent.log_alpha.apply_gradients(grads=alpha_grad) if args.autotune else agent.log_alpha
        agent = agent.replace(actor=actor, log_alpha=log_alpha, key=key)
        info = {**info, "actor_loss": loss, "bc_loss": bc, "q_pi": q_pi, "entropy": -mean_log_pi, "alpha_loss": alpha_loss,
                "alpha": jnp.exp(log_alpha.params["log_alpha"])}
        return agent, {**info, "finite": finite_flags(info)}

    donate = () if args.debug_nans else 0
    return jax.jit(pretrain, donate_argnums=donate), jax.jit(finetune, donate_argnums=donate)


def make_chunk_act(args: Args, actor_apply, act_dim: int):
    """Jitted (params, obs, key) -> (the next H actions, key), sampled with --act-noise-std."""
    policy = make_chunk_policy(args, actor_apply, args.horizon * act_dim)

    def act(actor_params, obs, key):
        key, sub = jax.random.split(key)
        return policy(actor_params, obs[None], sub, args.act_noise_std)[0][0].reshape(args.horizon, act_dim), key

    return jax.jit(act)


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------


def train(args: Args, resume=None) -> dict:
    """Train --num-seeds agents (or continue `resume` = (path, checkpoint) from prepare_resume). Returns a summary."""
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    S, seeds = args.num_seeds, [args.seed + i for i in range(args.num_seeds)]
    if resume:
        run_name, run_dir = resume[1]["meta"]["run_name"], resume_run_dir(*resume)
    else:
        run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join("runs", run_name)
    # One TensorBoard run per seed, so plots and TensorBoard see S ordinary runs.
    log_dirs = [run_dir] if S == 1 else [f"{run_dir}__s{seed}" for seed in seeds]

    seed_everything(args.seed)
    sharding, n_devices = seed_sharding(S)
    on_seeds = lambda tree: jax.device_put(tree, sharding)
    obs_dim, act_dim = env_dims(args.env_id)
    check_buffer_memory(S, args.buffer_size, obs_dim, act_dim, n_devices)
    prepare_run_dir(run_dir, resumed=resume is not None)
    envs = SeedEnvs(args.env_id, seeds)
    eval_envs = SeedEnvs(args.env_id, [seed + 10_000 for seed in seeds], render=args.capture_video)
    if args.capture_video:
        eval_envs.render_check()

    # Each seed's keys are split from its own root exactly as a single run's: agent i is the run --seed X+i.
    keys = jnp.stack([jax.random.split(jax.random.PRNGKey(seed), 4) for seed in seeds])
    k_agent, k_act, k_eval = on_seeds(keys[:, 1]), on_seeds(keys[:, 2]), keys[:, 3]
    agent = jax.jit(seed_map(lambda k: create_agent(args, obs_dim, act_dim, k), S), out_shardings=sharding)(k_agent)
    buf = jax.jit(lambda: jax.tree_util.tree_map(lambda x: jnp.zeros((S,) + x.shape, x.dtype),
                                                 buffer_init(args.buffer_size, obs_dim, act_dim)), out_shardings=sharding)()
    obs = envs.reset()
    start_step, last_checkpoint = 0, None
    meta = {"run_name": run_name, "elapsed": 0.0, "updates_from": args.learning_starts, "last_return": [float("nan")] * S}
    if resume:
        last_checkpoint, ckpt = resume
        state, buf, obs = restore_training(last_checkpoint, ckpt, {"agent": agent, "k_act": k_act}, buf, envs)
        agent, k_act, buf = on_seeds(state["agent"]), on_seeds(state["k_act"]), on_seeds(buf)
        start_step, meta = ckpt["step"], ckpt["meta"]
        if ckpt["buffer"] is None:  # refill before updating again, as at the start of a run
            meta["updates_from"] = max(meta["updates_from"], start_step + max(args.learning_starts, args.batch_size))
        print(f"resumed {run_dir} at step {start_step} from {last_checkpoint}"
              + ("" if ckpt["buffer"] is not None else f" (no buffer saved: refilling until step {meta['updates_from']})"))
    if S > 1:
        print(f"{S} seeds ({seeds[0]} to {seeds[-1]}) on {n_devices} device(s); each logs to {run_dir}__s<seed>")
    if args.learning_starts >= args.total_timesteps:
        print(f"note: --learning-starts {args.learning_starts} >= --total-timesteps {args.total_timesteps}: this run only "
              "collects random transitions (resume it with a larger --total-timesteps to learn)")
    if not args.checkpoint_buffer:
        print("checkpoints leave out the replay buffer (--no-checkpoint-buffer): a run resumed from them refills it first")

    # purge_step hides anything a crashed run logged after the checkpoint, so no step appears twice; the
    # suffix keeps a resumed session from reusing (and truncating) an event file of the same second.
    writers = [SummaryWriter(log_dir, purge_step=start_step + 1 if resume else None,
                             filename_suffix=f".from{start_step}" if resume else "") for log_dir in log_dirs]
    if not resume:
        table = "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
        for seed, writer in zip(seeds, writers):
            writer.add_text("hyperparameters", table + (f"\n|agent seed|{seed}|" if S > 1 else ""))
    update = make_update(args, act_dim, sharding)
    add = jax.jit(seed_map(buffer_add, S), donate_argnums=() if args.debug_nans else 0, out_shardings=sharding)
    act_eval, act_explore = make_act(args, agent.actor.apply_fn, act_dim, S)

    def write_checkpoint(step: int) -> str:
        bad = first_nonfinite(agent, "agent", seeds)
        if bad:
            raise Diverged(f"parameter {bad}", step, last_checkpoint)
        for writer in writers:  # the logs up to this step are on disk before the checkpoint that follows them
            writer.flush()
        meta.update(elapsed=time.time() - start, last_return=last_return)
        payload = training_checkpoint(ALGO, args, step, {"agent": agent, "k_act": k_act}, buf if args.checkpoint_buffer else None, envs, obs, meta)
        return save_checkpoint(run_dir, step, payload, args.keep_checkpoints)

    info, last_return, returns_seen, stopped = None, list(meta["last_return"]), [[] for _ in seeds], None
    start = window_start = time.time() - meta["elapsed"]
    window_step, postfix, learn_start_time, n_updates = start_step, {}, None, 0
    bar = tqdm(total=args.total_timesteps, initial=start_step, disable=not args.progress, dynamic_ncols=True, unit="step",
               desc=f"{S} seeds" if S > 1 else None)
    try:
        # jax.debug_nans as a context: the global config flag is not honoured reliably once flax has run.
        with StopOnSignal() as stop, jax.debug_nans(args.debug_nans):
            for global_step in range(start_step, args.total_timesteps):
                step = global_step + 1
                if global_step < args.learning_starts:
                    actions = envs.random_actions()
                else:
                    actions, k_act = act_explore(agent.actor.params, obs, k_act)
                    actions = np.asarray(actions)
                transitions, obs, episodes = envs.step(obs, actions)
                buf = add(buf, *transitions)
                if global_step >= meta["updates_from"]:
                    if learn_start_time is None:
                        learn_start_time = time.time()
                    agent, info = update(agent, buf)
                    n_updates += 1
                    check_metrics(info, step, last_checkpoint, seeds)
                for i, episode in enumerate(episodes):
                    if episode is not None:
                        last_return[i] = float(episode["r"])
                        returns_seen[i].append(last_return[i])
                        writers[i].add_scalar("charts/episodic_return", last_return[i], step)
                        writers[i].add_scalar("charts/episodic_length", int(episode["l"]), step)

                if step % args.log_every == 0:
                    now = time.time()  # SPS: each seed's env steps per second; the bar shows all seeds' total
                    sps, window_sps = int(step / (now - start)), int((step - window_step) / (now - window_start))
                    window_start, window_step = now, step
                    values = {} if info is None else {k: v for k, v in jax.device_get(info).items() if k != "finite"}
                    grad_norms = values.pop("grad_norms", None)
                    for i, writer in enumerate(writers):
                        writer.add_scalar("charts/SPS", sps, step)
                        writer.add_scalar("charts/SPS_window", window_sps, step)
                        for k, norm in enumerate(grad_norms[i] if grad_norms is not None else []):
                            writer.add_scalar(f"grad/step_{k}", float(norm), step)
                        for name, value in values.items():
                            writer.add_scalar(f"losses/{name}", float(value[i]), step)
                    postfix["sps"] = window_sps * S
                if step % args.eval_every == 0 and args.eval_episodes > 0:
                    eval_start = time.time()
                    # Seeded by the step alone, so a resumed run evaluates exactly as an uninterrupted one.
                    videos = [[os.path.join(run_dir, "videos", f"eval_step{step:010d}{'' if S == 1 else f'_s{seed}'}.mp4")]
                              if args.capture_video else [] for seed in seeds]
                    eval_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(k_eval, step)
                    eval_returns = evaluate(eval_envs, act_eval, agent.actor.params, on_seeds(eval_keys), args.eval_episodes,
                                            [seed + 10_000 + step for seed in seeds], videos)
                    for writer, returns in zip(writers, eval_returns):
                        writer.add_scalar("eval/episodic_return", float(np.mean(returns)), step)
                    postfix["eval"] = f"{np.mean(eval_returns):.1f}"
                    eval_time = time.time() - eval_start
                    window_start += eval_time  # SPS_window measures training only
                    if learn_start_time is not None:
                        learn_start_time += eval_time
                if any(e is not None for e in episodes) or step % args.log_every == 0:
                    postfix["return"] = f"{np.nanmean(last_return):.1f}" if not np.all(np.isnan(last_return)) else "nan"
                    bar.set_postfix(postfix, refresh=False)
                bar.update(1)

                periodic = args.checkpoint_every and (step % args.checkpoint_every == 0 or step == args.total_timesteps)
                if periodic or stop.signal:
                    last_checkpoint = write_checkpoint(step)
                if stop.signal:
                    stopped = stop.signal
                    break
    except FloatingPointError as e:  # raised by --debug-nans
        raise Diverged(f"an array (jax_debug_nans: {str(e).splitlines()[0]})", step, last_checkpoint) from None
    finally:
        bar.close()
        for writer in writers:
            writer.close()
        envs.close()
        eval_envs.close()
    jax.block_until_ready(agent)
    end = time.time()

    compiles = update._cache_size()
    if args.save_model and not stopped:
        for i, log_dir in enumerate(log_dirs):
            path = os.path.join(log_dir, f"{args.exp_name}.msgpack")
            params = per_seed({"actor": agent.actor.params, "critic": agent.critic.params, "batch_stats": agent.critic.batch_stats,
                               "log_alpha": agent.log_alpha.params["log_alpha"]}, i)
            save_model(path, ALGO, {k: getattr(args, k) for k in MODEL_CONFIG}, params)
            print(f"model of seed {seeds[i]} saved to {path}")
    learn_sps = n_updates / (end - learn_start_time) if learn_start_time is not None else float("nan")
    if stopped:
        print(f"{stopped}: stopped after step {step}; checkpoint {last_checkpoint}; to continue: "
              f"python {os.path.basename(__file__)} --resume {run_dir}")
    else:
        print(f"{args.total_timesteps} steps x {S} seed(s) in {end - start:.0f} s ({learn_sps * S:.1f} env steps/s in all "
              f"while learning, evaluation excluded); update compiled {compiles} time(s); logs in {log_dirs[0]}"
              + (f" and {S - 1} more" if S > 1 else ""))
    return {"run_dir": run_dir, "log_dirs": log_dirs, "compiles": compiles, "returns": returns_seen, "learn_sps": learn_sps,
            "total_sps": learn_sps * S, "stopped": stopped, "checkpoint": last_checkpoint, "agent": agent}


def train_offline_to_online(args: Args) -> dict:
    """The offline-to-online pipeline: --offline-steps gradient steps on the dataset, then --total-timesteps
    online env steps, acting in chunks of --horizon actions, with a buffer that starts as the dataset.
    TensorBoard steps: offline gradient step i is step i, online env step j is step offline_steps + j."""
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    data = load_dataset(args.offline_dataset, args.env_id, args.dataset_obs_keys)
    n_data, (obs_dim, act_dim) = len(data["obs"]), (data["obs"].shape[1], data["actions"].shape[1])
    if n_data < args.horizon:
        raise ConfigError(f"--offline-dataset holds {n_data} transitions, fewer than one chunk of --horizon {args.horizon}")
    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)
    k_agent, k_act, k_eval = jax.random.split(seed_everything(args.seed), 3)
    agent = create_chunk_agent(args, obs_dim, args.horizon * act_dim, k_agent)
    buf = sequence_buffer(data, n_data + args.total_timesteps)  # never overwrites: the dataset stays in it
    pretrain, finetune = make_chunk_update(args, act_dim)
    add = jax.jit(sequence_add, donate_argnums=() if args.debug_nans else 0)
    act = make_chunk_act(args, agent.actor.apply_fn, act_dim)
    env, eval_env = make_env(args.env_id, args.seed), make_env(args.env_id, args.seed + 10_000)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    print(f"{n_data} transitions from {args.offline_dataset}; chunks of {args.horizon} x {act_dim} actions; logs in {run_dir}")

    def evaluate_now(phase: str, step: int) -> str:
        returns, successes = evaluate_chunks(eval_env, act, agent.actor.params, jax.random.fold_in(k_eval, step),
                                             args.eval_episodes, args.seed + 10_000 + step, args.horizon)
        writer.add_scalar(f"eval/{phase}_episodic_return", float(np.mean(returns)), step)
        if successes is None:
            return f"{np.mean(returns):.1f}"
        writer.add_scalar(f"eval/{phase}_success_rate", float(np.mean(successes)), step)
        return f"{np.mean(returns):.1f}, success {np.mean(successes):.2f}"

    def log(info, phase: str, step: int, stop_step: int) -> None:
        check_metrics(info, stop_step, None)
        for name, value in jax.device_get(info).items():
            if name != "finite":
                writer.add_scalar(f"losses/{phase}_{name}", float(value), step)

    info, stopped, last_eval, episodes = None, None, {}, {"returns": [], "successes": []}
    start = time.time()
    try:
        with StopOnSignal() as stop, jax.debug_nans(args.debug_nans):
            bar = tqdm(total=args.offline_steps, disable=not args.progress, dynamic_ncols=True, unit="update", desc="offline")
            for step in range(1, args.offline_steps + 1):
                agent, info = pretrain(agent, buf)
                if step % args.log_every == 0:
                    log(info, "offline", step, step)
                    writer.add_scalar("charts/offline_updates_per_s", step / (time.time() - start), step)
                    bar.set_postfix(flow_loss=f"{float(info['flow_loss']):.4f}", refresh=False)
                if args.eval_episodes and (step % args.eval_every == 0 or step == args.offline_steps):
                    last_eval["offline"] = evaluate_now("offline", step)
                    bar.set_postfix(eval=last_eval["offline"], refresh=False)
                bar.update(1)
                if stop.signal:
                    stopped = stop.signal
                    break
            bar.close()
            offline_time, online_start = time.time() - start, time.time()

            obs, _ = env.reset(seed=args.seed)
            queue, n_updates, learn_start = [], 0, None
            bar = tqdm(total=args.total_timesteps, disable=not args.progress or bool(stopped), dynamic_ncols=True, unit="step",
                       desc="online")
            for step in range(1, 0 if stopped else args.total_timesteps + 1):
                log_step = args.offline_steps + step
                if not queue:  # the whole chunk is executed open-loop before the actor is asked again
                    chunk, k_act = act(agent.actor.params, obs, k_act)
                    queue = list(np.asarray(chunk))
                action = queue.pop(0)
                next_obs, reward, terminated, truncated, env_info = env.step(action)
                buf = add(buf, obs, action, np.float32(reward), next_obs, np.float32(terminated), np.float32(terminated or truncated))
                obs = next_obs
                if terminated or truncated:
                    episode = env_info["episode"]
                    episodes["returns"].append(float(episode["r"]))
                    writer.add_scalar("charts/episodic_return", float(episode["r"]), log_step)
                    writer.add_scalar("charts/episodic_length", int(episode["l"]), log_step)
                    if "success" in env_info:
                        episodes["successes"].append(float(env_info["success"]))
                        writer.add_scalar("charts/success", float(env_info["success"]), log_step)
                    obs, _ = env.reset()
                    queue = []
                    bar.set_postfix(return_=f"{episodes['returns'][-1]:.1f}", refresh=False)
                if step > args.o2o_learning_starts:
                    learn_start = learn_start or time.time()
                    agent, info = finetune(agent, buf)
                    n_updates += 1
                    check_metrics(info, log_step, None)
                if step % args.log_every == 0:
                    writer.add_scalar("charts/SPS", int(step / (time.time() - online_start)), log_step)
                    if n_updates:
                        log(info, "online", log_step, log_step)
                if args.eval_episodes and (step % args.eval_every == 0 or step == args.total_timesteps):
                    last_eval["online"] = evaluate_now("online", log_step)
                    bar.set_postfix(eval=last_eval["online"], refresh=False)
                bar.update(1)
                if stop.signal:
                    stopped = stop.signal
                    break
            bar.close()
    except FloatingPointError as e:  # raised by --debug-nans
        raise Diverged(f"an array (jax_debug_nans: {str(e).splitlines()[0]})", step, None) from None
    finally:
        writer.close()
        env.close()
        eval_env.close()
    jax.block_until_ready(agent)
    learn_sps = n_updates / (time.time() - learn_start) if learn_start else float("nan")
    print(f"{'stopped by ' + stopped if stopped else 'done'}: {args.offline_steps} offline steps in {offline_time:.0f} s, "
          f"{len(episodes['returns'])} online episodes ({learn_sps:.1f} env steps/s while learning); last evaluation "
          f"offline {last_eval.get('offline', '-')}, online {last_eval.get('online', '-')}; logs in {run_dir}")
    return {"run_dir": run_dir, "agent": agent, "buffer_size": int(buf.size), "episodes": episodes, "last_eval": last_eval,
            "compiles": (pretrain._cache_size(), finetune._cache_size()), "stopped": stopped, "n_data": n_data}


def main(argv=None) -> int:
    import tyro

    args = tyro.cli(Args, args=argv)
    name = os.path.basename(__file__)
    try:
        check_args(args)
        if args.eval_only:
            eval_only(args)
        else:
            if args.offline_dataset is not None:
                train_offline_to_online(args)
            else:
                train(args, prepare_resume(args) if args.resume else None)
    except ConfigError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except (Diverged, OSError) as e:  # OSError: a checkpoint or log that could not be written
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted twice: stopped without writing a checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
