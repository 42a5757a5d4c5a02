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
    capacity, recent, batch = 1000, 40, 2000
    buf = fill(buffer_init(capacity, 1, 1), range(1, 1301))  # wrapped: newest value 1300 sits in slot 299
    b = F.sample_batch(buf, jax.random.PRNGKey(1), batch, 0.25, recent)
    values = np.asarray(b.obs[:, 0])
    newest = values >= 1300 - recent + 1
    recent_part = values[-batch // 4:]
    assert newest[-batch // 4:].all()  # the recent quarter is all from the newest 40
    assert set(recent_part.astype(int)) == set(range(1261, 1301))  # and covers them
    uniform_share = newest[: -batch // 4].mean()
    assert abs(uniform_share - recent / capacity) < 0.02  # the rest is uniform over all 1000
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


def test_update_schedule_actor_and_targets_every_second_step():
    args = small_args(policy_delay=2, tau=0.95)
    agent = F.create_agent(args, 3, 2, jax.random.PRNGKey(0))
    buf = filled_buffer()
    update = one_seed_update(args, 2)
    copy = lambda t: jax.tree_util.tree_map(np.array, t)

    actor0, target0 = copy(agent.actor.params), copy(agent.critic_target)
    agent, info = update(agent, buf)
    actor1, target1 = copy(agent.actor.params), copy(agent.critic_target)
    # first update: critics move, the actor and the targets do not
    assert all(np.array_equal(x, y) for x, y in zip(leaves(actor0), leaves(actor1)))
    assert all(np.array_equal(x, y) for x, y in zip(leaves(target0), leaves(target1)))
    assert int(agent.actor.step) == 0 and int(agent.critic.step) == 1

    agent, info = update(agent, buf)
    assert int(agent.actor.step) == 1 and int(agent.critic.step) == 2
    assert not all(np.array_equal(x, y) for x, y in zip(leaves(actor1), leaves(agent.actor.params)))
    # second update: target <- 0.95 * online + 0.05 * target, with the just-updated online critic
    for online, old, new in zip(leaves(agent.critic.params), leaves(target1), leaves(agent.critic_target)):
        np.testing.assert_allclose(new, 0.95 * np.asarray(online) + 0.05 * old, rtol=1e-5, atol=1e-6)
    values = jax.device_get(info)
    assert values.pop("finite").all() and len(values) == 10  # one finiteness flag per logged metric
    assert all(np.isfinite(float(v)) for v in values.values())
    assert update._cache_size() == 1


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
