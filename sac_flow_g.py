"""SAC Flow-G: SAC on a K-step flow policy with a GRU-gated velocity, in one JAX/Flax file.

The actor is a flow rollout x_{k+1} = x_k + dt v(s, x_k, t_k) + std_k eps_k, a = tanh(x_K). Seen as a
sequence model this is a residual RNN in k, whose gradients explode or vanish; Flow-G gates the
velocity like a GRU update, v = z * (h - x_k), so each step interpolates between keeping x_k and
moving to a candidate h. The noise on every step makes the path density tractable: SAC's log pi.
Defaults are the authors' code (batch renormalisation of [s, x_k] in the actor, step noise sigma,
sigma from the observation, log pi in the env's action units); flags give the other choices.

| paper | what | here |
|---|---|---|
| Eq. 6 | v = z * (h - x), z = sigmoid(g(s, x, t)), gate bias 5 | GatedVelocity, TimeEmbedding |
| Fig. 9 | naive flow, a plain MLP velocity (--velocity mlp) | MLPVelocity |
| Eq. 4, 13 | the K-step noise-augmented rollout | flow_rollout, step_std, FlowPolicy |
| Eq. 13-14 | plain drift b = v, or the marginal-preserving drift | plain_drift, marginal_drift |
| Eq. 15 | path log-density with every -log std term and the tanh Jacobian | path_log_prob, tanh_log_det |
| Eq. 20-21 | critic: y = r + gamma (1 - d) (min Q(s', a') - alpha log pi(a'|s')) | critic_loss, update_critic |
| Eq. 22 | actor: mean(alpha log pi - min Q(s, pi(s))) | actor_loss, update_actor |
| Eq. 24 | temperature on log alpha toward --target-entropy | alpha_loss_fn in update_actor |
| SAC's schedule | critics every step, actor and alpha every --policy-delay, one jitted call | make_update |
| CrossQ | batch-renormalised critics, joint (s, a) / (s', a') pass, no target net | BatchRenorm, NormedDense, CriticEnsemble |
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training.train_state import TrainState

from common.args import ConfigError, RunArgs, check_ranges, check_run_args
from common.buffer import Batch, ReplayBuffer, buffer_sample
from common.checkpoint import finite_flags, restore_tree
from common.env import action_scale
from common.layers import BatchRenorm, NormedDense
from common.run import ExitStatus, TrainingRun, eval_only, prepare_resume
from common.seeds import seed_map


@dataclass
class Args(RunArgs):
    """SAC Flow-G from scratch: its hyperparameters after the run flags of common/args.py."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
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
    """drift of the noisy rollout: plain b = v (the authors'), or marginal, which keeps the deterministic flow's final law
    (needs --step-noise sqrt-dt)"""
    step_noise: Literal["sigma", "sqrt-dt"] = "sigma"
    """std of each rollout step's noise: sigma, x_{k+1} = x_k + dt v + sigma eps (the authors' code); sqrt-dt,
    sigma sqrt(dt) (Euler-Maruyama, which the marginal drift assumes)"""
    log_std_input: Literal["obs", "obs-time"] = "obs"
    """what the log-std head sees: obs, the observation alone (the authors' code); obs-time, (s, t_k)"""
    actor_batch_norm: bool = True
    """batch renormalisation of [s, x_k] in the actor (the authors' code): batch statistics in the actor loss,
    running statistics when acting and in the critic target"""
    action_units: Literal["env", "unit"] = "env"
    """units of log pi: env, the env's own action bounds (the authors' tanh correction log(scale (1 - tanh^2)); it sets
    what --target-entropy means on tasks with bounds other than +-1, e.g. Humanoid's +-0.4); unit, actions in [-1, 1]"""
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
    """training-mode calls of each batch-renorm layer before its r/d corrections switch on (a critic layer is called
    once per critic update, an actor layer once per flow step of each actor update, as in the authors' code)"""
    target_network: bool = False
    """use a Polyak-averaged target critic (standard SAC) instead of CrossQ's joint pass without one"""
    tau: float = 0.005
    """target-network rate, with --target-network"""
    eval_deterministic: bool = True
    """evaluate with the noise off (x_0 = 0, no step noise); otherwise sample as when acting"""


