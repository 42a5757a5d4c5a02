"""FlowRL: a flow-based policy for online RL (Lv et al., 2025), in one JAX/Flax file.

The actor is a velocity field v(s, a_t, t); an action is the ODE solution from a0 ~ N(0, I)
(clamped to [-1, 1]) at t = 1, squashed by tanh (Eq. 8-9). The actor maximises Q^pi while a
weighted flow-matching term, an upper bound on the Wasserstein-2 distance to the best policy in the
buffer (Eq. 12-14), pulls it toward buffer actions that Q^beta* rates above the current policy.
Q^beta* and V are learned IQL-style by expectile regression (Eq. 18-19).

Defaults reproduce the authors' code (bytedance/FlowRL); where it differs from the paper a flag
gives the paper's version (docs/flowrl.md).

    paper    what                                                     here
    Eq. 8-9  a0 ~ clamp(N(0, I)), integrated through v(s, a_t, t),    VelocityField, sample_a0,
             then tanh                                                integrate_flow, make_policy
    Eq. 3    Q^pi: Bellman regression, a' ~ pi(s'), twin targets      TwinQ, critic_loss (update_critics)
    Eq. 19   Q^beta*: regression on r + gamma V(s')                   q_beta_loss (update_critics)
    Eq. 18   V: expectile regression on the target Q^beta*            expectile_loss, value_loss
    Eq. 14   the weight w = f(Q^beta* - Q^pi)                         flow_matching_weight
    Eq. 13   weighted conditional flow matching                       weighted_cfm_loss
    Eq. 22   actor loss -Q^pi(s, pi(s)) + weighted CFM                actor_loss (update_actor)
    Alg. 1   critics every step; actor and targets on the 1st, 3rd, ...  make_update; the loop in train
    (code)   batches: 20% from the newest 2,048 transitions, each      sample_batch, distinct_randint
             part without replacement

Everything around the loop (run folder, logs, evaluation, checkpoints, resume, seeds) is common/run.py.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Annotated, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import struct
from flax.training.train_state import TrainState

from common.args import ConfigError, RunArgs, check_ranges, check_run_args
from common.buffer import Batch, ReplayBuffer, buffer_gather
from common.checkpoint import finite_flags, restore_tree
from common.run import ExitStatus, TrainingRun, eval_only, prepare_resume
from common.seeds import seed_map


@dataclass
class Args(RunArgs):
    """FlowRL: its hyperparameters after the run flags of common/args.py."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
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
    policy_delay: Annotated[int, tyro.conf.arg(aliases=("--policy-frequency",))] = 2
    """update the actor and the target networks on the first critic update and every this many after (the authors'
    1st, 3rd, ...; also --policy-frequency, its name before 2026-12)"""
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
    eval_deterministic: bool = False
    """evaluate from a0 = 0 instead of sampling a0 (the authors sample)"""


def check_args(args: Args) -> None:
    """Refuse impossible settings with one line, before anything is built or compiled."""
    check_ranges(args, positive=["learning_rate", "hidden_dim", "flow_steps", "policy_delay", "lamda", "tau", "recent_size"],
                 unit=["gamma", "tau", "recent_frac"])
    if not 0.0 < args.expectile < 1.0:
        raise ConfigError(f"--expectile must be in (0, 1), got {args.expectile}")
    check_run_args(args)  # the flags all scripts share, and the env id


# --- Networks (the authors' layouts: Xavier-uniform weights, zero biases) ---


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
    n_critics: int = 2

    @nn.compact
    def __call__(self, s, a):
        ensemble = nn.vmap(ValueMLP, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=None, out_axes=0, axis_size=self.n_critics)
        return ensemble(self.hidden_dim)(jnp.concatenate([s, a], axis=-1))


# --- The flow policy: base noise, ODE integration, squashing ---


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


# --- Losses ---


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


# --- Agent state and the jitted update ---


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
    return Agent(
        actor=state(actor_net, actor_net.init(k_actor, s, a, t)),
        critic=critic,
        critic_target=critic.params,
        q_beta=q_beta,
        q_beta_target=q_beta.params,
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


def distinct_randint(key, k: int, n):
    """k integers uniform in [0, n) drawn without replacement (the first n of them when n < k; the rest repeat),
    as Python's random.sample draws the authors' batches. Every position that repeats an earlier one is
    redrawn until none does: the same result as drawing the positions one by one, each uniform over the
    values not yet taken, in a few rounds of k x k comparisons rather than k dependent steps."""
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)
    may_differ = jnp.arange(k) < n

    def repeats(idx):
        return jnp.any((idx[:, None] == idx[None, :]) & earlier, axis=1) & may_differ

    def redraw(state):
        key, idx = state
        key, sub = jax.random.split(key)
        return key, jnp.where(repeats(idx), jax.random.randint(sub, (k,), 0, n), idx)

    first, key = jax.random.split(key)
    return jax.lax.while_loop(lambda state: jnp.any(repeats(state[1])), redraw, (key, jax.random.randint(first, (k,), 0, n)))[1]


def sample_batch(buf: ReplayBuffer, key, batch_size: int, recent_frac: float, recent_size: int) -> Batch:
    """The authors' batch: int(batch_size (1 - recent_frac)) transitions from every filled slot, the rest from the
    newest `recent_size` (across the ring's wrap), each part without replacement (distinct_randint)."""
    capacity = buf.obs.shape[0]
    n_uniform = int(batch_size * (1.0 - recent_frac)) if recent_size > 0 else batch_size
    k_uniform, k_recent = jax.random.split(key)
    uniform = distinct_randint(k_uniform, n_uniform, buf.size)
    back = distinct_randint(k_recent, batch_size - n_uniform, jnp.minimum(recent_size, buf.size))
    return buffer_gather(buf, jnp.concatenate([uniform, (buf.pos - 1 - back) % capacity]))


