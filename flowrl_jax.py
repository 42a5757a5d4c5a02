"""FlowRL: a flow-based policy for online RL (Lv et al., 2025), in one JAX/Flax file.

The actor is a velocity field v(s, a_t, t); an action is the ODE solution from a0 ~ N(0, I)
(clamped to [-1, 1]) at t = 1, squashed by tanh (Eq. 8-9). The actor maximises Q^pi while a
weighted flow-matching term, an upper bound on the Wasserstein-2 distance to the best policy in the
buffer (Eq. 12-14), pulls it toward buffer actions that Q^beta* rates above the current policy.
Q^beta* and V are learned IQL-style by expectile regression (Eq. 18-19).

Defaults reproduce the authors' code (bytedance/FlowRL); where it differs from the paper a flag
gives the paper's version (see README.md).
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
    tau: float = 0.95
    """target-network rate: target <- tau * online + (1 - tau) * target (the authors use 0.95)"""
    batch_size: int = 256
    """batch size of every gradient step"""
    learning_starts: int = 5000
    """env steps of uniform random actions before the first gradient step"""
    learning_rate: float = 3e-4
    """Adam learning rate of the actor, both critics and V"""
    policy_frequency: int = 2
    """update the actor and the target networks every this many critic updates"""
    hidden_dim: int = 512
    """width of every hidden layer"""
    flow_steps: int = 1
    """ODE integration steps N from a0 to the action (acting, targets and evaluation)"""
    integrator: Literal["midpoint", "euler"] = "midpoint"
    """ODE solver: midpoint (the authors', 2 network calls per step) or Euler"""
    expectile: float = 0.9
    """expectile tau_e of the V regression on Q^beta* (Eq. 18)"""
    lamda: float = 0.1
    """lambda, the scale of the flow-matching weight w (Eq. 22)"""
    cfm_weighting: Literal["batch", "sample"] = "batch"
    """batch: the authors' mean(w) * mean(CFM); sample: the paper's per-sample w * CFM (Eq. 13, 22)"""
    cfm_target: Literal["action", "pre-tanh"] = "action"
    """flow-matching endpoint: the buffer action as the authors do, or its atanh (where the ODE ends)"""
    recent_frac: float = 0.2
    """share of each batch drawn from the newest --recent-size transitions (the rest uniformly)"""
    recent_size: int = 2048
    """how many of the newest transitions the recent share is drawn from"""
    eval_every: int = 10_000
    """evaluate every this many env steps"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    eval_deterministic: bool = False
    """evaluate from a0 = 0 instead of sampling a0 (the authors sample)"""
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
    positive = ["num_seeds", "total_timesteps", "buffer_size", "batch_size", "learning_rate", "hidden_dim", "flow_steps",
                "policy_frequency", "eval_every", "log_every", "lamda", "tau", "recent_size"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["learning_starts", "eval_episodes", "checkpoint_every"]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.keep_checkpoints < 1:
        raise ConfigError(f"--keep-checkpoints must be at least 1, got {args.keep_checkpoints}")
    if args.batch_size > args.buffer_size:
        raise ConfigError(f"--batch-size {args.batch_size} is above --buffer-size {args.buffer_size}; it must be at most the buffer size")
    for name, lo, hi in [("gamma", 0.0, 1.0), ("tau", 0.0, 1.0), ("recent_frac", 0.0, 1.0)]:
        if not lo <= getattr(args, name) <= hi:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {getattr(args, name)}")
    if not 0.0 < args.expectile < 1.0:
        raise ConfigError(f"--expectile must be in (0, 1), got {args.expectile}")
    check_run_flags(args)
    check_env_id(args.env_id)


# JAX and the env libraries load after the arguments are checked, so bad input fails fast.
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import struct  # noqa: E402
from flax.training.train_state import TrainState  # noqa: E402

from common.buffer import Batch, ReplayBuffer, buffer_add, buffer_init, buffer_sample  # noqa: E402
from common.checkpoint import (Diverged, StopOnSignal, adopt_saved_args, check_metrics, finite_flags,  # noqa: E402
                               first_nonfinite, load_model, prepare_run_dir, read_resume,
                               restore_training, restore_tree, resume_run_dir, save_checkpoint, save_model,
                               training_checkpoint, video_dir)
from common.env import SeedEnvs, env_dims, evaluate, seed_everything  # noqa: E402
from common.seeds import check_buffer_memory, per_seed, seed_map, seed_sharding  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Networks (the authors' layouts: Xavier-uniform weights, zero biases)
# ---------------------------------------------------------------------------------------------


def dense(features: int) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros)


class VelocityField(nn.Module):
    """v_theta(s, a_t, t): the actor (Eq. 9); t enters as a raw scalar."""

    act_dim: int
    hidden_dim: int

    @nn.compact
    def __call__(self, s, a_t, t):
        x = jnp.concatenate([s, a_t, t], axis=-1)
        x = nn.elu(nn.LayerNorm()(dense(self.hidden_dim)(x)))
        x = nn.elu(nn.LayerNorm()(dense(self.hidden_dim)(x)))
        return dense(self.act_dim)(x)


class ValueMLP(nn.Module):
    """One value head: the authors' LayerNorm MLP, used for Q (on [s, a]) and V (on s)."""

    hidden_dim: int

    @nn.compact
    def __call__(self, x):
        gelu = lambda y: nn.gelu(y, approximate=False)  # torch's nn.GELU
        x = dense(self.hidden_dim)(x)
        x = dense(self.hidden_dim)(nn.LayerNorm()(x))
        x = dense(self.hidden_dim)(gelu(nn.LayerNorm()(x)))
        x = dense(self.hidden_dim)(gelu(nn.LayerNorm()(x)))
        return dense(1)(nn.LayerNorm()(x)).squeeze(-1)


class TwinQ(nn.Module):
    """Two independent Q heads evaluated as one vmapped ensemble; returns (2, batch)."""

    hidden_dim: int
    num_heads: int = 2

    @nn.compact
    def __call__(self, s, a):
        ensemble = nn.vmap(ValueMLP, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=None, out_axes=0, axis_size=self.num_heads)
        return ensemble(self.hidden_dim)(jnp.concatenate([s, a], axis=-1))


# ---------------------------------------------------------------------------------------------
# The flow policy: base noise, ODE integration, squashing
# ---------------------------------------------------------------------------------------------


def sample_a0(key, shape):
    # The authors clamp the Gaussian base to [-1, 1].
    return jnp.clip(jax.random.normal(key, shape), -1.0, 1.0)


def integrate_flow(velocity, s, a0, flow_steps: int, integrator: str):
    """Solve da/dt = velocity(s, a, t) from t = 0 to 1 in `flow_steps` steps (Eq. 8-9).

    Returns the pre-tanh endpoint; gradients flow through every step."""
    dt = 1.0 / flow_steps
    a = a0
    ones = jnp.ones(a0.shape[:-1] + (1,), a0.dtype)
    for k in range(flow_steps):
        t = k * dt
        if integrator == "midpoint":
            a_mid = a + 0.5 * dt * velocity(s, a, t * ones)
            a = a + dt * velocity(s, a_mid, (t + 0.5 * dt) * ones)
        else:
            a = a + dt * velocity(s, a, t * ones)
    return a


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def expectile_loss(diff, expectile: float):
    """L_2^tau(u) = |tau - 1(u < 0)| u^2 averaged over the batch (Eq. 18), u = Q^beta*(s, a) - V(s)."""
    weight = jnp.where(diff < 0, 1.0 - expectile, expectile)
    return jnp.mean(weight * diff**2)


def flow_matching_weight(q_beta, q_pi, lamda: float):
    """w = f(Q^beta* - Q^pi) of Eq. 13-14 as the authors compute it: the advantage of the best
    buffer policy, relu'd, exp-normalised over the batch, scaled by lambda and clipped to [1e-3, 1]."""
    d = jax.nn.relu(q_beta - q_pi)
    return jnp.clip(lamda * jnp.exp(d - jnp.mean(d)), 1e-3, 1.0)


def weighted_cfm_loss(v_pred, target_velocity, w, per_sample: bool):
    """Weighted conditional flow matching (Eq. 13). The per-sample error is the mean over action
    dimensions. per_sample=False is the authors' reduction, mean(w) * mean(CFM)."""
    cfm = jnp.mean((v_pred - target_velocity) ** 2, axis=-1)
    if per_sample:
        return jnp.mean(w * cfm)
    return jnp.mean(w) * jnp.mean(cfm)


# ---------------------------------------------------------------------------------------------
# Agent state and the jitted update
# ---------------------------------------------------------------------------------------------


@struct.dataclass
class Agent:
    actor: TrainState
    critic: TrainState  # Q^pi, twin
    critic_target: dict
    q_beta: TrainState  # Q^beta*, twin
    q_beta_target: dict
    value: TrainState  # V^beta*
    key: jax.Array
    updates: jax.Array  # critic updates done so far
    actor_info: dict  # metrics of the latest actor update, for logging between actor updates


def create_agent(args: Args, obs_dim: int, act_dim: int, key) -> Agent:
    actor_net, q_net, v_net = VelocityField(act_dim, args.hidden_dim), TwinQ(args.hidden_dim), ValueMLP(args.hidden_dim)
    k_actor, k_q, k_qb, k_v, key = jax.random.split(key, 5)
    s, a, t = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim)), jnp.zeros((1, 1))

    def state(net, params):
        ts = TrainState.create(apply_fn=net.apply, params=params, tx=optax.adam(args.learning_rate))
        return ts.replace(step=jnp.zeros((), jnp.int32))  # an array from the start: one compiled signature

    critic = state(q_net, q_net.init(k_q, s, a))
    q_beta = state(q_net, q_net.init(k_qb, s, a))
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # own buffers: the update donates them
    return Agent(
        actor=state(actor_net, actor_net.init(k_actor, s, a, t)),
        critic=critic,
        critic_target=copy(critic.params),
        q_beta=q_beta,
        q_beta_target=copy(q_beta.params),
        value=state(v_net, v_net.init(k_v, s)),
        key=key,
        updates=jnp.zeros((), jnp.int32),
        actor_info={name: jnp.zeros((), jnp.float32) for name in ("actor_loss", "q_term", "cfm_loss", "weight")},
    )