def check_args(args: Args) -> None:
    """Refuse impossible settings with one line, before anything is built or compiled."""
    check_ranges(args, positive=["policy_lr", "q_lr", "alpha_lr", "alpha", "flow_steps", "hidden_dim", "log_std_hidden",
                                 "n_critics", "critic_width", "policy_delay", "bn_eps"],
                 nonnegative=["renorm_warmup"], fraction=["adam_b1", "bn_momentum"], unit=["gamma"])
    if args.time_emb_dim < 4 or args.time_emb_dim % 2:
        raise ConfigError(f"--time-emb-dim must be an even number >= 4, got {args.time_emb_dim}")
    if not 0.0 < args.tau <= 1.0:
        raise ConfigError(f"--tau must be in (0.0, 1.0], got {args.tau}")
    if args.r_max < 1.0 or args.d_max < 0.0:
        raise ConfigError(f"--r-max must be >= 1 and --d-max >= 0, got {args.r_max} and {args.d_max}")
    if not args.log_std_min < args.log_std_max:
        raise ConfigError(f"--log-std-min {args.log_std_min} must be below --log-std-max {args.log_std_max}")
    if args.drift == "marginal" and args.step_noise != "sqrt-dt":
        raise ConfigError(f"--drift marginal needs --step-noise sqrt-dt (the Euler-Maruyama scaling it is derived for), "
                          f"got --step-noise {args.step_noise}")
    check_run_args(args)  # the flags all scripts share, and the env id


def batch_renorm(args, train: bool, **kw) -> BatchRenorm:
    """A batch-renormalisation layer (common/layers.py: CrossQ's critics, the authors' actor) with this run's flags."""
    return BatchRenorm(train, args.bn_momentum, args.bn_eps, args.r_max, args.d_max, args.renorm_warmup, **kw)


# --- Actor: Flow-G velocity v(s, x_k, t_k), the log-std head, the rollout as one module ---


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
    """Flow-G (Eq. 6): z = sigmoid(g(u, t)), h = c(u, t), v = z * (h - x), u = [s, x].

    With `norm` (the authors' actor), u is batch-renormalised by one layer shared by all K steps.
    The gate's last layer starts with zero weights and bias 5, so z = sigmoid(5) = 0.993 for every
    input: each step starts close to the plain x + dt * (h - x) update, and the gate learns where to
    hold x back, which bounds how much a step can amplify the gradient flowing through it."""

    act_dim: int
    hidden_dim: int
    time_emb_dim: int
    norm: Optional[nn.Module] = None

    @nn.compact
    def __call__(self, s, x, t):
        s, x_in = (s, x) if self.norm is None else self.norm(s, x)  # [s, x] normalised, returned as two parts
        features = jnp.concatenate([s, x_in, TimeEmbedding(self.time_emb_dim)(t)], axis=-1)
        hidden = lambda name: nn.swish(nn.Dense(self.hidden_dim, name=name)(features))
        gate_logit = nn.Dense(self.act_dim, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.constant(5.0),
                              name="gate_out")(hidden("gate_hidden"))
        z = nn.sigmoid(gate_logit)
        self.sow("intermediates", "gate", z)
        h = nn.Dense(self.act_dim, name="candidate_out")(hidden("candidate_hidden"))
        return z * (h - x)


