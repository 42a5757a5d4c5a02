"""FlowRL's losses, integrators and update schedule against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowrl_jax as F
from common.buffer import buffer_add, buffer_init
from helpers import fill


def test_expectile_loss_by_hand():
    # u = [2, -1], tau = 0.9: weights 0.9 and 0.1 -> (0.9 * 4 + 0.1 * 1) / 2
    assert float(F.expectile_loss(jnp.array([2.0, -1.0]), 0.9)) == pytest.approx(1.85)
    # tau = 0.5 is half the mean squared error
    assert float(F.expectile_loss(jnp.array([3.0, -3.0]), 0.5)) == pytest.approx(4.5)


def test_flow_matching_weight_by_hand():
    q_beta, q_pi = jnp.array([3.0, 1.0, 0.0]), jnp.array([1.0, 1.0, 1.0])
    # d = relu(q_beta - q_pi) = [2, 0, 0], mean 2/3
    w = F.flow_matching_weight(q_beta, q_pi, 0.1)
    expected = [0.1 * math.exp(2 - 2 / 3), 0.1 * math.exp(-2 / 3), 0.1 * math.exp(-2 / 3)]
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    np.testing.assert_allclose(F.flow_matching_weight(q_beta, q_pi, 1.0), [1.0, math.exp(-2 / 3), math.exp(-2 / 3)], rtol=1e-6)
    np.testing.assert_allclose(F.flow_matching_weight(q_beta, q_pi, 1e-5), [1e-3, 1e-3, 1e-3], rtol=1e-6)  # floor


def test_weighted_cfm_loss_by_hand():
    v = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    u = jnp.array([[0.0, 0.0], [0.0, 2.0]])
    w = jnp.array([0.5, 0.1])
    # per-sample errors (mean over the 2 action dims): [0.5, 2.0]
    assert float(F.weighted_cfm_loss(v, u, w, per_sample=False)) == pytest.approx(0.3 * 1.25)  # mean(w) * mean(cfm)
    assert float(F.weighted_cfm_loss(v, u, w, per_sample=True)) == pytest.approx((0.5 * 0.5 + 0.1 * 2.0) / 2)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_integrators_on_linear_growth(steps):
    # da/dt = a: one Euler step multiplies by (1 + h), one midpoint step by (1 + h + h^2 / 2)
    a0 = jnp.array([[1.0, -2.0]])
    velocity = lambda s, a, t: a
    h = 1.0 / steps
    euler = F.integrate_flow(velocity, None, a0, steps, "euler")
    midpoint = F.integrate_flow(velocity, None, a0, steps, "midpoint")
    np.testing.assert_allclose(euler, a0 * (1 + h) ** steps, rtol=1e-6)
    np.testing.assert_allclose(midpoint, a0 * (1 + h + h * h / 2) ** steps, rtol=1e-6)


def test_integrators_converge_at_their_orders():
    velocity = lambda s, a, t: a
    a0 = jnp.ones((1, 1))
    err = {m: [abs(float(F.integrate_flow(velocity, None, a0, n, m)[0, 0]) - math.e) for n in (4, 8)] for m in ("euler", "midpoint")}
    assert 1.8 < err["euler"][0] / err["euler"][1] < 2.2  # first order
    assert 3.6 < err["midpoint"][0] / err["midpoint"][1] < 4.4  # second order


def test_time_enters_the_velocity():
    # da/dt = 2t: exact a(1) = a0 + 1; midpoint is exact for it in one step, Euler with N steps gives a0 + (N-1)/N
    velocity = lambda s, a, t: 2.0 * t * jnp.ones_like(a)
    a0 = jnp.zeros((3, 2))
    np.testing.assert_allclose(F.integrate_flow(velocity, None, a0, 1, "midpoint"), 1.0, rtol=1e-6)
    np.testing.assert_allclose(F.integrate_flow(velocity, None, a0, 4, "euler"), 0.75, rtol=1e-6)


def small_args(**kw):
    base = dict(hidden_dim=16, batch_size=8, buffer_size=64, learning_starts=0, total_timesteps=100)
    base.update(kw)
    return F.Args(**base)


def filled_buffer(obs_dim=3, act_dim=2, n=40, seed=0):
    rng = np.random.default_rng(seed)
    buf = buffer_init(64, obs_dim, act_dim)
    for i in range(n):
        buf = buffer_add(buf, rng.normal(size=obs_dim).astype(np.float32), rng.uniform(-1, 1, act_dim).astype(np.float32),
                         np.float32(rng.normal()), rng.normal(size=obs_dim).astype(np.float32), np.float32(i % 7 == 0))
    return buf


def test_the_authors_batch_never_reads_empty_slots():
    buf = fill(buffer_init(100, 1, 1), range(1, 11))  # slots 10..99 are empty (zeros)
    b = F.sample_batch(buf, jax.random.PRNGKey(0), 2000, 0.2, 50)
    assert float(jnp.min(b.obs)) >= 1.0


def test_recent_share_comes_from_the_newest_transitions_across_the_wrap():
    capacity, recent, batch = 1000, 40, 400
    buf = fill(buffer_init(capacity, 1, 1), range(1, 1301))  # wrapped: newest value 1300 sits in slot 299
    b = F.sample_batch(buf, jax.random.PRNGKey(1), batch, 0.25, recent)
    values = np.asarray(b.obs[:, 0])
    newest = values >= 1300 - recent + 1
    recent_part = values[-batch // 4:]
    assert newest[-batch // 4:].all()  # the recent quarter is all from the newest 40
    assert set(recent_part.astype(int)) == set(range(1261, 1301))  # and covers them
    uniform_share = newest[: -batch // 4].mean()
    assert abs(uniform_share - recent / capacity) < 0.035  # the rest is uniform over all 1000 (3 standard errors)
    assert values.min() >= 301  # nothing older than the overwritten range


def test_recent_window_before_the_buffer_is_full():
    buf = fill(buffer_init(10_000, 1, 1), range(1, 21))
    b = F.sample_batch(buf, jax.random.PRNGKey(2), 1000, 1.0, 2048)
    values = np.asarray(b.obs[:, 0])
    assert values.min() >= 1 and values.max() <= 20 and len(set(values)) == 20


def test_networks_shapes_and_independent_twin_heads():
    args = small_args()
    agent = F.create_agent(args, 3, 2, jax.random.PRNGKey(0))
    s, a = jnp.ones((5, 3)), jnp.zeros((5, 2))
    q = agent.critic.apply_fn(agent.critic.params, s, a)
    assert q.shape == (2, 5) and not np.allclose(q[0], q[1])
    assert agent.value.apply_fn(agent.value.params, s).shape == (5,)
    policy = F.make_policy(args, agent.actor.apply_fn, 2)
    actions = policy(agent.actor.params, 10 * jnp.ones((7, 3)), jax.random.PRNGKey(1))
    assert actions.shape == (7, 2) and bool(jnp.all(jnp.abs(actions) <= 1.0))
    det = policy(agent.actor.params, s, None, deterministic=True)
    np.testing.assert_allclose(det, policy(agent.actor.params, s, None, deterministic=True))


def test_a0_is_clamped():
    a0 = F.sample_a0(jax.random.PRNGKey(0), (10_000, 2))
    assert float(jnp.max(jnp.abs(a0))) == 1.0 and float(jnp.mean(jnp.abs(a0) == 1.0)) > 0.25


def one_seed_update(args, act_dim):
    """The script's jitted update applied to one agent: the scripts' arrays carry a seed axis (--num-seeds)."""
    update = F.make_update(args, act_dim)

    def step(agent, buf):
        agent, info = update(*jax.tree_util.tree_map(lambda x: x[None], (agent, buf)))
        return jax.tree_util.tree_map(lambda x: x[0], (agent, info))

    step._cache_size = update._cache_size
    return step


def leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def test_update_schedule_actor_and_targets_on_the_first_and_every_second_step():
    """The authors' loop updates the actor and the targets when updates % 2 == 0, counting from 0: the 1st, 3rd, ..."""
    args = small_args(policy_delay=2, tau=0.95)
    agent = F.create_agent(args, 3, 2, jax.random.PRNGKey(0))
    buf = filled_buffer()
    update = one_seed_update(args, 2)
    copy = lambda t: jax.tree_util.tree_map(np.array, t)
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))

    actor0, target0 = copy(agent.actor.params), copy(agent.critic_target)
    agent, info = update(agent, buf)
    # first update: the critics, the actor and the targets move; target <- 0.95 * online + 0.05 * target, with
    # the just-updated online critic
    assert int(agent.actor.step) == 1 and int(agent.critic.step) == 1 and not same(actor0, agent.actor.params)
    for online, old, new in zip(leaves(agent.critic.params), leaves(target0), leaves(agent.critic_target)):
        np.testing.assert_allclose(new, 0.95 * np.asarray(online) + 0.05 * old, rtol=1e-5, atol=1e-6)
    actor1, target1 = copy(agent.actor.params), copy(agent.critic_target)
    agent, info = update(agent, buf)  # second: the critics only
    assert int(agent.actor.step) == 1 and int(agent.critic.step) == 2
    assert same(actor1, agent.actor.params) and same(target1, agent.critic_target)
    agent, info = update(agent, buf)  # third: the actor again
    assert int(agent.actor.step) == 2 and not same(actor1, agent.actor.params)
    values = jax.device_get(info)
    assert values.pop("finite").all() and len(values) == 10  # one finiteness flag per logged metric
    assert all(np.isfinite(float(v)) for v in values.values())
    assert update._cache_size() == 1


