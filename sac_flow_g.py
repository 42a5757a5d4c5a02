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
    check_run_flags(args)
    check_env_id(args.env_id)


# JAX and the env libraries load after the arguments are checked, so bad input fails fast.
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import struct  # noqa: E402
from flax.training.train_state import TrainState  # noqa: E402

from common.buffer import ReplayBuffer, buffer_add, buffer_init, buffer_sample  # noqa: E402
from common.checkpoint import (Diverged, StopOnSignal, adopt_saved_args, check_metrics, finite_flags,  # noqa: E402
                               first_nonfinite, load_model, prepare_run_dir, read_resume,
                               restore_training, restore_tree, resume_run_dir, save_checkpoint, save_model,
                               training_checkpoint, video_dir)
from common.env import SeedEnvs, env_dims, evaluate, seed_everything  # noqa: E402
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
    """One rollout step's networks: (s, x_k, t_k) -> (v_k, log sigma_k)."""

    act_dim: int
    velocity: str
    hidden_dim: int
    time_emb_dim: int
    log_std_hidden: int
    log_std_min: float
    log_std_max: float

    @nn.compact
    def __call__(self, s, x, t):
        net = GatedVelocity if self.velocity == "gated" else MLPVelocity
        v = net(self.act_dim, self.hidden_dim, self.time_emb_dim, name="velocity")(s, x, t)
        log_std = LogStdHead(self.act_dim, self.log_std_hidden, self.log_std_min, self.log_std_max, name="log_std")(s, t)
        return v, log_std


def make_actor(args: Args, act_dim: int) -> FlowActor:
    return FlowActor(act_dim, args.velocity, args.hidden_dim, args.time_emb_dim, args.log_std_hidden,
                     args.log_std_min, args.log_std_max)


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


def main(argv=None) -> int:
    import tyro

    args = tyro.cli(Args, args=argv)
    name = os.path.basename(__file__)
    try:
        check_args(args)
        if args.eval_only:
            eval_only(args)
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