def make_policy(args: Args, actor_apply, act_dim: int):
    """a = tanh(phi(s, a0)) with a0 ~ clamp(N(0, I)), or a0 = 0 when deterministic."""

    def policy(actor_params, s, key, deterministic: bool = False):
        shape = s.shape[:-1] + (act_dim,)
        a0 = jnp.zeros(shape) if deterministic else sample_a0(key, shape)
        velocity = lambda s_, a_, t_: actor_apply(actor_params, s_, a_, t_)
        return jnp.tanh(integrate_flow(velocity, s, a0, args.flow_steps, args.integrator))

    return policy


def update_critics(args: Args, act_dim: int, agent: Agent, b: Batch, key):
    """One step on Q^pi (Eq. 3), Q^beta* (Eq. 19) and V (Eq. 18), all from the same batch."""
    q_apply, v_apply = agent.critic.apply_fn, agent.value.apply_fn
    policy = make_policy(args, agent.actor.apply_fn, act_dim)
    mask = 1.0 - b.terminated  # truncated transitions were stored with terminated = 0: they bootstrap

    # Q^pi: y = r + gamma * mask * min Q_targ(s', a'), a' ~ pi(s'); no entropy term.
    next_a = policy(agent.actor.params, b.next_obs, key)
    y = b.rewards + args.gamma * mask * jnp.min(q_apply(agent.critic_target, b.next_obs, next_a), axis=0)

    def critic_loss(params):
        q = q_apply(params, b.obs, b.actions)
        return jnp.sum(jnp.mean((q - y) ** 2, axis=1)), q

    (qf_loss, q_data), grads = jax.value_and_grad(critic_loss, has_aux=True)(agent.critic.params)
    critic = agent.critic.apply_gradients(grads=grads)

    # Q^beta*: y_b = r + gamma * mask * V(s') with the online V (V has no target network).
    y_beta = b.rewards + args.gamma * mask * v_apply(agent.value.params, b.next_obs)

    def q_beta_loss(params):
        q = q_apply(params, b.obs, b.actions)
        return jnp.sum(jnp.mean((q - y_beta) ** 2, axis=1)), q

    (qb_loss, qb_data), grads = jax.value_and_grad(q_beta_loss, has_aux=True)(agent.q_beta.params)
    q_beta = agent.q_beta.apply_gradients(grads=grads)

    # V: an upper expectile of the target Q^beta* over buffer actions approximates max_a' Q^beta* (Eq. 17-18).
    qb_target = jnp.min(q_apply(agent.q_beta_target, b.obs, b.actions), axis=0)

    def value_loss(params):
        v = v_apply(params, b.obs)
        return expectile_loss(qb_target - v, args.expectile), v

    (v_loss, v_pred), grads = jax.value_and_grad(value_loss, has_aux=True)(agent.value.params)
    value = agent.value.apply_gradients(grads=grads)

    info = {"qf_loss": qf_loss, "qf_values": jnp.mean(q_data), "q_beta_loss": qb_loss,
            "q_beta_values": jnp.mean(qb_data), "value_loss": v_loss, "v_values": jnp.mean(v_pred)}
    return agent.replace(critic=critic, q_beta=q_beta, value=value), info


