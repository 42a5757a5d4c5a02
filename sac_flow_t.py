"""SAC Flow-T: SAC on a K-step flow policy with a Transformer-decoded velocity, in one JAX/Flax file.

The actor is a flow rollout x_{k+1} = x_k + dt v(s, x_k, t_k) + std_k eps_k, a = tanh(x_K): a residual RNN in k,
whose gradients explode or vanish. Flow-T decodes the velocity with a small Transformer: one action-time token
(x_k, t_k) is refined by blocks of self-attention (diagonal mask: the token sees only itself, so the flow stays
Markov), cross-attention to a state token and a feed-forward layer. The noise on every step makes the path density,
SAC's log pi, tractable. Defaults are the authors' code (batch renormalisation of s, of x_k and after each sublayer;
noise sigma dt on the velocity; sigma from the decoder output; log pi in the env's action units); flags give the rest.

| paper | what | here |
|---|---|---|
| Eq. 7-9 | x_k, t_k token; diagonal self-, cross-attention; FFN | DecodedVelocity, DecoderBlock, MultiHeadAttention |
| Eq. 4, 13 | the K-step noise-augmented rollout | flow_rollout, step_std, FlowPolicy |
| Eq. 13-14 | plain drift b = v, or the marginal-preserving drift | plain_drift, marginal_drift |
| Eq. 15 | path log-density with every -log std term and the tanh Jacobian | path_log_prob, tanh_log_det |
| Eq. 20-21 | critic: y = r + gamma (1 - d) (min Q(s', a') - alpha log pi(a'|s')) | critic_loss, update_critic |
| Eq. 22 | actor: mean(alpha log pi - min Q(s, pi(s))) | actor_loss, update_actor |
| Eq. 24 | temperature on log alpha toward --target-entropy | alpha_loss_fn in update_actor |
| SAC's schedule | critics every step, actor and alpha every --policy-delay, one jitted call | make_update |
| CrossQ | batch-renorm critics, one (s, a) / (s', a') pass, no target net | BatchRenorm, NormedDense, CriticEnsemble |
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Callable, Literal, Optional

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
    """SAC Flow-T from scratch: its hyperparameters after the run flags of common/args.py."""

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
    """plain b = v (the authors'), or marginal: keeps the deterministic flow's final law (needs --step-noise sqrt-dt)"""
    step_noise: Literal["sigma-dt", "sqrt-dt"] = "sigma-dt"
    """sigma-dt: x_{k+1} = x_k + dt (v + sigma eps) (the authors'); sqrt-dt: std sigma sqrt(dt) (Euler-Maruyama)"""
    log_density: Literal["authors", "complete"] = "authors"
    """log pi: authors, their code's log N(x_0) + sum_k log N(eps_k) - log|da/dx_K|, without -log(sigma_k dt) terms (so
    entropy gives sigma no gradient; --target-entropy 0 was tuned for it); complete, Eq. 15 (retune --target-entropy)"""
    log_std_input: Literal["decoder", "obs-time"] = "decoder"
    """what gives log sigma: decoder, a linear head on the decoder output, which depends on (s, x_k, t_k) (the authors'
    code); obs-time, an MLP on (s, t_k) of --log-std-hidden units (the marginal drift needs sigma independent of x)"""
    actor_batch_norm: bool = True
    """batch renormalisation in the actor (the authors'): of s, of x_k, after each decoder sublayer (post-norm); batch
    statistics in the actor loss, running ones when acting and in the critic target; without it, pre-norm LayerNorm"""
    action_units: Literal["env", "unit"] = "env"
    """units of log pi: env, the env's own action bounds (the authors' tanh correction log(scale (1 - tanh^2)); it sets
    what --target-entropy means on tasks with bounds other than +-1, e.g. Humanoid's +-0.4); unit, actions in [-1, 1]"""
    d_model: int = 96
    """width of the action-time and state tokens (the feed-forward layer is 4 times wider)"""
    n_heads: int = 4
    """attention heads (must divide --d-model)"""
    n_layers: int = 2
    """decoder blocks"""
    log_std_hidden: int = 512
    """width of the two hidden layers of the log-std head (with --log-std-input obs-time)"""
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
    check_ranges(args, positive=["policy_lr", "q_lr", "alpha_lr", "alpha", "flow_steps", "d_model", "n_heads",
                                 "n_layers", "log_std_hidden", "n_critics", "critic_width", "policy_delay", "bn_eps"],
                 nonnegative=["renorm_warmup"], fraction=["adam_b1", "bn_momentum"], unit=["gamma"])
    if args.d_model < 4:
        raise ConfigError("--d-model must be at least 4 (the time and state encoders use d_model / 4), "
                          f"got {args.d_model}")
    if args.d_model % args.n_heads:
        raise ConfigError(f"--d-model {args.d_model} is not divisible by --n-heads {args.n_heads}; "
                          "--d-model must be a multiple of --n-heads")
    if not 0.0 < args.tau <= 1.0:
        raise ConfigError(f"--tau must be in (0.0, 1.0], got {args.tau}")
    if args.r_max < 1.0 or args.d_max < 0.0:
        raise ConfigError(f"--r-max must be >= 1 and --d-max >= 0, got {args.r_max} and {args.d_max}")
    if not args.log_std_min < args.log_std_max:
        raise ConfigError(f"--log-std-min {args.log_std_min} must be below --log-std-max {args.log_std_max}")
    if args.drift == "marginal" and args.step_noise != "sqrt-dt":
        raise ConfigError("--drift marginal needs --step-noise sqrt-dt "
                          f"(the Euler-Maruyama scaling it is derived for), got --step-noise {args.step_noise}")
    if args.drift == "marginal" and args.log_std_input == "decoder":
        raise ConfigError("--drift marginal needs a noise level independent of x_k: add --log-std-input obs-time "
                          "(--log-std-input decoder reads sigma from the decoder output, which depends on x_k)")
    check_run_args(args)  # the flags all scripts share, and the env id


def batch_renorm(args, train: bool, **kw) -> BatchRenorm:
    """A batch-renormalisation layer (common/layers.py: CrossQ's critics, the authors' actor) with this run's flags."""
    return BatchRenorm(train, args.bn_momentum, args.bn_eps, args.r_max, args.d_max, args.renorm_warmup, **kw)


# --- Actor: Flow-T velocity v(s, x_k, t_k), the log-std head, the rollout as one module ---


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention of `query` (B, L, d) over `memory` (B, M, d), `mask` (L, M) True where allowed;
    returns the output and the weights (B, heads, L, M). With one memory token (both of Flow-T's) every weight is 1:
    the output is out(value(memory)) to the bit, without the query and key projections (created at init regardless)."""

    d_model: int
    n_heads: int

    @nn.compact
    def __call__(self, query, memory, mask=None):
        head_dim = self.d_model // self.n_heads
        split = lambda y: y.reshape(y.shape[:-1] + (self.n_heads, head_dim))
        dense = lambda name: nn.Dense(self.d_model, name=name)
        value, out = dense("value"), dense("out")
        if memory.shape[-2] == 1 and not self.is_initializing():
            weights = jnp.ones(query.shape[:-2] + (self.n_heads, query.shape[-2], 1), query.dtype)
            return jnp.broadcast_to(out(value(memory)), query.shape), weights
        q, k, v = split(dense("query")(query)), split(dense("key")(memory)), split(value(memory))
        logits = jnp.einsum("blhd,bmhd->bhlm", q, k) / jnp.sqrt(head_dim)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        attended = jnp.einsum("bhlm,bmhd->blhd", weights, v).reshape(query.shape[:-1] + (self.d_model,))
        return out(attended), weights


class DecoderBlock(nn.Module):
    """One decoder block (Eq. 8): self-attention under a diagonal mask (each token attends only to itself, no mixing
    across rollout steps), cross-attention to the state, feed-forward (GELU). With `norm` (a batch-renorm factory, the
    authors' actor) post-norm x <- BRN(x + f(x)); without it pre-norm x <- x + f(LN(x)), an identity residual path."""

    d_model: int
    n_heads: int
    norm: Optional[Callable[..., nn.Module]] = None

    @nn.compact
    def __call__(self, tokens, state_tokens):
        attention = functools.partial(MultiHeadAttention, self.d_model, self.n_heads)
        sublayers = {"self": lambda y: attention(name="self_attention")(y, y, jnp.eye(y.shape[-2], dtype=bool))[0],
                     "cross": lambda y: attention(name="cross_attention")(y, state_tokens)[0],
                     "ffn": lambda y: nn.Dense(self.d_model)(nn.gelu(nn.Dense(4 * self.d_model)(y)))}
        for name, sublayer in sublayers.items():
            if self.norm is None:  # pre-norm
                tokens = tokens + sublayer(nn.LayerNorm(name=f"norm_{name}")(tokens))
            else:  # post-norm
                tokens = self.norm(name=f"norm_{name}")(tokens + sublayer(tokens))
        return tokens


class DecodedVelocity(nn.Module):
    """Flow-T (Eq. 7-9): token = W_x x_k + time_mlp(t_k), state token = enc(s); n_layers decoder blocks refine the
    token, a linear head gives v. With `norm` (the authors' actor) s is batch-renormalised before the state encoder,
    x_k by a layer of its own at each of the `flow_steps` steps, and the blocks post-norm; without it, pre-norm blocks
    and a final LayerNorm. `encode_state`: the state token, once per rollout; `__call__`: v and the decoder output."""

    act_dim: int
    d_model: int
    n_heads: int
    n_layers: int
    norm: Optional[Callable[..., nn.Module]] = None
    flow_steps: int = 1

    def setup(self):
        d = self.d_model
        self.time_mlp = [nn.Dense(d // 4), nn.Dense(d // 2), nn.Dense(d)]
        self.state_encoder = [nn.Dense(d // 2), nn.Dense(d)]
        self.action_embedding = nn.Dense(d)
        self.blocks = [DecoderBlock(d, self.n_heads, self.norm) for _ in range(self.n_layers)]
        if self.norm is None:
            self.norm_out = nn.LayerNorm()
        else:
            self.state_norm = self.norm()
            self.x_norms = [self.norm() for _ in range(self.flow_steps)]
        self.velocity_head = nn.Dense(self.act_dim)

    def encode_state(self, s):
        s = s if self.norm is None else self.state_norm(s)
        return self.state_encoder[1](nn.silu(self.state_encoder[0](s)))[..., None, :]

    def __call__(self, state_token, x, t, k: int = 0):
        time = self.time_mlp[2](nn.silu(self.time_mlp[1](nn.silu(self.time_mlp[0](t)))))
        token = (self.action_embedding(x if self.norm is None else self.x_norms[k](x)) + time)[..., None, :]
        for block in self.blocks:
            token = block(token, state_token)
        h = token[..., 0, :] if self.norm is not None else self.norm_out(token[..., 0, :])
        return self.velocity_head(h), h


def squash_log_std(raw, log_std_min: float, log_std_max: float):
    """Map a raw head output smoothly into [log_std_min, log_std_max] (the authors' tanh map)."""
    return log_std_min + 0.5 * (log_std_max - log_std_min) * (jnp.tanh(raw) + 1.0)


class LogStdHead(nn.Module):
    """log sigma = f(s, t_k), two ReLU layers, tanh-mapped to [log_std_min, log_std_max]: a noise level independent of
    x_k, as the marginal-preserving drift assumes (otherwise a divergence term of sigma^2 is missing)."""

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
    """pi(a|s): the K-step noise-augmented rollout as one module, so that the K steps share the batch-renorm layers as
    in the authors' actor. `train` uses batch statistics (the actor loss), otherwise running ones (acting, evaluation,
    the critic target). Returns flow_rollout's (action, log pi, path)."""

    args: "Args"
    act_dim: int
    train: bool = False

    @nn.compact
    def __call__(self, s, key, deterministic: bool = False, perturb=None, units_scale=1.0):
        args = self.args
        norm = functools.partial(batch_renorm, args, self.train) if args.actor_batch_norm else None
        velocity = DecodedVelocity(self.act_dim, args.d_model, args.n_heads, args.n_layers, norm, args.flow_steps,
                                   name="velocity")
        state_token = velocity.encode_state(s)
        if args.log_std_input == "decoder":  # the authors': a linear head on the decoder output
            decoder_head = nn.Dense(self.act_dim, name="log_std")
            log_std_of = lambda h, t_col: squash_log_std(decoder_head(h), args.log_std_min, args.log_std_max)
        else:
            head = LogStdHead(self.act_dim, args.log_std_hidden, args.log_std_min, args.log_std_max, name="log_std")
            log_std_of = lambda h, t_col: head(jnp.concatenate([s, t_col], axis=-1))

        def step(x, t, k):
            t_col = jnp.full(x.shape[:-1] + (1,), t)
            v, h = velocity(state_token, x, t_col, k)
            return v, log_std_of(h, t_col)

        return flow_rollout(step, s.shape[:-1] + (self.act_dim,), key, args.flow_steps, args.drift, args.step_noise,
                            deterministic, perturb, units_scale, args.log_density)


# --- The noise-augmented rollout and its path log-density (REFERENCE section 2, paper App. A) ---


def plain_drift(v, x, t, sigma):
    """The authors' step: b = v; the noise widens the final law beyond the deterministic flow's."""
    return v


def marginal_drift(v, x, t, sigma):
    """b = v + sigma^2 / 2 * score, with the straight-path score -(x - t v) / (1 - t) (Eq. 13-14): in continuous time
    the noisy rollout then ends in the deterministic flow's law. t < 1 on every step, so 1 - t > 0."""
    return v * (1.0 + sigma**2 * t / (2.0 * (1.0 - t))) - sigma**2 * x / (2.0 * (1.0 - t))


DRIFTS = {"plain": plain_drift, "marginal": marginal_drift}


def step_std(sigma, dt: float, step_noise: str):
    """A step's std: sigma (the authors' Flow-G), sigma dt (their Flow-T: noise on the velocity) or sigma sqrt(dt)."""
    return sigma * {"sigma": 1.0, "sigma-dt": dt, "sqrt-dt": dt**0.5}[step_noise]


def gaussian_log_prob(x, mean, std):
    """log N(x; mean, diag(std^2)), summed over the last axis, with its -log std terms."""
    z = (x - mean) / std
    return jnp.sum(-0.5 * z**2 - jnp.log(std) - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)


def tanh_log_det(x_final, scale):
    """log |da/dx_K| of a = tanh(x_K) * scale + bias, per dimension log(scale (1 - tanh^2) + 1e-6)."""
    return jnp.sum(jnp.log(scale * (1.0 - jnp.tanh(x_final) ** 2) + 1e-6), axis=-1)


def path_log_prob(xs, means, stds, scale=1.0, noises=None):
    """Joint log-density of the path (x_0, ..., x_K) and the squashed action (Eq. 15): log N(x_0; 0, I)
    + sum_k log N(x_{k+1}; x_k + dt b_k, std_k^2 I) - log |da/dx_K|, every -log std term included; `scale` is the
    action's half-range in the units the density is measured in. Given the step `noises` eps_k, the authors' form
    (--log-density authors): log N(eps_k; 0, I) for each step, without the -log std_k terms."""
    steps = zip(xs[1:], means, stds) if noises is None else ((eps, 0.0, 1.0) for eps in noises)
    log_prob = gaussian_log_prob(xs[0], 0.0, 1.0)
    for x, mean, std in steps:
        log_prob = log_prob + gaussian_log_prob(x, mean, std)
    return log_prob - tanh_log_det(xs[-1], scale)


def flow_rollout(step_fn, shape, key, steps: int, drift: str = "plain", step_noise: str = "sqrt-dt",
                 deterministic: bool = False, perturb=None, units_scale=1.0, log_density: str = "complete"):
    """Sample a = tanh(x_K) by the noisy rollout (Eq. 13): x_0 ~ N(0, I), x_{k+1} = x_k + dt b_k + std_k eps_k,
    t_k = k / K, std_k = step_std(sigma_k), with (v, log sigma) = `step_fn(x, t, k)`. Deterministic: x_0 = 0 and no
    step noise, the Euler-integrated flow ODE (both drifts reduce to v at sigma = 0). `perturb` (K, ..., act_dim),
    zeros, is added to each x_k so that its gradient is d loss / d x_k (the rollout's backward pass as an RNN). log pi
    is in units where the action's half-range is `units_scale`, in the `log_density` form of path_log_prob. Returns
    the action, log pi (None when deterministic) and the path with the mean log sigma."""
    keys = jax.random.split(key, steps + 1)
    x = jnp.zeros(shape) if deterministic else jax.random.normal(keys[0], shape)
    dt = 1.0 / steps
    xs, means, stds, log_stds, noises = [], [], [], [], []
    for k in range(steps):
        xs.append(x)
        if perturb is not None:
            # Only into step k, not the density's x_k: with the noise held fixed (reparameterised), the gradient is
            # the recurrence's own d loss / d x_k, without the previous transition's score term -(x_k - mean) / std^2.
            x = x + perturb[k]
        t = k * dt
        v, log_std = step_fn(x, t, k)
        if deterministic:
            x = x + dt * v
            continue
        sigma = jnp.exp(log_std)
        mean = x + dt * DRIFTS[drift](v, x, t, sigma)
        std = step_std(sigma, dt, step_noise)
        noises.append(jax.random.normal(keys[k + 1], shape))
        x = mean + std * noises[-1]
        means.append(mean)
        stds.append(std)
        log_stds.append(log_std)
    xs.append(x)
    action = jnp.tanh(x)
    if deterministic:
        return action, None, {"xs": xs}
    log_pi = path_log_prob(xs, means, stds, units_scale, noises if log_density == "authors" else None)
    return action, log_pi, {"xs": xs, "log_std": jnp.mean(jnp.stack(log_stds))}


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
    """`n_critics` independent critics as one vmapped module; returns Q of shape (n_critics, batch). `train` selects
    batch statistics (and updates the running ones) or the running statistics."""

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
    """The jitted gradient step of every seed: sample a batch, update the critics and, every `policy_delay` critic
    updates, the actor and log alpha. The buffer is only read: the newest transition goes in by its own donated call
    (here XLA would copy it whole each step). `units_scale`: the env's action half-range (--action-units env)."""
    scale = units_scale if args.action_units == "env" else 1.0

    def update(agent: Agent, buf: ReplayBuffer, do_actor):
        key, k_batch, k_next, k_pi = jax.random.split(agent.key, 4)
        b = buffer_sample(buf, k_batch, args.batch_size)
        critic, critic_target, info = update_critic(args, act_dim, agent, b, k_next, scale)
        carry = (agent.actor, agent.log_alpha, agent.actor_info)
        actor_step = lambda c: update_actor(args, act_dim, agent.replace(actor=c[0], log_alpha=c[1]),
                                            critic, b, k_pi, scale)
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

    # Not donated: aliased to the outputs, XLA first copied every critic weight and both Adam moments; fresh outputs
    # are faster and bit-identical (docs/performance.md). With the seed sharding kept, the next call reuses the compile.
    return jax.jit(update_seeds, out_shardings=sharding)


# --- Acting, evaluation, saving, loading ---


def make_act(args: Args, act_dim: int, num_seeds: int):
    """Jitted (evaluation, exploration) actions of all seeds from stacked (actor variables, obs, key), running stats."""
    policy = FlowPolicy(args, act_dim, train=False)

    def act(deterministic: bool, actor_vars, obs, key):
        key, sub = jax.random.split(key)
        return policy.apply(actor_vars, obs[None], sub, deterministic)[0][0], key

    jitted = lambda deterministic: jax.jit(seed_map(functools.partial(act, deterministic), num_seeds))
    return jitted(args.eval_deterministic), jitted(False)


ALGO = "sac_flow_t"
BEFORE = {"log_density": "complete"}  # what checkpoints written before --log-density ran with
MODEL_CONFIG = ("env_id", "flow_steps", "drift", "step_noise", "d_model", "n_heads", "n_layers", "log_std_input",
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
            run.log(step, episodes, info)  # grad/step_k: the actor-loss gradient's norm at x_k (the paper's Fig. 13)
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
            train(args, prepare_resume(args, ALGO, MODEL_CONFIG, check_args, before=BEFORE) if args.resume else None)
    return status.code


if __name__ == "__main__":
    sys.exit(main())