class MLPVelocity(nn.Module):
    """The naive flow policy's velocity: a plain ReLU MLP on ([s, x], time features), no gate."""

    act_dim: int
    hidden_dim: int
    time_emb_dim: int
    norm: Optional[nn.Module] = None

    @nn.compact
    def __call__(self, s, x, t):
        u = jnp.concatenate([s, x], axis=-1)
        features = jnp.concatenate([u if self.norm is None else self.norm(u), TimeEmbedding(self.time_emb_dim)(t)], axis=-1)
        h = nn.relu(nn.Dense(self.hidden_dim)(features))
        h = nn.relu(nn.Dense(self.hidden_dim)(h))
        return nn.Dense(self.act_dim)(h)


def squash_log_std(raw, log_std_min: float, log_std_max: float):
    """Map a raw head output smoothly into [log_std_min, log_std_max] (the authors' tanh map)."""
    return log_std_min + 0.5 * (log_std_max - log_std_min) * (jnp.tanh(raw) + 1.0)


class LogStdHead(nn.Module):
    """log sigma = f(inputs), two ReLU layers, tanh-mapped to [log_std_min, log_std_max]. Its inputs
    are the observation (the authors') or (s, t_k); never x_k: the marginal-preserving drift assumes
    a diffusion that does not depend on x (otherwise a divergence term of sigma^2 is missing)."""

    act_dim: int
    hidden_dim: int
    log_std_min: float
    log_std_max: float

    @nn.compact
    def __call__(self, inputs):
        h = nn.relu(nn.Dense(self.hidden_dim)(inputs))
        h = nn.relu(nn.Dense(self.hidden_dim)(h))
        return squash_log_std(nn.Dense(self.act_dim)(h), self.log_std_min, self.log_std_max)


class FlowPolicy(nn.Module):
    """pi(a|s): the K-step noise-augmented rollout over the velocity field, as one module, so that the
    batch-renorm layer is shared by the K steps (and its running statistics move once per step, as in
    the authors' actor). `train` uses batch statistics (the actor loss); otherwise running statistics
    (acting, evaluation, the critic target). Returns flow_rollout's (action, log pi, path)."""

    args: "Args"
    act_dim: int
    train: bool = False

    @nn.compact
    def __call__(self, s, key, deterministic: bool = False, perturb=None, units_scale=1.0):
        args = self.args
        norm = batch_renorm(args, self.train, name="input_norm") if args.actor_batch_norm else None
        velocity = (GatedVelocity if args.velocity == "gated" else MLPVelocity)(
            self.act_dim, args.hidden_dim, args.time_emb_dim, norm, name="velocity")
        head = LogStdHead(self.act_dim, args.log_std_hidden, args.log_std_min, args.log_std_max, name="log_std")
        log_std = head(s) if args.log_std_input == "obs" else None  # the same at every step: computed once

        def step(x, t, k):
            t_col = jnp.full(x.shape[:-1] + (1,), t)
            return velocity(s, x, t_col), log_std if log_std is not None else head(jnp.concatenate([s, t_col], axis=-1))

        return flow_rollout(step, s.shape[:-1] + (self.act_dim,), key, args.flow_steps, args.drift, args.step_noise,
                            deterministic, perturb, units_scale)


# --- The noise-augmented rollout and its path log-density (REFERENCE section 2, paper App. A) ---


def plain_drift(v, x, t, sigma):
    """The authors' step: b = v; the noise widens the final law beyond the deterministic flow's."""
    return v


def marginal_drift(v, x, t, sigma):
    """b = v + sigma^2 / 2 * score, with the straight-path score -(x - t v) / (1 - t) (Eq. 13-14):
    b = v (1 + sigma^2 t / (2 (1 - t))) - sigma^2 x / (2 (1 - t)). In continuous time the noisy
    rollout then ends in the deterministic flow's law. t < 1 on every step, so 1 - t > 0."""
    return v * (1.0 + sigma**2 * t / (2.0 * (1.0 - t))) - sigma**2 * x / (2.0 * (1.0 - t))


DRIFTS = {"plain": plain_drift, "marginal": marginal_drift}


