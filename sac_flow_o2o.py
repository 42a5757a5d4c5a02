"""SAC Flow offline-to-online: pretrain a flow policy on demonstrations, then fine-tune it online with SAC kept near
the data, in one JAX/Flax file (the paper's second pipeline, for sparse-reward manipulation).

The actor is a K-step noisy flow rollout to a chunk of H actions, tanh(x_K), with Flow-G's gated or Flow-T's decoded
velocity (--velocity), played open-loop; the critics score (s_t, a_{t:t+H}) by H-step returns (QC-FQL's layout).

The run's steps are the --offline-steps gradient steps on the dataset, then the --total-timesteps online env steps
(step offline_steps + j is env step j); logs, evaluations, checkpoints and --resume count them so (common/run.py).

| paper | what | where |
|---|---|---|
| Eq. 3 | E ||v(s, x_t, t) - (x_1 - x_0)||^2, x_t = (1 - t) x_0 + t x_1 | flow_matching_loss, flow_matching_step |
| Eq. 6 | Flow-G velocity v = sigmoid(g) * (h - x) | AuthorsGatedVelocity; --architecture from-scratch: GatedVelocity |
| Eq. 7-9 | Flow-T: decoder blocks over one action-time token | DecodedVelocity (DecoderBlock, MultiHeadAttention) |
| Eq. 13 | noise-augmented rollout, fixed noise sigma_k sqrt(dt) = --noise-std | flow_rollout, make_sampler |
| Eq. 15 | path log-density log pi = log N(x_0) + sum_k log N(x_{k+1}; mean_k, std_k) - log|da/dx_K| | path_log_prob |
| Eq. 12 | actor: beta ||a_pi - a_data||^2 + mean(alpha log pi - mean_i Q_i(s, a_pi)) | bc_loss, eq12_step |
| H-step TD | y = R_t + gamma^H (1 - done) (mean_i Q'_i(s', a') - alpha log pi(a'|s')) | sample_chunks, chunk_td_loss |
| alpha | authors: alpha (mean log pi - target); Eq. 24: alpha (-mean log pi - target) | alpha_loss |
| schedules | offline: Eq. 3 (three-phase: then Eq. 12 + alpha, same batch); online: Eq. 12 + alpha | make_updates |
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import struct
from flax.training.train_state import TrainState

from common.args import ConfigError, RunArgs, check_ranges, check_run_args
from common.checkpoint import finite_flags, restore_tree
from common.datasets import ROBOMIMIC_ID, load_dataset, robomimic_task
from common.env import next_actions
from common.run import ExitStatus, TrainingRun, eval_only, prepare_resume
from common.seeds import seed_map


@dataclass
class Args(RunArgs):
    """SAC Flow offline-to-online (Flow-G or Flow-T velocity): pretrain on --dataset, then fine-tune online."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    env_id: str = "cube-double-singletask-task2-v0"
    """the online env: an OGBench single-task id or a Gymnasium MuJoCo id whose sizes match the dataset"""
    total_timesteps: Annotated[int, tyro.conf.arg(aliases=("--online-steps",))] = 1_000_000
    """online env steps after --offline-steps, each a gradient step from --learning-starts on; 0: pretraining only"""
    eval_every: int = 100_000
    """evaluate every this many steps (offline steps count first), and at the end of the offline phase"""
    eval_episodes: int = 50
    """episodes per evaluation (sampled with --act-noise-std, as acting); 0: no evaluation"""
    dataset: Optional[str] = None
    """demonstrations, required to train: OGBench .npz or Robomimic low-dim .hdf5 (benchmarks/make_dataset.py)"""
    dataset_obs_keys: Optional[tuple[str, ...]] = None
    """Robomimic obs keys concatenated into the observation (default: its low-dim keys, else every key of the file)"""
    schedule: Literal["three-phase", "two-phase"] = "three-phase"
    """three-phase (the authors' main_action_reg_three_phase.py): each offline step runs critics + flow matching, then
    critics + Eq. 12 actor + alpha on the same batch; two-phase (the paper's): offline, critics + flow matching only"""
    offline_steps: int = 1_000_000
    """gradient steps on the dataset alone"""
    learning_starts: int = 5000
    """env steps before the first online update (the authors' start_training, whose first update is a step earlier)"""
    horizon: int = 5
    """chunk length H: the actor emits H actions, played open-loop; the critics score chunks by H-step returns"""
    batch_size: int = 256
    """chunks per gradient step"""
    learning_rate: Annotated[float, tyro.conf.arg(aliases=("--lr",))] = 3e-4
    """Adam learning rate (default betas) of the actor, the critics and log alpha"""
    gamma: float = 0.99
    """discount factor (gamma^H between chunks)"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    n_critics: int = 2
    """critics in the ensemble (the target takes their mean, as the authors' q_agg=mean)"""
    critic_width: int = 512
    """width of each critic's hidden layers (Dense, GELU, LayerNorm)"""
    critic_depth: int = 4
    """hidden layers of each critic"""
    velocity: Literal["gated", "decoded"] = "gated"
    """gated: Flow-G's v = z * (h - x); decoded: Flow-T's decoder over one action-time token"""
    architecture: Literal["authors", "from-scratch"] = "authors"
    """authors: their offline-to-online actors (Flow-G: a 4-layer GELU candidate on [s, x, raw t]; Flow-T: post-norm
    blocks); from-scratch: sac_flow_g.py's and sac_flow_t.py's modules, without their batch renormalisation"""
    hidden_dim: int = 512
    """Flow-G: width of the candidate's hidden layers (from-scratch: and of the gate's)"""
    gate_dim: int = 256
    """Flow-G with --architecture authors: width of the gate's hidden layer"""
    time_emb_dim: int = 32
    """Flow-G with --architecture from-scratch: size of the sinusoidal time embedding (half as many frequencies)"""
    d_model: int = 128
    """Flow-T: width of the action-time and state tokens (the authors' offline-to-online 128; from scratch, 96)"""
    n_heads: int = 4
    """Flow-T: attention heads (must divide --d-model)"""
    n_layers: int = 2
    """Flow-T: decoder blocks"""
    flow_steps: int = 4
    """rollout steps K, for training, acting and evaluation"""
    drift: Literal["plain", "marginal"] = "plain"
    """the rollout's drift: plain b = v (the authors'), or marginal, which keeps the noiseless flow's final law"""
    noise_std: float = 0.05
    """std of each rollout step's fixed noise in the Eq. 12 actor loss (the authors' code; the paper's table: 0.10)"""
    act_noise_std: float = 0.02
    """that std when acting, evaluating and sampling the critic target's next chunk (the authors' inference noise)"""
    flow_target: Literal["action", "atanh"] = "action"
    """x_1 of Eq. 3, matched by the pre-tanh rollout output: the data action itself (the authors'), or its atanh"""
    bc_weight: Optional[float] = None
    """beta of Eq. 12 (offline: three-phase only; online unless --online-bc-weight); unset: the paper's Table 4 (300
    cube-double and scene, 100 cube-triple and cube-quadruple, Robomimic 10000 offline and 1000 online), else 100"""
    online_bc_weight: Optional[float] = None
    """beta of Eq. 12 in the online phase (the authors reset it there, their --online_alpha); unset: as above"""
    alpha: float = 0.2
    """initial entropy coefficient"""
    autotune: bool = True
    """tune log alpha toward --target-entropy (otherwise alpha stays at --alpha)"""
    target_entropy: float = 0.0
    """entropy target of the alpha update (the authors' 0)"""
    alpha_loss: Literal["authors", "sac"] = "authors"
    """authors: alpha (mean log pi - target), their code's sign, which lowers alpha while log pi is above the target
    (always, with fixed noise); sac: alpha (-mean log pi - target) (Eq. 24), which then raises alpha without bound"""
    sparse: bool = False
    """sparse rewards, dataset and online: -1 where the (shifted) reward is not 0, else 0 (the authors' --sparse)"""
    buffer_size: int = 2_000_000
    """a ring of max(--buffer-size, dataset + 1) rows, the dataset first; once full, new rows overwrite the oldest"""
    robomimic_reward_shift: bool = True
    """subtract 1 from a Robomimic task's rewards, dataset and online ((0, 1) -> (-1, 0)), as the authors' main.py"""


# The paper's Table 4 (Flow-G and Flow-T): beta of Eq. 12 per task family, (offline, online); Robomimic's "10000/1000"
# as 10000 then 1000, because the authors' three-phase script resets it online (line 235) and A.6 says to anneal.
BC_WEIGHTS = {"cube-double": (300.0, 300.0), "scene": (300.0, 300.0), "cube-triple": (100.0, 100.0),
              "cube-quadruple": (100.0, 100.0), "lift": (10000.0, 1000.0), "can": (10000.0, 1000.0),
              "square": (10000.0, 1000.0)}
FALLBACK_BC_WEIGHT = 100.0  # the authors' default --agent.alpha and --online_alpha
OGBENCH_FAMILIES = ("cube-double", "cube-triple", "cube-quadruple", "scene")


def task_family(env_id: str, robomimic: Optional[str] = None) -> Optional[str]:
    """The row of BC_WEIGHTS for a run: its Robomimic task, else the OGBench family of its env id."""
    if robomimic is not None:
        return robomimic
    return next((f for f in OGBENCH_FAMILIES if env_id.removeprefix("visual-").startswith(f + "-")), None)


def bc_weights(args: Args, family: Optional[str]) -> tuple[float, float, str]:
    """(offline beta, online beta, where they come from): --bc-weight, else the family's row, else the fallback;
    --online-bc-weight replaces the online one."""
    if args.bc_weight is not None:
        offline, online, source = args.bc_weight, args.bc_weight, "--bc-weight"
    elif family in BC_WEIGHTS:
        (offline, online), source = BC_WEIGHTS[family], f"the paper's Table 4 for {family}"
    else:
        offline = online = FALLBACK_BC_WEIGHT
        source = f"no paper value for {args.env_id}: the fallback {FALLBACK_BC_WEIGHT:g} (set --bc-weight)"
    return offline, online if args.online_bc_weight is None else args.online_bc_weight, source


def check_args(args: Args) -> None:
    """Refuse impossible settings with one line, before anything is built."""
    if args.dataset is None and not (args.resume or args.eval_only):
        raise ConfigError("--dataset is required: an OGBench .npz or a Robomimic .hdf5 "
                          "(benchmarks/make_dataset.py makes one)")
    check_ranges(args, positive=["horizon", "buffer_size", "learning_rate", "n_critics", "critic_width", "critic_depth",
                                 "hidden_dim", "gate_dim", "d_model", "n_heads", "n_layers", "flow_steps", "noise_std",
                                 "act_noise_std", "alpha"],
                 nonnegative=["offline_steps", "bc_weight", "online_bc_weight"], unit=["gamma"])
    if args.time_emb_dim < 4 or args.time_emb_dim % 2:
        raise ConfigError(f"--time-emb-dim must be an even number >= 4, got {args.time_emb_dim}")
    if args.d_model < 4 or args.d_model % args.n_heads:
        raise ConfigError(f"--d-model must be at least 4 and a multiple of --n-heads {args.n_heads}, "
                          f"got {args.d_model}")
    if not 0.0 < args.tau <= 1.0:
        raise ConfigError(f"--tau must be in (0.0, 1.0], got {args.tau}")
    if ROBOMIMIC_ID.fullmatch(args.env_id):
        raise ConfigError(f"--env-id {args.env_id!r} is a Robomimic task, whose simulator (robosuite) is not wired "
                          "into this script; its .hdf5 runs with a Gymnasium or OGBench --env-id of the same sizes")
    check_run_args(args)  # the flags all scripts share, and the env id


# --- Velocity networks: Flow-G (gated) and Flow-T (decoded), as in sac_flow_g.py / sac_flow_t.py ---


class TimeEmbedding(nn.Module):
    """sin and cos of t at dim/2 geometric frequencies from 1 to 1/10000, then Dense 2*dim -> swish -> Dense dim."""

    dim: int

    @nn.compact
    def __call__(self, t):
        half = self.dim // 2
        angles = t * jnp.exp(-jnp.log(10000.0) * jnp.arange(half) / (half - 1))
        features = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
        return nn.Dense(self.dim)(nn.swish(nn.Dense(2 * self.dim)(features)))


def gate(u, width: int, out: int):
    """Flow-G's gate sigmoid(g(u)), g one swish layer whose output starts at zero weights and bias 5: z = 0.993, so each
    step starts near x + dt (h - x) and learns where to hold x back, bounding how much it can amplify the gradient."""
    logit = nn.Dense(out, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.constant(5.0),
                     name="gate_out")(nn.swish(nn.Dense(width, name="gate_hidden")(u)))
    return nn.sigmoid(logit)


class GatedVelocity(nn.Module):
    """Flow-G (Eq. 6) from scratch: v = z * (h - x), z and h one swish layer each on [s, x, TimeEmbedding(t)]."""

    act_dim: int
    hidden_dim: int
    time_emb_dim: int

    @nn.compact
    def __call__(self, s, x, t):
        features = jnp.concatenate([s, x, TimeEmbedding(self.time_emb_dim)(t)], axis=-1)
        z = gate(features, self.hidden_dim, self.act_dim)
        self.sow("intermediates", "gate", z)
        h = nn.swish(nn.Dense(self.hidden_dim, name="candidate_hidden")(features))
        return z * (nn.Dense(self.act_dim, name="candidate_out")(h) - x)


class AuthorsGatedVelocity(nn.Module):
    """The authors' o2o Flow-G (their ActorVectorFieldGRU): on [s, x, raw t], h a 4-layer GELU MLP (Xavier-uniform)."""

    act_dim: int
    hidden_dim: int
    gate_dim: int

    @nn.compact
    def __call__(self, s, x, t):
        h = u = jnp.concatenate([s, x, t], axis=-1)
        xavier = nn.initializers.xavier_uniform()
        for i in range(4):
            h = nn.gelu(nn.Dense(self.hidden_dim, kernel_init=xavier, name=f"candidate_{i}")(h))
        h = nn.Dense(self.act_dim, kernel_init=xavier, name="candidate_out")(h)
        return gate(u, self.gate_dim, self.act_dim) * (h - x)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention of `query` (B, L, d) over `memory` (B, M, d), where `mask` (L, M) allows."""

    d_model: int
    n_heads: int

    @nn.compact
    def __call__(self, query, memory, mask=None):
        head_dim = self.d_model // self.n_heads
        split = lambda y: y.reshape(y.shape[:-1] + (self.n_heads, head_dim))
        q = split(nn.Dense(self.d_model, name="query")(query))
        k = split(nn.Dense(self.d_model, name="key")(memory))
        v = split(nn.Dense(self.d_model, name="value")(memory))
        logits = jnp.einsum("blhd,bmhd->bhlm", q, k) / jnp.sqrt(head_dim)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        out = jnp.einsum("bhlm,bmhd->blhd", jax.nn.softmax(logits, axis=-1), v)
        return nn.Dense(self.d_model, name="out")(out.reshape(query.shape[:-1] + (self.d_model,)))


class DecoderBlock(nn.Module):
    """One decoder block (Eq. 8): self-attention under a diagonal mask (no mixing across rollout steps), cross-attention
    to the state, GELU feed-forward; each x <- x + f(LN(x)) (from scratch), or x <- LN(x + f(x)) with `post_norm`."""

    d_model: int
    n_heads: int
    post_norm: bool = False

    @nn.compact
    def __call__(self, tokens, state_tokens):
        diagonal = jnp.eye(tokens.shape[-2], dtype=bool)
        sublayers = {
            "self": lambda y: MultiHeadAttention(self.d_model, self.n_heads, name="self_attention")(y, y, diagonal),
            "cross": lambda y: MultiHeadAttention(self.d_model, self.n_heads, name="cross_attention")(y, state_tokens),
            "ffn": lambda y: nn.Dense(self.d_model)(nn.gelu(nn.Dense(4 * self.d_model)(y))),
        }
        for name, sublayer in sublayers.items():
            norm = nn.LayerNorm(name=f"norm_{name}")
            tokens = norm(tokens + sublayer(tokens)) if self.post_norm else tokens + sublayer(norm(tokens))
        return tokens


class DecodedVelocity(nn.Module):
    """Flow-T (Eq. 7-9): token = W_x x_k + time_mlp(t_k), state token = enc(s) (`encode_state`, once per rollout);
    n_layers decoder blocks refine the token (one per rollout step, so with the diagonal mask its self-attention
    weight is exactly 1); a final LayerNorm (pre-norm blocks only) and a linear head give v."""

    act_dim: int
    d_model: int
    n_heads: int
    n_layers: int
    post_norm: bool = False

    def setup(self):
        d = self.d_model
        self.time_mlp = [nn.Dense(d // 4), nn.Dense(d // 2), nn.Dense(d)]
        self.state_encoder = [nn.Dense(d // 2), nn.Dense(d)]
        self.action_embedding = nn.Dense(d)
        self.blocks = [DecoderBlock(d, self.n_heads, self.post_norm) for _ in range(self.n_layers)]
        if not self.post_norm:
            self.norm_out = nn.LayerNorm()
        self.velocity_head = nn.Dense(self.act_dim)

    def encode_state(self, s):
        return self.state_encoder[1](nn.silu(self.state_encoder[0](s)))[..., None, :]

    def __call__(self, state_token, x, t):
        time = self.time_mlp[2](nn.silu(self.time_mlp[1](nn.silu(self.time_mlp[0](t)))))
        token = (self.action_embedding(x) + time)[..., None, :]
        for block in self.blocks:
            token = block(token, state_token)
        h = token[..., 0, :]
        return self.velocity_head(h if self.post_norm else self.norm_out(h))


class ChunkVelocity(nn.Module):
    """v(s, x_k, t_k) over a whole chunk (H * act_dim), per --velocity and --architecture (the noise is fixed)."""

    args: "Args"
    chunk_dim: int

    @nn.compact
    def __call__(self, s, x, t):
        a, authors = self.args, self.args.architecture == "authors"
        if a.velocity == "decoded":
            decoded = DecodedVelocity(self.chunk_dim, a.d_model, a.n_heads, a.n_layers, post_norm=authors,
                                      name="velocity")
            return decoded(decoded.encode_state(s), x, t)
        if authors:
            return AuthorsGatedVelocity(self.chunk_dim, a.hidden_dim, a.gate_dim, name="velocity")(s, x, t)
        return GatedVelocity(self.chunk_dim, a.hidden_dim, a.time_emb_dim, name="velocity")(s, x, t)


make_velocity = ChunkVelocity  # make_velocity(args, chunk_dim), as make_critics(args)


# --- The noise-augmented rollout and its path log-density (Eq. 13-15) ---


# The drift b of a rollout step (Eq. 13-14). plain (the authors'): b = v, whose noise widens the final law beyond
# the deterministic flow's. marginal: b = v + sigma^2 / 2 * score, with the straight-path score -(x - t v) / (1 - t),
# so that in continuous time the noisy rollout ends in the deterministic flow's law (t < 1 on every step).
DRIFTS = {"plain": lambda v, x, t, sigma: v,
          "marginal": lambda v, x, t, sigma: (v * (1.0 + sigma**2 * t / (2.0 * (1.0 - t)))
                                              - sigma**2 * x / (2.0 * (1.0 - t)))}


def path_log_prob(xs, means, std):
    """Joint log-density of the path (x_0, ..., x_K) and the squashed chunk a = tanh(x_K) (Eq. 15):
    log N(x_0; 0, I) + sum_k log N(x_{k+1}; means_k, std^2 I) - sum log(1 - tanh(x_K)^2 + 1e-6)."""
    # log N(x; m, diag(std^2)), summed over the last axis
    log_n = lambda x, m, std: jnp.sum(-0.5 * ((x - m) / std) ** 2 - jnp.log(std) - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)
    log_prob = log_n(xs[0], 0.0, 1.0)
    for x, mean in zip(xs[1:], means):
        log_prob = log_prob + log_n(x, mean, std)
    return log_prob - jnp.sum(jnp.log(1.0 - jnp.tanh(xs[-1]) ** 2 + 1e-6), axis=-1)


def flow_rollout(velocity, shape, key, steps: int, log_sigma, drift: str = "plain"):
    """a = tanh(x_K) and its log pi (Eq. 15) by the noise-augmented rollout (Eq. 13) with fixed noise: x_0 ~ N(0, I),
    x_{k+1} = x_k + dt b_k + sigma sqrt(dt) eps_k, t_k = k / K, b_k the drift of velocity(x_k, t_k)."""
    keys = jax.random.split(key, steps + 1)
    dt, sigma = 1.0 / steps, jnp.exp(log_sigma)
    std = sigma * dt**0.5
    xs, means = [jax.random.normal(keys[0], shape)], []
    for k in range(steps):
        x, t = xs[-1], k * dt
        means.append(x + dt * DRIFTS[drift](velocity(x, t), x, t, sigma))
        xs.append(means[-1] + std * jax.random.normal(keys[k + 1], shape))
    return jnp.tanh(xs[-1]), path_log_prob(xs, means, std)


def make_sampler(args: Args, velocity_apply, chunk_dim: int):
    """pi(chunk | s) with fixed noise: sampler(params, s, key, noise_std) -> (chunk in [-1, 1], log pi). Every
    step's Gaussian has std noise_std, i.e. sigma = noise_std / sqrt(dt) in flow_rollout's terms."""
    log_sqrt_k = 0.5 * jnp.log(float(args.flow_steps))

    def sample(params, s, key, noise_std):
        shape = s.shape[:-1] + (chunk_dim,)
        velocity = lambda x, t: velocity_apply(params, s, x, jnp.full(x.shape[:-1] + (1,), t))
        log_sigma = jnp.full(shape, jnp.log(noise_std) + log_sqrt_k)
        return flow_rollout(velocity, shape, key, args.flow_steps, log_sigma, args.drift)

    return sample


# --- The chunk critic (QC-FQL's layout) and the agent ---


class ChunkQNetwork(nn.Module):
    """Q(s, a_{t:t+H}): `depth` layers of Dense (Xavier-uniform), GELU and LayerNorm, then Dense 1."""

    width: int
    depth: int

    @nn.compact
    def __call__(self, s, chunk):
        x = jnp.concatenate([s, chunk], axis=-1)
        for _ in range(self.depth):
            x = nn.LayerNorm()(nn.gelu(nn.Dense(self.width, kernel_init=nn.initializers.xavier_uniform())(x)))
        return nn.Dense(1, kernel_init=nn.initializers.xavier_uniform())(x).squeeze(-1)


def make_critics(args: Args) -> nn.Module:
    """`n_critics` chunk critics as one vmapped module; returns Q of shape (n_critics, batch)."""
    ensemble = nn.vmap(ChunkQNetwork, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                       out_axes=0, axis_size=args.n_critics)
    return ensemble(args.critic_width, args.critic_depth)


@struct.dataclass
class Agent:
    actor: TrainState  # the velocity field over whole chunks
    critic: TrainState
    critic_target: dict  # Polyak average of the critics' parameters
    log_alpha: TrainState
    key: jax.Array


def create_agent(args: Args, obs_dim: int, act_dim: int, key) -> Agent:
    chunk_dim = args.horizon * act_dim
    velocity, critics = make_velocity(args, chunk_dim), make_critics(args)
    k_actor, k_critic, key = jax.random.split(key, 3)
    s, a, t = jnp.zeros((1, obs_dim)), jnp.zeros((1, chunk_dim)), jnp.zeros((1, 1))
    adam = optax.adam(args.learning_rate)
    # The step counter an array from the start: one compiled signature.
    state = lambda fn, p: TrainState.create(apply_fn=fn, params=p, tx=adam).replace(step=jnp.zeros((), jnp.int32))
    actor = state(velocity.apply, velocity.init(k_actor, s, a, t))
    critic = state(critics.apply, critics.init(k_critic, s, a))
    log_alpha = state(None, {"log_alpha": jnp.log(jnp.float32(args.alpha))})
    return Agent(actor=actor, critic=critic, critic_target=jax.tree_util.tree_map(jnp.array, critic.params),
                 log_alpha=log_alpha, key=key)


# --- The chunk buffer: the dataset, then every online transition, in the order they happened ---


class ChunkBuffer(NamedTuple):
    """Transitions in order, `ends` marking each trajectory's last (episode end, time limit or a dataset's cut), so
    that H consecutive rows read as one chunk; a ring, the dataset first (`pos`: where the next row goes)."""

    obs: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_obs: jax.Array
    terminated: jax.Array
    ends: jax.Array
    pos: jax.Array
    size: jax.Array


class ChunkBatch(NamedTuple):
    obs: jax.Array  # (B, obs_dim): s_t
    actions: jax.Array  # (B, H, act_dim): a_t .. a_{t+H-1}
    valid: jax.Array  # (B, H): 1 where the action still belongs to s_t's trajectory
    returns: jax.Array  # (B,): sum_k gamma^k r_{t+k} over the valid steps
    discount: jax.Array  # (B,): gamma^H, or 0 when the chunk's trajectory terminated
    next_obs: jax.Array  # (B, obs_dim): s_{t+H}
    critic_valid: jax.Array  # (B,): 0 when the trajectory was cut (not terminated) before the chunk's last step


def chunk_buffer(data: dict, capacity: int) -> ChunkBuffer:
    """A buffer of `capacity` rows holding the dataset `data` (numpy arrays, load_dataset's fields) first."""
    n = len(data["obs"])
    padded = lambda x: jnp.zeros((capacity,) + np.shape(x)[1:], jnp.float32).at[:n].set(jnp.asarray(x, jnp.float32))
    fields = (padded(data[k]) for k in ("obs", "actions", "rewards", "next_obs", "terminated", "ends"))
    return ChunkBuffer(*fields, pos=jnp.asarray(n % capacity, jnp.int32), size=jnp.asarray(n, jnp.int32))


def chunk_add(buf: ChunkBuffer, obs, action, reward, next_obs, terminated, end) -> ChunkBuffer:
    i, capacity = buf.pos, buf.obs.shape[0]
    return ChunkBuffer(buf.obs.at[i].set(obs), buf.actions.at[i].set(action), buf.rewards.at[i].set(reward),
                       buf.next_obs.at[i].set(next_obs), buf.terminated.at[i].set(terminated), buf.ends.at[i].set(end),
                       pos=(i + 1) % capacity, size=jnp.minimum(buf.size + 1, capacity))


def sample_chunks(buf: ChunkBuffer, key, batch_size: int, horizon: int, gamma: float) -> ChunkBatch:
    """`batch_size` chunks of `horizon` rows, starting uniformly in [0, size - horizon] (the authors' sampler: once
    the ring has wrapped, a chunk may run across the write position). A chunk's return stops at the first termination
    or trajectory end; it bootstraps from s_{t+H} only if it reached its last step without terminating, and if cut
    short without terminating (a time limit, a demonstration's end) it has no valid target (`critic_valid` 0)."""
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


# --- Losses and update steps ---


def flow_matching_loss(v_pred, x0, x1, valid):
    """Eq. 3 on chunks (B, H, act_dim), `v_pred` taken at x_t; actions past their trajectory's end add 0 to the mean."""
    return jnp.mean(valid[..., None] * (v_pred - (x1 - x0)) ** 2)


def bc_loss(a_pi, a_data, valid):
    """The proximity term of Eq. 12, ||a_pi - a_data||^2, averaged like flow_matching_loss."""
    return jnp.mean(valid[..., None] * (a_pi - a_data) ** 2)


def alpha_loss(log_alpha, mean_log_pi, target_entropy: float, form: str):
    """authors: alpha (mean log pi - target) (their code's sign); sac: alpha (-mean log pi - target) (Eq. 24)."""
    sign = 1.0 if form == "authors" else -1.0
    return jnp.exp(log_alpha) * (sign * mean_log_pi - target_entropy)


def make_steps(args: Args, act_dim: int):
    """flow_matching_step(agent, b, key) and eq12_step(agent, b, key, bc_weight) on a ChunkBatch `b`. Like the
    authors' one combined loss, each takes every gradient at the parameters before the step (the actor's Q is the
    critic before its TD step, and the target critics move toward it, as their target_update does)."""
    B, chunk_dim = args.batch_size, args.horizon * act_dim
    velocity_apply, critic_apply = make_velocity(args, chunk_dim).apply, make_critics(args).apply
    sample = make_sampler(args, velocity_apply, chunk_dim)

    def chunk_td_loss(critic_params, agent: Agent, b, key):
        """H-step TD, a' sampled with --act-noise-std (the authors'); chunks with critic_valid 0 are left out."""
        alpha = jnp.exp(agent.log_alpha.params["log_alpha"])
        next_a, next_log_pi = sample(agent.actor.params, b.next_obs, key, args.act_noise_std)
        q_next = jnp.mean(critic_apply(agent.critic_target, b.next_obs, next_a), axis=0)
        y = jax.lax.stop_gradient(b.returns + b.discount * (q_next - alpha * next_log_pi))
        q = critic_apply(critic_params, b.obs, b.actions.reshape(B, chunk_dim))
        return jnp.mean(b.critic_valid * (q - y) ** 2), q

    td_grad = jax.value_and_grad(chunk_td_loss, has_aux=True)

    def apply(agent: Agent, critic_grads, **updates) -> Agent:
        target = optax.incremental_update(agent.critic.params, agent.critic_target, args.tau)
        return agent.replace(critic=agent.critic.apply_gradients(grads=critic_grads), critic_target=target, **updates)

    def flow_matching_step(agent: Agent, b, key):
        k_next, k_x0, k_t = jax.random.split(key, 3)
        (qf_loss, q), critic_grads = td_grad(agent.critic.params, agent, b, k_next)
        x1 = b.actions if args.flow_target == "action" else jnp.arctanh(jnp.clip(b.actions, -0.999, 0.999))
        x0 = jax.random.normal(k_x0, x1.shape)
        t = jax.random.uniform(k_t, (B, 1))
        x_t = (1.0 - t) * x0.reshape(B, chunk_dim) + t * x1.reshape(B, chunk_dim)
        fm = lambda p: flow_matching_loss(velocity_apply(p, b.obs, x_t, t).reshape(x1.shape), x0, x1, b.valid)
        flow_loss, actor_grads = jax.value_and_grad(fm)(agent.actor.params)
        agent = apply(agent, critic_grads, actor=agent.actor.apply_gradients(grads=actor_grads))
        return agent, {"qf_loss": qf_loss, "qf_values": jnp.mean(q), "flow_loss": flow_loss}

    def eq12_step(agent: Agent, b, key, bc_weight):
        k_next, k_pi = jax.random.split(key)
        (qf_loss, q), critic_grads = td_grad(agent.critic.params, agent, b, k_next)
        alpha = jnp.exp(agent.log_alpha.params["log_alpha"])

        def actor_loss(params):  # Eq. 12, a = pi(s) reparameterised through the noisy rollout
            a, log_pi = sample(params, b.obs, k_pi, args.noise_std)
            q_pi = jnp.mean(critic_apply(agent.critic.params, b.obs, a), axis=0)
            bc = bc_loss(a.reshape(b.actions.shape), b.actions, b.valid)
            return bc_weight * bc + jnp.mean(alpha * log_pi - q_pi), (bc, jnp.mean(log_pi), jnp.mean(q_pi))

        (loss, (bc, mean_log_pi, q_pi)), actor_grads = jax.value_and_grad(actor_loss, has_aux=True)(agent.actor.params)
        temperature = lambda p: alpha_loss(p["log_alpha"], mean_log_pi, args.target_entropy, args.alpha_loss)
        temp_loss, alpha_grads = jax.value_and_grad(temperature)(agent.log_alpha.params)
        log_alpha = agent.log_alpha.apply_gradients(grads=alpha_grads) if args.autotune else agent.log_alpha
        agent = apply(agent, critic_grads, actor=agent.actor.apply_gradients(grads=actor_grads), log_alpha=log_alpha)
        return agent, {"qf_loss": qf_loss, "qf_values": jnp.mean(q), "actor_loss": loss, "bc_loss": bc, "q_pi": q_pi,
                       "entropy": -mean_log_pi, "alpha": jnp.exp(log_alpha.params["log_alpha"]),
                       "alpha_loss": temp_loss}

    return flow_matching_step, eq12_step


def make_updates(args: Args, act_dim: int, offline_bc: float, online_bc: float, sharding=None):
    """The jitted offline and online updates of every seed (the agent donated), each on a batch of chunks from the
    device buffer. offline: flow_matching_step, then with three-phase eq12_step on the same batch; online: eq12_step."""
    flow_matching_step, eq12_step = make_steps(args, act_dim)
    with_flags = lambda info: {**info, "finite": finite_flags(info)}  # one flag per metric, for the divergence check

    def offline_update(agent: Agent, buf: ChunkBuffer):
        key, k_batch, k_fm, k_eq12 = jax.random.split(agent.key, 4)
        b = sample_chunks(buf, k_batch, args.batch_size, args.horizon, args.gamma)
        agent, info = flow_matching_step(agent.replace(key=key), b, k_fm)
        if args.schedule == "three-phase":
            agent, eq12_info = eq12_step(agent, b, k_eq12, offline_bc)
            info = {**eq12_info, "flow_loss": info["flow_loss"]}  # qf_* of the second critic step, as the authors log
        return agent, with_flags(info)

    def online_update(agent: Agent, buf: ChunkBuffer):
        key, k_batch, k_eq12 = jax.random.split(agent.key, 3)
        b = sample_chunks(buf, k_batch, args.batch_size, args.horizon, args.gamma)
        agent, info = eq12_step(agent.replace(key=key), b, k_eq12, online_bc)
        return agent, with_flags(info)

    # --debug-nans re-runs a call that made a NaN on its inputs, so they must then be kept.
    jitted = lambda update: jax.jit(seed_map(update, args.num_seeds), donate_argnums=() if args.debug_nans else 0,
                                    out_shardings=sharding)
    return jitted(offline_update), jitted(online_update)


# --- Acting and the training loop (the run around it, logs, evaluation, checkpoints: common/run.py) ---


def make_act(args: Args, velocity_apply, act_dim: int, num_seeds: int):
    """Jitted, seed-stacked (params, obs, key) -> (next chunk of H actions, key) with --act-noise-std (next_actions)."""
    sample = make_sampler(args, velocity_apply, args.horizon * act_dim)

    def act(params, obs, key):
        key, sub = jax.random.split(key)
        return sample(params, obs[None], sub, args.act_noise_std)[0][0].reshape(args.horizon, act_dim), key

    return jax.jit(seed_map(act, num_seeds))


def relabel(rewards, shift: float, sparse: bool):
    """Rewards as the authors' script trains on them: shifted by `shift`, then with --sparse -1 where not 0."""
    rewards = rewards + np.float32(shift)
    return -(rewards != 0).astype(np.float32) if sparse else rewards


def prepare_data(args: Args) -> tuple[dict, Optional[str], float]:
    """The dataset's transitions (rewards relabelled), the run's Robomimic task or None, and the reward shift: -1 for
    Robomimic (the authors' (0, 1) -> (-1, 0)) unless --no-robomimic-reward-shift."""
    data = load_dataset(args.dataset, args.env_id, args.dataset_obs_keys)
    if (n := len(data["obs"])) < args.horizon:
        raise ConfigError(f"--dataset holds {n} transitions, fewer than one chunk of --horizon {args.horizon}")
    robomimic = robomimic_task(args.env_id, args.dataset)
    shift = -1.0 if robomimic is not None and args.robomimic_reward_shift else 0.0
    if args.sparse and (top := np.max(data["rewards"] + np.float32(shift))) > 0:
        raise ConfigError(f"--sparse needs rewards <= 0 (OGBench's, or Robomimic's shifted); --dataset has rewards "
                          f"up to {top:g}")
    data["rewards"] = relabel(data["rewards"], shift, args.sparse)
    return data, robomimic, shift


ALGO = "sac_flow_o2o"
# What --eval-only needs to rebuild the actor and act as it did.
MODEL_CONFIG = ("env_id", "velocity", "architecture", "hidden_dim", "gate_dim", "time_emb_dim", "d_model", "n_heads",
                "n_layers", "flow_steps", "horizon", "drift", "act_noise_std")


def load_actor(args: Args, obs_dim: int, act_dim: int, raw: dict):
    """For --eval-only: a saved actor's parameters (refused if they do not fit) and its acting function."""
    chunk_dim = args.horizon * act_dim
    velocity = make_velocity(args, chunk_dim)
    template = velocity.init(jax.random.PRNGKey(0), *(jnp.zeros((1, n)) for n in (obs_dim, chunk_dim, 1)))
    return restore_tree(template, raw.get("actor"), args.checkpoint), make_act(args, velocity.apply, act_dim, 1)


def train(args: Args, resume=None) -> dict:
    """Train --num-seeds agents (or continue `resume` from prepare_resume): --offline-steps updates on the dataset,
    then --total-timesteps env steps acting in chunks; returns a summary. Every array has a leading seed axis."""
    data, robomimic, shift = prepare_data(args)
    offline_bc, online_bc, bc_source = bc_weights(args, task_family(args.env_id, robomimic))
    n_data, H = len(data["obs"]), args.horizon
    print(f"{n_data} transitions from {args.dataset}; chunks of {H} x {data['actions'].shape[1]} actions; schedule "
          f"{args.schedule}; BC weight {offline_bc:g} offline, {online_bc:g} online ({bc_source})"
          + (f"; Robomimic {robomimic}: rewards shifted by {shift:g}" if robomimic is not None else ""))
    buffer = (max(args.buffer_size, n_data + 1), lambda capacity, *_: chunk_buffer(data, capacity), chunk_add)
    run = TrainingRun(args, ALGO, __file__, resume, offline_steps=args.offline_steps, buffer=buffer)
    S, A = args.num_seeds, run.act_dim
    # The acting state: each seed's key, its current chunk and how many of that chunk's actions are left to play.
    acting = lambda keys: (keys, np.zeros((S, H, A), np.float32), np.zeros(S, np.int32))
    agent, (k_act, chunks, left), buf, obs = run.init_state(create_agent, acting)
    chunks, left = np.array(chunks), np.array(left)  # played on the host
    offline_update, online_update = make_updates(args, A, offline_bc, online_bc, run.sharding)
    act = make_act(args, agent.actor.apply_fn, A, S)
    info, no_episodes, all_seeds = None, [None] * S, np.ones(S, bool)
    with run:  # a signal finishes the step, checkpoints and stops; closes the logs and envs
        for step in run.steps():
            episodes = no_episodes
            if step <= args.offline_steps:
                agent, info = offline_update(agent, buf)
                run.check_update(step, info)  # a NaN or infinite loss stops the run
            else:
                actions, chunks, k_act = next_actions(act, agent.actor.params, obs, k_act, chunks, left, all_seeds)
                (o, a, r, next_o, terminated), obs, episodes = run.envs.step(obs, actions)
                ended = np.array([episode is not None for episode in episodes])
                left[ended] = 0  # a new episode starts with a new chunk
                r = relabel(r, shift, args.sparse)
                buf = run.buffer_add(buf, o, a, r, next_o, terminated, ended.astype(np.float32))
                if run.learns(step):
                    agent, info = online_update(agent, buf)
                    run.check_update(step, info)
                else:
                    info = None  # the offline phase's last losses are not logged again
            run.log(step, episodes, info)
            run.maybe_evaluate(step, act, agent.actor.params, now=step == args.offline_steps)
            if run.maybe_checkpoint(step, agent, (k_act, chunks, left), buf, obs):
                break
    summary = run.finish(agent, (offline_update, online_update), MODEL_CONFIG,
                         {"actor": agent.actor.params, "critic": agent.critic.params})
    return {**summary, "buffer": buf, "n_data": n_data, "bc_weights": (offline_bc, online_bc), "reward_shift": shift}


def main(argv=None) -> int:
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