def update_actor(args: Args, act_dim: int, agent: Agent, b: Batch, key) -> Agent:
    """One step on the actor loss -Q^pi + weighted CFM (Eq. 22), then the soft target updates."""
    q_apply = agent.critic.apply_fn
    policy = make_policy(args, agent.actor.apply_fn, act_dim)
    k_pi, k_a0, k_t = jax.random.split(key, 3)
    # The weight compares the best buffer policy's value with the current policy's (Eq. 14).
    q_beta_data = jnp.min(q_apply(agent.q_beta.params, b.obs, b.actions), axis=0)
    a0 = sample_a0(k_a0, b.actions.shape)
    t = jax.random.uniform(k_t, b.actions.shape[:-1] + (1,))
    if args.cfm_target == "pre-tanh":
        a1 = jnp.arctanh(jnp.clip(b.actions, -1.0 + 1e-6, 1.0 - 1e-6))
    else:
        a1 = b.actions
    a_t = t * a1 + (1.0 - t) * a0  # the straight path from a0 to the buffer action; its velocity is a1 - a0

    def actor_loss(params):
        q_pi = jnp.min(q_apply(agent.critic.params, b.obs, policy(params, b.obs, k_pi)), axis=0)
        w = jax.lax.stop_gradient(flow_matching_weight(q_beta_data, q_pi, args.lamda))
        cfm = weighted_cfm_loss(agent.actor.apply_fn(params, b.obs, a_t, t), a1 - a0, w, args.cfm_weighting == "sample")
        q_term = -jnp.mean(q_pi)
        return q_term + cfm, {"q_term": q_term, "cfm_loss": cfm, "weight": jnp.mean(w)}

    (loss, info), grads = jax.value_and_grad(actor_loss, has_aux=True)(agent.actor.params)
    polyak = lambda online, target: optax.incremental_update(online, target, args.tau)
    return agent.replace(
        actor=agent.actor.apply_gradients(grads=grads),
        critic_target=polyak(agent.critic.params, agent.critic_target),
        q_beta_target=polyak(agent.q_beta.params, agent.q_beta_target),
        actor_info={"actor_loss": loss, **info},
    )