def step_std(sigma, dt: float, step_noise: str):
    """The std of one rollout step's Gaussian: sigma (the authors' Flow-G), sigma * dt (the authors'
    Flow-T, noise on the velocity) or sigma * sqrt(dt) (Euler-Maruyama)."""
    return sigma * {"sigma": 1.0, "sigma-dt": dt, "sqrt-dt": dt**0.5}[step_noise]


def gaussian_log_prob(x, mean, std):
    """log N(x; mean, diag(std^2)), summed over the last axis, with its -log std terms."""
    z = (x - mean) / std
    return jnp.sum(-0.5 * z**2 - jnp.log(std) - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)


def tanh_log_det(x_final, scale):
    """log |da/dx_K| of a = tanh(x_K) * scale + bias, per dimension log(scale (1 - tanh^2) + 1e-6)."""
    return jnp.sum(jnp.log(scale * (1.0 - jnp.tanh(x_final) ** 2) + 1e-6), axis=-1)


def path_log_prob(xs, means, stds, scale=1.0):
    """Joint log-density of the path (x_0, ..., x_K) and the squashed action (Eq. 15):
    log N(x_0; 0, I) + sum_k log N(x_{k+1}; x_k + dt b_k, std_k^2 I) - log |da/dx_K|, every -log std
    term included; `scale` is the action's half-range in the units the density is measured in."""
    log_prob = gaussian_log_prob(xs[0], 0.0, 1.0)
    for k in range(len(means)):
        log_prob = log_prob + gaussian_log_prob(xs[k + 1], means[k], stds[k])
    return log_prob - tanh_log_det(xs[-1], scale)


def flow_rollout(step_fn, shape, key, steps: int, drift: str = "plain", step_noise: str = "sqrt-dt",
                 deterministic: bool = False, perturb=None, units_scale=1.0):
    """Sample a = tanh(x_K) in [-1, 1] by the noise-augmented rollout (Eq. 13):
    x_0 ~ N(0, I); x_{k+1} = x_k + dt b_k + std_k eps_k, t_k = k / K, std_k = step_std(sigma_k).

    `step_fn(x, t, k)` returns (v, log sigma) at step k. Deterministic: x_0 = 0 and no step noise,
    i.e. the Euler-integrated flow ODE (both drifts reduce to v at sigma = 0). `perturb` (K, ...,
    act_dim), zeros, is added to each x_k so that its gradient is d loss / d x_k, the backward pass
    of the rollout seen as an RNN. log pi is measured in units where the action's half-range is
    `units_scale` (the env's, with --action-units env). Returns the action, log pi (None when
    deterministic) and the path with the mean log sigma."""
    keys = jax.random.split(key, steps + 1)
    x = jnp.zeros(shape) if deterministic else jax.random.normal(keys[0], shape)
    dt = 1.0 / steps
    xs, means, stds, log_stds = [], [], [], []
    for k in range(steps):
        xs.append(x)
        if perturb is not None:
            # Added to the state carried into step k only, not to the density's x_k: with the noise
            # held fixed (reparameterised), the gradient is the recurrence's own d loss / d x_k,
            # without the score term -(x_k - mean) / std^2 of the previous transition.
            x = x + perturb[k]
        t = k * dt
        v, log_std = step_fn(x, t, k)
        if deterministic:
            x = x + dt * v
            continue
        sigma = jnp.exp(log_std)
        mean = x + dt * DRIFTS[drift](v, x, t, sigma)
        std = step_std(sigma, dt, step_noise)
        x = mean + std * jax.random.normal(keys[k + 1], shape)
        means.append(mean)
        stds.append(std)
        log_stds.append(log_std)
    xs.append(x)
    action = jnp.tanh(x)
    if deterministic:
        return action, None, {"xs": xs}
    return action, path_log_prob(xs, means, stds, units_scale), {"xs": xs, "log_std": jnp.mean(jnp.stack(log_stds))}


# --- Critics: CrossQ's batch-renormalised MLPs, evaluated as one vmapped ensemble ---