def test_flow_matching_weight_uses_q_beta_from_before_its_update():
    """w = f(Q^beta*(s, a) - Q^pi(s, pi(s))) with Q^beta* as it was before the step's critic updates (the authors'
    update_critic returns it from its forward pass) and Q^pi after them; recomputed here from the key splits."""
    args = small_args(policy_delay=1, learning_rate=0.05)
    agent = F.create_agent(args, 3, 2, jax.random.PRNGKey(4))
    buf = filled_buffer()
    new, info = one_seed_update(args, 2)(jax.tree_util.tree_map(jnp.array, agent), buf)
    _, k_batch, _, k_actor = jax.random.split(agent.key, 4)
    k_pi = jax.random.split(k_actor, 3)[0]
    b = F.sample_batch(buf, k_batch, args.batch_size, args.recent_frac, args.recent_size)
    q = agent.critic.apply_fn
    q_pi = jnp.min(q(new.critic.params, b.obs, F.make_policy(args, agent.actor.apply_fn, 2)(agent.actor.params, b.obs, k_pi)), axis=0)
    weight = lambda q_beta_params: float(jnp.mean(F.flow_matching_weight(jnp.min(q(q_beta_params, b.obs, b.actions), axis=0),
                                                                         q_pi, args.lamda)))
    before, after = weight(agent.q_beta.params), weight(new.q_beta.params)
    assert float(info["weight"]) == pytest.approx(before, rel=1e-5)
    assert abs(after - before) > 100 * 1e-5 * before  # the test can tell the two apart