def make_update(args: Args, act_dim: int, sharding=None):
    """The whole gradient step of every seed as one jitted call: sample a batch on device, update the
    critics, and every `policy_frequency` calls the actor and the targets (Alg. 1). No host round-trip inside.
    The buffer is only read here (inserting is its own donated call): XLA would otherwise copy the
    whole buffer on every step."""

    def update(agent: Agent, buf: ReplayBuffer, do_actor):
        key, k_batch, k_critic, k_actor = jax.random.split(agent.key, 4)
        b = buffer_sample(buf, k_batch, args.batch_size, args.recent_frac, args.recent_size)
        agent, info = update_critics(args, act_dim, agent, b, k_critic)
        agent = jax.lax.cond(do_actor, lambda a: update_actor(args, act_dim, a, b, k_actor), lambda a: a, agent)
        agent = agent.replace(key=key, updates=agent.updates + 1)
        metrics = {**info, **agent.actor_info}
        return agent, {**metrics, "finite": finite_flags(metrics)}  # one flag per metric, for the divergence check

    def update_seeds(agent: Agent, buf: ReplayBuffer):
        # Every seed is at the same update, so the policy delay is decided once, outside the vmap: a
        # per-seed predicate would turn lax.cond into a select that runs the actor update every step.
        do_actor = (agent.updates[0] + 1) % args.policy_frequency == 0
        return seed_map(update, args.num_seeds, in_axes=(0, 0, None))(agent, buf, do_actor)

    # --debug-nans re-runs a call that made a NaN on its inputs, so they must not be donated.
    # The outputs keep the inputs' seed sharding, so the next call finds the same signature (one compile).
    return jax.jit(update_seeds, donate_argnums=() if args.debug_nans else 0, out_shardings=sharding)


# ---------------------------------------------------------------------------------------------
# Evaluation, saving, loading
# ---------------------------------------------------------------------------------------------


def make_act(args: Args, actor_apply, act_dim: int, num_seeds: int):
    """Jitted (evaluation, exploration) actions for all seeds at once: (params, obs, key) stacked over seeds."""
    policy = make_policy(args, actor_apply, act_dim)

    def act(actor_params, obs, key, deterministic: bool):
        key, sub = jax.random.split(key)
        return policy(actor_params, obs[None], sub, deterministic)[0], key

    act_eval = lambda p, o, k: act(p, o, k, args.eval_deterministic)
    act_explore = lambda p, o, k: act(p, o, k, False)
    return jax.jit(seed_map(act_eval, num_seeds)), jax.jit(seed_map(act_explore, num_seeds))


ALGO = "flowrl"
MODEL_CONFIG = ("env_id", "hidden_dim", "flow_steps", "integrator")


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
        actor = VelocityField(act_dim, args.hidden_dim)
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
                    for i, writer in enumerate(writers):
                        writer.add_scalar("charts/SPS", sps, step)
                        writer.add_scalar("charts/SPS_window", window_sps, step)
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
            params = per_seed({"actor": agent.actor.params, "critic": agent.critic.params,
                               "q_beta": agent.q_beta.params, "value": agent.value.params}, i)
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