class QNetwork(nn.Module):
    """One critic, CrossQ's layout: BRN on the input, then (Dense, ReLU, BRN) twice, then Dense 1."""

    args: "Args"
    train: bool

    @nn.compact
    def __call__(self, s, a):
        width, norm = self.args.critic_width, lambda x: batch_renorm(self.args, self.train)(x)
        if self.args.batch_norm:  # the input's scale and bias folded into the first kernel (NormedDense)
            # s and a as two parts with the running statistics: the actor loss then differentiates w.r.t. a alone
            inputs = (jnp.concatenate([s, a], axis=-1),) if self.train else (s, a)
            x = NormedDense(width, name="Dense_0")(*batch_renorm(self.args, self.train, affine=False)(*inputs))
        else:
            x, norm = nn.Dense(width, name="Dense_0")(jnp.concatenate([s, a], axis=-1)), lambda x: x
        x = norm(nn.relu(x))
        x = norm(nn.relu(nn.Dense(width, name="Dense_1")(x)))
        return nn.Dense(1, name="Dense_2")(x).squeeze(-1)


class CriticEnsemble(nn.Module):
    """`n_critics` independent critics as one vmapped module; returns Q of shape (n_critics, batch).

    `train` selects batch statistics (and updates the running ones) or the running statistics."""

    args: "Args"
    train: bool

    @nn.compact
    def __call__(self, s, a):
        ensemble = nn.vmap(QNetwork, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True},
                           in_axes=None, out_axes=0, axis_size=self.args.n_critics)
        return ensemble(self.args, self.train)(s, a)


# --- Agent state and the jitted update ---


class NormedState(TrainState):
    batch_stats: dict  # running statistics of batch renormalisation ({} without it)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


@struct.dataclass
class Agent:
    actor: NormedState
    critic: NormedState
    critic_target: Optional[dict]  # {"params", "batch_stats"} with --target-network, else None
    log_alpha: TrainState
    key: jax.Array
    updates: jax.Array  # critic updates done so far
    actor_info: dict  # metrics of the latest actor/alpha update, for logging between them


ACTOR_METRICS = ("actor_loss", "alpha_loss", "entropy", "log_std", "q_pi")


def create_agent(args: Args, obs_dim: int, act_dim: int, key) -> Agent:
    k_actor, k_critic, key = jax.random.split(key, 3)
    s, a = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
    adam = lambda lr: optax.adam(lr, b1=args.adam_b1)
    as_array = lambda ts: ts.replace(step=jnp.zeros((), jnp.int32))  # one compiled signature from the start

    def normed_state(variables, apply_fn, lr):
        return as_array(NormedState.create(apply_fn=apply_fn, params=variables["params"],
                                           batch_stats=variables.get("batch_stats", {}), tx=adam(lr)))

    actor_net, critic_net = FlowPolicy(args, act_dim, train=True), CriticEnsemble(args, train=True)
    actor = normed_state(actor_net.init(k_actor, s, jax.random.PRNGKey(0)), actor_net.apply, args.policy_lr)
    critic = normed_state(critic_net.init(k_critic, s, a), critic_net.apply, args.q_lr)
    log_alpha = as_array(TrainState.create(apply_fn=None, params={"log_alpha": jnp.log(jnp.float32(args.alpha))},
                                           tx=adam(args.alpha_lr)))
    target = critic.variables if args.target_network else None
    info = {name: jnp.zeros((), jnp.float32) for name in ACTOR_METRICS}
    info["grad_norms"] = jnp.zeros((args.flow_steps,), jnp.float32)
    return Agent(actor=actor, critic=critic, critic_target=target, log_alpha=log_alpha, key=key,
                 updates=jnp.zeros((), jnp.int32), actor_info=info)


def polyak(online, target, tau: float):
    """target <- tau online + (1 - tau) target for the float leaves; counters are copied."""
    mix = lambda o, t: o if jnp.issubdtype(o.dtype, jnp.integer) else tau * o + (1.0 - tau) * t
    return jax.tree_util.tree_map(mix, online, target)