def test_distinct_randint_is_sampling_without_replacement():
    # Every ordered triple of distinct values in [0, 5) equally likely (60 of them), as random.sample gives.
    draws = np.asarray(jax.vmap(lambda k: F.distinct_randint(k, 3, 5))(jax.random.split(jax.random.PRNGKey(0), 30_000)))
    assert all(len(set(row)) == 3 for row in draws) and draws.min() == 0 and draws.max() == 4
    _, counts = np.unique(draws, axis=0, return_counts=True)
    chi2 = float(np.sum((counts - 500.0) ** 2 / 500.0))
    assert len(counts) == 60 and chi2 < 99.6, chi2  # the 0.1% tail of chi-square with 59 degrees of freedom
    # Fewer values than draws: the first n take every value once, the rest repeat.
    row = np.asarray(F.distinct_randint(jax.random.PRNGKey(1), 8, 5))
    assert sorted(row[:5]) == [0, 1, 2, 3, 4] and row[5:].min() >= 0 and row[5:].max() <= 4


def test_the_authors_batch_split_and_no_repeats_within_each_part():
    buf = fill(buffer_init(10_000, 1, 1), range(1, 3001))
    b = F.sample_batch(buf, jax.random.PRNGKey(3), 256, 0.2, 2048)
    values = np.asarray(b.obs[:, 0]).astype(int)
    uniform, recent = values[:204], values[204:]  # int(256 * 0.8) = 204 uniform, 52 recent, as the authors split
    assert len(set(uniform)) == 204 and len(set(recent)) == 52 and recent.min() > 3000 - 2048


def test_per_sample_weighting_changes_the_actor_update():
    buf = filled_buffer()
    grads = {}
    for mode in ("batch", "sample"):
        args = small_args(policy_delay=1, cfm_weighting=mode)
        agent = F.create_agent(args, 3, 2, jax.random.PRNGKey(0))
        agent, _ = one_seed_update(args, 2)(agent, buf)
        grads[mode] = np.concatenate([np.ravel(x) for x in leaves(agent.actor.params)])
    assert not np.allclose(grads["batch"], grads["sample"])


def test_critic_learns_a_constant_reward_at_termination():
    # every transition terminates with reward 1: Q^pi and Q^beta* must both go to 1, V (expectile of Q^beta*) too
    args = small_args(learning_rate=3e-3, policy_delay=1, tau=0.95)
    buf = buffer_init(64, 3, 2)
    rng = np.random.default_rng(0)
    for _ in range(64):
        buf = buffer_add(buf, rng.normal(size=3).astype(np.float32), rng.uniform(-1, 1, 2).astype(np.float32),
                         np.float32(1.0), rng.normal(size=3).astype(np.float32), np.float32(1.0))
    agent = F.create_agent(args, 3, 2, jax.random.PRNGKey(0))
    update = one_seed_update(args, 2)
    for _ in range(300):
        agent, info = update(agent, buf)
    info = jax.device_get(info)
    assert abs(info["qf_values"] - 1.0) < 0.05 and abs(info["q_beta_values"] - 1.0) < 0.05
    assert abs(info["v_values"] - 1.0) < 0.1