def update_critics(args: Args, act_dim: int, agent: Agent, b: Batch, key):
    """One step on Q^pi (Eq. 3), Q^beta* (Eq. 19) and V (Eq. 18), all from the same batch. Also returns
    min_i Q^beta*_i(s, a) on the batch from before its step, which the flow-matching weight uses (the authors')."""
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
    return agent.replace(critic=critic, q_beta=q_beta, value=value), info, jnp.min(qb_data, axis=0)


def update_actor(args: Args, act_dim: int, agent: Agent, b: Batch, q_beta_data, key) -> Agent:
    """One step on the actor loss -Q^pi + weighted CFM (Eq. 22), then the soft target updates. The weight
    compares the best buffer policy's value, `q_beta_data` (Q^beta* before this step's update, as the authors
    compute it), with the current policy's under the just-updated Q^pi (Eq. 14)."""
    q_apply = agent.critic.apply_fn
    policy = make_policy(args, agent.actor.apply_fn, act_dim)
    k_pi, k_a0, k_t = jax.random.split(key, 3)
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
    critics, and on the first and every `policy_delay`-th call after it the actor and the targets (Alg. 1). No host
    round-trip inside.
    The buffer is only read here (inserting is its own donated call): XLA would otherwise copy the
    whole buffer on every step."""

    def update(agent: Agent, buf: ReplayBuffer, do_actor):
        key, k_batch, k_critic, k_actor = jax.random.split(agent.key, 4)
        b = sample_batch(buf, k_batch, args.batch_size, args.recent_frac, args.recent_size)
        agent, info, q_beta_data = update_critics(args, act_dim, agent, b, k_critic)
        agent = jax.lax.cond(do_actor, lambda a: update_actor(args, act_dim, a, b, q_beta_data, k_actor), lambda a: a, agent)
        agent = agent.replace(key=key, updates=agent.updates + 1)
        metrics = {**info, **agent.actor_info}
        return agent, {**metrics, "finite": finite_flags(metrics)}  # one flag per metric, for the divergence check

    def update_seeds(agent: Agent, buf: ReplayBuffer):
        # Every seed is at the same update, so the policy delay is decided once, outside the vmap: a
        # per-seed predicate would turn lax.cond into a select that runs the actor update every step.
        do_actor = agent.updates[0] % args.policy_delay == 0  # the 1st, 3rd, ... update, as the authors' loop
        return seed_map(update, args.num_seeds, in_axes=(0, 0, None))(agent, buf, do_actor)

    # The agent is not donated: with its buffers aliased to the outputs, XLA copies the weights and Adam moments
    # before the update (the fused Adam step reads the old moments it overwrites); fresh outputs are faster and
    # bit-identical (docs/performance.md).
    # The outputs keep the inputs' seed sharding, so the next call finds the same signature (one compile).
    return jax.jit(update_seeds, out_shardings=sharding)


# --- Acting and the training loop (the run around it, logs, evaluation, checkpoints: common/run.py) ---


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
MODEL_CONFIG = ("env_id", "hidden_dim", "flow_steps", "integrator")  # what --eval-only needs to rebuild the actor
RENAMED = {"policy_frequency": "policy_delay"}  # arguments of older checkpoints under their names now


def load_actor(args: Args, obs_dim: int, act_dim: int, raw: dict):
    """For --eval-only: a saved actor's parameters (refused if they do not fit) and its evaluation action."""
    actor = VelocityField(act_dim, args.hidden_dim)
    template = actor.init(jax.random.PRNGKey(0), jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim)), jnp.zeros((1, 1)))
    return restore_tree(template, raw.get("actor"), args.checkpoint), make_act(args, actor.apply, act_dim, 1)[0]


def train(args: Args, resume=None) -> dict:
    """Train --num-seeds agents (or continue `resume` = (path, checkpoint) from prepare_resume). Returns a summary.
    Every array (agent, keys, buffer, observations) carries a leading seed axis."""
    run = TrainingRun(args, ALGO, __file__, resume)
    agent, k_act, buf, obs = run.init_state(create_agent)
    update = make_update(args, run.act_dim, run.sharding)
    act_eval, act_explore = make_act(args, agent.actor.apply_fn, run.act_dim, args.num_seeds)
    info = None
    with run:  # a signal finishes the step, checkpoints and stops; closes the logs and envs
        for step in run.steps():
            if step <= args.learning_starts:
                actions = run.envs.random_actions()
            else:
                actions, k_act = act_explore(agent.actor.params, obs, k_act)
                actions = np.asarray(actions)
            transitions, obs, episodes = run.envs.step(obs, actions)
            buf = run.buffer_add(buf, *transitions)
            if run.learns(step):
                agent, info = update(agent, buf)
                run.check_update(step, info)  # a NaN or infinite loss stops the run
            run.log(step, episodes, info)
            run.maybe_evaluate(step, act_eval, agent.actor.params)
            if run.maybe_checkpoint(step, agent, k_act, buf, obs):
                break
    saved = {"actor": agent.actor.params, "critic": agent.critic.params, "q_beta": agent.q_beta.params,
             "value": agent.value.params}
    return run.finish(agent, update, MODEL_CONFIG, saved)


def main(argv=None) -> int:
    args = tyro.cli(Args, args=argv)
    with ExitStatus(__file__) as status:
        check_args(args)
        if args.eval_only:
            eval_only(args, ALGO, MODEL_CONFIG, load_actor)
        else:
            train(args, prepare_resume(args, ALGO, MODEL_CONFIG, check_args, RENAMED) if args.resume else None)
    return status.code


if __name__ == "__main__":
    sys.exit(main())