def critic_loss(params, args: Args, agent: Agent, b: Batch, next_a, next_log_pi):
    """Eq. 20-21: 0.5 sum_i mean (Q_i(s, a) - y)^2 with y = r + gamma (1 - d) (min_i Q_i(s', a') - alpha log pi(a'|s')),
    the critics in training mode. Without a target network (CrossQ, the default) one pass over [(s, a); (s', a')]
    gives both halves the same batch statistics. Returns the loss and (Q(s, a), mean Q(s', a'), new batch stats)."""
    critic_train, B = CriticEnsemble(args, train=True), args.batch_size
    alpha = jnp.exp(agent.log_alpha.params["log_alpha"])
    variables = {"params": params, "batch_stats": agent.critic.batch_stats}
    if args.target_network:
        q, new_vars = critic_train.apply(variables, b.obs, b.actions, mutable=["batch_stats"])
        q_next = CriticEnsemble(args, train=False).apply(agent.critic_target, b.next_obs, next_a)
    else:
        q_all, new_vars = critic_train.apply(variables, jnp.concatenate([b.obs, b.next_obs]),
                                             jnp.concatenate([b.actions, next_a]), mutable=["batch_stats"])
        q, q_next = q_all[:, :B], q_all[:, B:]
    soft_next = jnp.min(q_next, axis=0) - alpha * next_log_pi
    y = jax.lax.stop_gradient(b.rewards + args.gamma * (1.0 - b.terminated) * soft_next)
    loss = 0.5 * jnp.sum(jnp.mean((q - y) ** 2, axis=1))
    return loss, (q, jnp.mean(q_next), new_vars.get("batch_stats", {}))


def actor_loss(params, perturb, args: Args, act_dim: int, agent: Agent, critic: NormedState, b: Batch, key, scale):
    """Eq. 22: mean(alpha log pi(a|s) - min_i Q_i(s, a)), a = pi(s) reparameterised through the whole rollout with
    the actor's batch statistics; the critics use their running statistics (CrossQ). `perturb` (zeros) is added
    to each x_k, so its gradient is the loss's gradient at every flow step. Returns the loss and (log pi, the
    rollout's mean log std, mean min Q, the actor's new batch stats)."""
    alpha = jnp.exp(agent.log_alpha.params["log_alpha"])
    (a, log_pi, path), new_vars = FlowPolicy(args, act_dim, train=True).apply(
        {"params": params, "batch_stats": agent.actor.batch_stats}, b.obs, key, perturb=perturb, units_scale=scale,
        mutable=["batch_stats"])
    q_pi = jnp.min(CriticEnsemble(args, train=False).apply(critic.variables, b.obs, a), axis=0)
    return jnp.mean(alpha * log_pi - q_pi), (log_pi, path["log_std"], jnp.mean(q_pi), new_vars)


def update_critic(args: Args, act_dim: int, agent: Agent, b: Batch, key, scale):
    """One step on the critics (Eq. 20-21), a' ~ pi(s') drawn with the actor's running statistics; then the
    Polyak target with --target-network. Returns the new critic, target and the step's metrics."""
    next_a, next_log_pi, _ = FlowPolicy(args, act_dim, train=False).apply(agent.actor.variables, b.next_obs, key,
                                                                         units_scale=scale)
    (qf_loss, (q_data, next_q, batch_stats)), grads = jax.value_and_grad(critic_loss, has_aux=True)(
        agent.critic.params, args, agent, b, next_a, next_log_pi)
    critic = agent.critic.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
    critic_target = polyak(critic.variables, agent.critic_target, args.tau) if args.target_network else None
    return critic, critic_target, {"qf_loss": qf_loss, "qf_values": jnp.mean(q_data), "next_q_values": next_q}


def update_actor(args: Args, act_dim: int, agent: Agent, critic: NormedState, b: Batch, key, scale):
    """One step on the actor (Eq. 22) against the just-updated critics, then on log alpha: alpha (-log pi - H_target)
    (Eq. 24). Returns the new actor, log alpha and the step's metrics, with the norm of the gradient at each x_k."""
    B, K = args.batch_size, args.flow_steps
    perturb = jnp.zeros((K, B, act_dim))
    (loss, (log_pi, log_std, q_pi, new_vars)), (grads, grad_x) = jax.value_and_grad(
        actor_loss, argnums=(0, 1), has_aux=True)(agent.actor.params, perturb, args, act_dim, agent, critic, b, key, scale)
    actor = agent.actor.apply_gradients(grads=grads).replace(batch_stats=new_vars.get("batch_stats", {}))
    # Per-sample gradient norm at x_k (the loss is a batch mean, hence the factor B), averaged.
    grad_norms = jnp.mean(jnp.linalg.norm(B * grad_x, axis=-1), axis=-1)
    entropy = -jnp.mean(log_pi)
    alpha_loss_fn = lambda p: jnp.exp(p["log_alpha"]) * (entropy - args.target_entropy)
    alpha_loss, alpha_grad = jax.value_and_grad(alpha_loss_fn)(agent.log_alpha.params)
    log_alpha = agent.log_alpha.apply_gradients(grads=alpha_grad) if args.autotune else agent.log_alpha
    info = {"actor_loss": loss, "alpha_loss": alpha_loss, "entropy": entropy, "log_std": log_std, "q_pi": q_pi,
            "grad_norms": grad_norms}
    return actor, log_alpha, info


def make_update(args: Args, act_dim: int, sharding=None, units_scale=1.0):
    """Build the jitted gradient step of every seed: sample a batch from the device buffer, update the critics; every
    `policy_delay` critic updates also the actor and log alpha. One compiled call per env step; the agent is not
    donated (see the end). The buffer is only read here; the newest transition goes in by its own donated call just
    before (inserting here would make XLA copy the whole buffer every step).
    `units_scale`: the env's action half-range, for log pi in the env's units (--action-units env)."""
    scale = units_scale if args.action_units == "env" else 1.0

    def update(agent: Agent, buf: ReplayBuffer, do_actor):
        key, k_batch, k_next, k_pi = jax.random.split(agent.key, 4)
        b = buffer_sample(buf, k_batch, args.batch_size)
        critic, critic_target, info = update_critic(args, act_dim, agent, b, k_next, scale)
        carry = (agent.actor, agent.log_alpha, agent.actor_info)
        actor_step = lambda c: update_actor(args, act_dim, agent.replace(actor=c[0], log_alpha=c[1]), critic, b, k_pi, scale)
        actor, log_alpha, actor_info = jax.lax.cond(do_actor, actor_step, lambda c: c, carry)
        agent = Agent(actor=actor, critic=critic, critic_target=critic_target, log_alpha=log_alpha, key=key,
                      updates=agent.updates + 1, actor_info=actor_info)
        info = {**info, "alpha": jnp.exp(log_alpha.params["log_alpha"]), **actor_info}
        return agent, {**info, "finite": finite_flags(info)}  # one flag per metric, for the divergence check

    def update_seeds(agent: Agent, buf: ReplayBuffer):
        # Every seed is at the same update, so the policy delay is decided once, outside the vmap: a
        # per-seed predicate would turn lax.cond into a select that runs the actor update every step.
        do_actor = (agent.updates[0] + 1) % args.policy_delay == 0
        return seed_map(update, args.num_seeds, in_axes=(0, 0, None))(agent, buf, do_actor)

    # Not donated: aliased to the outputs, XLA copied every critic weight and both Adam moments first; fresh
    # outputs are faster and bit-identical (docs/performance.md).
    # The outputs keep the inputs' seed sharding, so the next call finds the same signature (one compile).
    return jax.jit(update_seeds, out_shardings=sharding)


# --- Acting, evaluation, saving, loading ---


def make_act(args: Args, act_dim: int, num_seeds: int):
    """Jitted (evaluation, exploration) actions for all seeds at once: (actor variables, obs, key) stacked over
    seeds; the actor uses its running statistics."""
    policy = FlowPolicy(args, act_dim, train=False)

    def act(actor_vars, obs, key, deterministic: bool):
        key, sub = jax.random.split(key)
        return policy.apply(actor_vars, obs[None], sub, deterministic)[0][0], key

    act_eval = lambda p, o, k: act(p, o, k, args.eval_deterministic)
    act_explore = lambda p, o, k: act(p, o, k, False)
    return jax.jit(seed_map(act_eval, num_seeds)), jax.jit(seed_map(act_explore, num_seeds))


ALGO = "sac_flow_g"
MODEL_CONFIG = ("env_id", "flow_steps", "drift", "step_noise", "velocity", "hidden_dim", "time_emb_dim", "log_std_input",
                "log_std_hidden", "log_std_min", "log_std_max", "actor_batch_norm", "bn_eps")


def load_actor(args: Args, obs_dim: int, act_dim: int, raw: dict):
    """For --eval-only: a saved actor's variables (refused if they do not fit) and its evaluation action."""
    template = FlowPolicy(args, act_dim).init(jax.random.PRNGKey(0), jnp.zeros((1, obs_dim)), jax.random.PRNGKey(0))
    saved = {"params": raw["actor"], "batch_stats": raw.get("actor_batch_stats", {})}
    return restore_tree(template, saved, args.checkpoint), make_act(args, act_dim, 1)[0]


# --- Training loop ---


def train(args: Args, resume=None) -> dict:
    """Train --num-seeds agents (or continue `resume` = (path, checkpoint) from prepare_resume). Returns a summary.
    Every array (agent, keys, buffer, observations) carries a leading seed axis."""
    # the actor-loss gradient's norm at each x_k, logged as grad/step_k (the paper's Fig. 13 measure)
    run = TrainingRun(args, ALGO, __file__, resume, vector_tags={"grad_norms": "grad/step_"})
    agent, k_act, buf, obs = run.init_state(create_agent)
    update = make_update(args, run.act_dim, run.sharding, action_scale(args.env_id))
    act_eval, act_explore = make_act(args, run.act_dim, args.num_seeds)
    info = None
    with run:  # a signal finishes the step, checkpoints and stops; closes the logs and envs
        for step in run.steps():
            if step <= args.learning_starts:
                actions = run.envs.random_actions()
            else:
                actions, k_act = act_explore(agent.actor.variables, obs, k_act)
                actions = np.asarray(actions)
            transitions, obs, episodes = run.envs.step(obs, actions)
            buf = run.buffer_add(buf, *transitions)
            if run.learns(step):
                agent, info = update(agent, buf)
                run.check_update(step, info)  # a NaN or infinite loss stops the run
            run.log(step, episodes, info)  # losses, and the gradient norm at each x_k as grad/step_k
            run.maybe_evaluate(step, act_eval, agent.actor.variables)
            if run.maybe_checkpoint(step, agent, k_act, buf, obs):
                break
    saved = {"actor": agent.actor.params, "actor_batch_stats": agent.actor.batch_stats, "critic": agent.critic.params,
             "batch_stats": agent.critic.batch_stats, "log_alpha": agent.log_alpha.params["log_alpha"]}
    return run.finish(agent, update, MODEL_CONFIG, saved)


def main(argv=None) -> int:
    import tyro

    args = tyro.cli(Args, args=argv)
    with ExitStatus(__file__) as status:
        check_args(args)
        if args.eval_only:
            eval_only(args, ALGO, MODEL_CONFIG, load_actor)
        else:
            train(args, prepare_resume(args, ALGO, MODEL_CONFIG, check_args) if args.resume else None)
    return status.code


if __name__ == "__main__":
    sys.exit(main())
