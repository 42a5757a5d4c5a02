"""SAC Flow-G / Flow-T: the path density, the marginal drift, the networks, batch renormalisation,
short end-to-end runs of both scripts, and bad input."""

import dataclasses
import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import sac_flow_g as G
import sac_flow_t as T
from common.layers import split_features
from helpers import all_finite, assert_same_tree, assert_wandb_matches_tensorboard, only_run_dir, read_scalars, run_script

# ---------------------------------------------------------------------------------------------
# Path log-density
# ---------------------------------------------------------------------------------------------


def toy_step(s):
    """A nonlinear velocity and a time-dependent noise level, known in closed form."""

    def step(x, t, k):
        return jnp.sin(x) * jnp.mean(s, axis=-1, keepdims=True) + t, -0.5 + t * jnp.ones_like(x)

    return step


def numpy_drift(v, x, t, sigma, drift):
    if drift == "plain":
        return v
    return v * (1 + sigma**2 * t / (2 * (1 - t))) - sigma**2 * x / (2 * (1 - t))


STEP_STD = {"sigma": lambda dt: 1.0, "sigma-dt": lambda dt: dt, "sqrt-dt": lambda dt: math.sqrt(dt)}


@pytest.mark.parametrize("drift,step_noise", [("plain", "sigma"), ("plain", "sigma-dt"), ("plain", "sqrt-dt"),
                                              ("marginal", "sqrt-dt")])
def test_path_log_density_matches_scipy(drift, step_noise):
    # every term by scipy: the N(0, I) start, each step's Gaussian with its -log std under the step-noise
    # scaling, and the tanh Jacobian in the env's units (a per-dimension half-range, as Humanoid's 0.4)
    K, scale = 3, np.array([0.4, 2.0])
    s = jnp.array(np.random.default_rng(0).normal(size=(64, 5)), jnp.float32)
    action, log_prob, path = G.flow_rollout(toy_step(s), (64, 2), jax.random.PRNGKey(3), K, drift, step_noise,
                                            units_scale=jnp.array(scale, jnp.float32))
    xs = [np.asarray(x, np.float64) for x in path["xs"]]
    s_np, dt = np.asarray(s, np.float64), 1.0 / K
    expected = stats.norm.logpdf(xs[0]).sum(-1)
    for k in range(K):
        t = k * dt
        v = np.sin(xs[k]) * s_np.mean(-1, keepdims=True) + t
        sigma = np.exp(-0.5 + t)
        mean = xs[k] + dt * numpy_drift(v, xs[k], t, sigma, drift)
        expected += stats.norm.logpdf(xs[k + 1], loc=mean, scale=sigma * STEP_STD[step_noise](dt)).sum(-1)
    expected -= np.log(scale * (1 - np.tanh(xs[K]) ** 2) + 1e-6).sum(-1)
    # float32 loses digits of 1 - tanh^2 for the few samples near saturation, hence atol 1e-2 (a missing
    # -log std term alone would be off by at least 0.4)
    np.testing.assert_allclose(np.asarray(log_prob), expected, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(np.asarray(action), np.tanh(xs[K]), rtol=1e-5, atol=1e-6)  # the env rescales it


def test_flow_t_authors_log_density_is_the_noise_density_without_the_log_std_terms():
    """--log-density authors (Flow-T's default): log N(x_0) + sum_k log N(eps_k; 0, I) - log|da/dx_K| with the eps_k
    redrawn here from the rollout's key splits (their SAC_flow_transformer_jax.py); the complete density exceeds it by
    exactly -sum_k sum_d log(sigma_k dt)."""
    K, scale = 3, np.array([0.4, 2.0])
    s = jnp.array(np.random.default_rng(1).normal(size=(32, 5)), jnp.float32)
    key, units = jax.random.PRNGKey(7), jnp.array(scale, jnp.float32)
    run = lambda density: T.flow_rollout(toy_step(s), (32, 2), key, K, "plain", "sigma-dt", units_scale=units,
                                         log_density=density)
    _, authors, path = run("authors")
    _, complete, _ = run("complete")
    keys = jax.random.split(key, K + 1)
    eps = [np.asarray(jax.random.normal(keys[k + 1], (32, 2)), np.float64) for k in range(K)]
    xs = [np.asarray(x, np.float64) for x in path["xs"]]
    expected = stats.norm.logpdf(xs[0]).sum(-1) + sum(stats.norm.logpdf(e).sum(-1) for e in eps)
    expected -= np.log(scale * (1 - np.tanh(xs[K]) ** 2) + 1e-6).sum(-1)
    np.testing.assert_allclose(np.asarray(authors), expected, rtol=1e-4, atol=1e-2)
    log_std_terms = sum(2 * np.log(np.exp(-0.5 + k / K) / K) for k in range(K))  # 2 dimensions, std sigma_k dt
    np.testing.assert_allclose(np.asarray(complete - authors), -log_std_terms, rtol=1e-5)
    assert T.Args().log_density == "authors"


def test_flow_t_checkpoints_from_before_log_density_resume_with_the_complete_density(tmp_path):
    from common.checkpoint import read_resume, write_atomic

    saved = dataclasses.asdict(T.Args())
    del saved["log_density"]
    path = tmp_path / "step_0000000010.ckpt"
    write_atomic(str(path), {"format": 2, "algo": T.ALGO, "kind": "train", "step": 10, "args": saved})
    for before, want in [(T.BEFORE, "complete"), (None, "authors")]:
        args = T.Args(resume=str(path))
        read_resume(args, T.ALGO, T.Args(), None, before)
        assert args.log_density == want


def test_env_units_shift_log_pi_by_the_log_half_range():
    # Humanoid-v4: 17 dimensions of +-0.4; away from saturation log pi in env units is 17 * log(1 / 0.4) higher
    s = jnp.zeros((8, 3))
    step = lambda x, t, k: (jnp.zeros_like(x), jnp.full_like(x, -3.0))
    unit = G.flow_rollout(step, (8, 17), jax.random.PRNGKey(0), 4, units_scale=1.0)[1]
    env = G.flow_rollout(step, (8, 17), jax.random.PRNGKey(0), 4, units_scale=jnp.full((17,), 0.4))[1]
    np.testing.assert_allclose(np.asarray(env - unit), -17 * math.log(0.4), rtol=1e-3)
    assert s.shape[0] == 8


def test_log_sigma_terms_are_counted():
    x0 = jnp.zeros((1, 2))
    narrow = G.path_log_prob([x0, x0], [x0], [jnp.full((1, 2), 0.1)])
    wide = G.path_log_prob([x0, x0], [x0], [jnp.full((1, 2), 1.0)])
    assert float((narrow - wide)[0]) == pytest.approx(2 * math.log(10.0), rel=1e-5)


@pytest.mark.parametrize("scale,bias", [(1.0, 0.0), (2.0, 0.5)])
def test_one_step_linear_flow_integrates_to_the_closed_form_action_density(scale, bias):
    # K = 1, v = alpha x + beta, constant sigma: x_1 = (1 + alpha) x_0 + beta + sigma eps, so
    # x_1 ~ N(beta, (1 + alpha)^2 + sigma^2) and a = tanh(x_1) scale + bias. Integrating the path
    # density over x_0 must give that density of a.
    alpha, beta, sigma = -0.4, 0.3, 0.7
    x0 = jnp.linspace(-9.0, 9.0, 6001)[:, None]
    for x1_value in [-1.2, 0.1, 0.8]:
        x1 = jnp.full_like(x0, x1_value)
        mean = x0 + (alpha * x0 + beta)
        log_joint = G.path_log_prob([x0, x1], [mean], [jnp.full_like(x0, sigma)], scale)
        marginal = np.trapezoid(np.exp(np.asarray(log_joint, np.float64)), np.asarray(x0[:, 0], np.float64))
        closed = stats.norm.pdf(x1_value, beta, math.sqrt((1 + alpha) ** 2 + sigma**2)) / (scale * (1 - math.tanh(x1_value) ** 2))
        assert marginal == pytest.approx(closed, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# The marginal-preserving drift
# ---------------------------------------------------------------------------------------------

MU, S = 1.5, 0.5  # the flow transports N(0, I) to N(MU, S^2 I)


def gaussian_flow_step(log_sigma):
    """Marginal velocity of the straight path x_t = (1 - t) x0 + t (MU + S z) with independent
    x0, z ~ N(0, I): v = E[x1 - x0 | x_t] = MU + (t S^2 - (1 - t)) / var_t (x - t MU)."""

    def step(x, t, k):
        var_t = (1 - t) ** 2 + t**2 * S**2
        v = MU + (t * S**2 - (1 - t)) / var_t * (x - t * MU)
        return v, jnp.full_like(x, log_sigma)

    return step


def test_marginal_drift_keeps_the_final_law_and_the_plain_drift_does_not():
    K, n, sigma = 200, 20_000, 0.8
    key = jax.random.PRNGKey(7)
    final = {}
    for name, drift, log_sigma in [("ode", "plain", -30.0), ("marginal", "marginal", math.log(sigma)),
                                   ("plain", "plain", math.log(sigma))]:
        path = G.flow_rollout(gaussian_flow_step(log_sigma), (n, 2), key, K, drift, "sqrt-dt")[2]
        final[name] = np.asarray(path["xs"][-1]).ravel()
    mean_se, var_se = S / math.sqrt(2 * n), S**2 * math.sqrt(2 / (2 * n))
    assert abs(final["ode"].mean() - MU) < 0.01 and abs(final["ode"].var() - S**2) < 0.01  # Euler at K = 200
    assert abs(final["marginal"].mean() - final["ode"].mean()) < 4 * mean_se + 0.01
    assert abs(final["marginal"].var() - final["ode"].var()) < 4 * var_se + 0.01
    # without the correction the noise piles up: the final variance is far too large
    assert final["plain"].var() - final["ode"].var() > 0.2


def test_drifts_agree_without_noise():
    v, x = jnp.array([0.3, -1.0]), jnp.array([2.0, 0.5])
    np.testing.assert_allclose(G.marginal_drift(v, x, 0.5, 0.0), v)
    # by hand at t = 0.5, sigma = 1: v (1 + 0.5 / 1) - x / 1
    np.testing.assert_allclose(G.marginal_drift(v, x, 0.5, 1.0), 1.5 * v - x, rtol=1e-6)
    assert G.plain_drift(v, x, 0.5, 1.0) is v


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


def test_gate_starts_at_sigmoid_five():
    net = G.GatedVelocity(act_dim=3, hidden_dim=64, time_emb_dim=32)
    rng = np.random.default_rng(1)
    s, x, t = (jnp.array(rng.normal(size=shape), jnp.float32) for shape in [(16, 11), (16, 3), (16, 1)])
    params = net.init(jax.random.PRNGKey(0), s, x, t)
    v, inter = net.apply(params, s, x, t, mutable=["intermediates"])
    gate = np.asarray(inter["intermediates"]["gate"][0])
    np.testing.assert_allclose(gate, 1 / (1 + math.exp(-5.0)), rtol=1e-6)
    assert gate.min() == pytest.approx(0.9933, abs=1e-4)
    assert v.shape == (16, 3)


def test_log_std_is_mapped_into_its_range():
    raw = jnp.array([-100.0, 0.0, 100.0])
    np.testing.assert_allclose(G.squash_log_std(raw, -5.0, 2.0), [-5.0, -1.5, 2.0], atol=1e-6)


def test_flow_t_attention_shapes_and_masks():
    B, d, heads = 5, 96, 4
    rng = np.random.default_rng(2)
    tokens = jnp.array(rng.normal(size=(B, 3, d)), jnp.float32)
    state = jnp.array(rng.normal(size=(B, 1, d)), jnp.float32)
    attn = T.MultiHeadAttention(d, heads)
    params = attn.init(jax.random.PRNGKey(0), tokens, tokens)
    out, w = attn.apply(params, tokens, tokens, jnp.eye(3, dtype=bool))
    assert out.shape == (B, 3, d) and w.shape == (B, heads, 3, 3)
    np.testing.assert_allclose(w, np.broadcast_to(np.eye(3), w.shape), atol=1e-6)  # diagonal mask: only itself
    out, w = attn.apply(params, tokens, state)
    assert out.shape == (B, 3, d) and w.shape == (B, heads, 3, 1)
    np.testing.assert_allclose(w, 1.0)  # one state token: all weight on it
    one = tokens[:, :1]
    _, w = attn.apply(params, one, one, jnp.eye(1, dtype=bool))
    np.testing.assert_allclose(w, 1.0)  # the rollout's single action-time token

    velocity = T.DecodedVelocity(act_dim=3, d_model=d, n_heads=heads, n_layers=2)
    s, x, t = jnp.ones((B, 11)), jnp.ones((B, 3)), jnp.full((B, 1), 0.25)
    both = lambda m, s_, x_, t_: m(m.encode_state(s_), x_, t_)
    vp = velocity.init(jax.random.PRNGKey(1), s, x, t, method=both)
    v, h = velocity.apply(vp, s, x, t, method=both)
    assert v.shape == (B, 3) and h.shape == (B, d)
    assert velocity.apply(vp, s, method="encode_state").shape == (B, 1, d)
    assert set(vp["params"]) >= {"blocks_0", "blocks_1", "velocity_head", "action_embedding", "norm_out"}


# ---------------------------------------------------------------------------------------------
# Batch renormalisation
# ---------------------------------------------------------------------------------------------

X = jnp.array([[1.0, 2.0], [3.0, 6.0]])  # batch mean [2, 4], biased variance [1, 4]
EPS = 1e-3


def brn(train, **kw):
    module = G.BatchRenorm(train=train, momentum=0.9, epsilon=EPS, **kw)
    return module, module.init(jax.random.PRNGKey(0), X)


def test_batch_renorm_training_mode_before_renorm_is_batch_norm():
    module, variables = brn(True, warmup=1)
    y, new = module.apply(variables, X, mutable=["batch_stats"])
    std = np.sqrt(np.array([1.0, 4.0]) + EPS)
    np.testing.assert_allclose(y, (np.asarray(X) - [2.0, 4.0]) / std, rtol=1e-6)
    # running statistics start at (0, 1) and move 10% toward the batch's; the layer counts its calls
    np.testing.assert_allclose(new["batch_stats"]["mean"], [0.2, 0.4], rtol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["var"], [1.0, 1.3], rtol=1e-6)
    assert int(new["batch_stats"]["calls"]) == 1


def test_batch_renorm_training_mode_with_renorm_by_hand():
    module, variables = brn(True, r_max=1.5, d_max=3.0, warmup=0)
    y, _ = module.apply(variables, X, mutable=["batch_stats"])
    std = np.sqrt(np.array([1.0, 4.0]) + EPS)
    ra_std = math.sqrt(1.0 + EPS)  # running mean 0, variance 1
    r = np.clip(std / ra_std, 1 / 1.5, 1.5)  # [1, 1.999 -> 1.5]
    d = np.clip(np.array([2.0, 4.0]) / ra_std, -3.0, 3.0)  # [1.999, 3.998 -> 3]
    assert r[1] == 1.5 and d[1] == 3.0
    np.testing.assert_allclose(y, (np.asarray(X) - [2.0, 4.0]) / std * r + d, rtol=1e-5)


def test_batch_renorm_switches_on_after_its_own_warmup_calls():
    module, variables = brn(True, r_max=1.5, d_max=3.0, warmup=2)
    outputs = []
    for _ in range(3):
        y, updated = module.apply(variables, X, mutable=["batch_stats"])
        variables = {**variables, **updated}
        outputs.append(np.asarray(y))
    plain = (np.asarray(X) - [2.0, 4.0]) / np.sqrt(np.array([1.0, 4.0]) + EPS)
    np.testing.assert_allclose(outputs[0], plain, rtol=1e-6)
    np.testing.assert_allclose(outputs[1], plain, rtol=1e-6)
    assert not np.allclose(outputs[2], plain)  # the third call renormalises


def test_batch_renorm_evaluation_mode_uses_running_statistics():
    module = G.BatchRenorm(train=False, epsilon=EPS)
    variables = {"params": {"scale": jnp.array([2.0, 1.0]), "bias": jnp.array([0.5, 0.0])},
                 "batch_stats": {"mean": jnp.array([1.0, -1.0]), "var": jnp.array([4.0, 0.25]), "calls": jnp.array(0)}}
    y = module.apply(variables, X)
    expected = (np.asarray(X) - [1.0, -1.0]) / np.sqrt(np.array([4.0, 0.25]) + EPS) * [2.0, 1.0] + [0.5, 0.0]
    np.testing.assert_allclose(y, expected, rtol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_batch_renorm_of_parts_is_the_concatenation_normalised_and_split(train):
    # norm(s, x) returns [s, x] normalised as one input, in two parts (each by its own slice of the
    # running statistics in eval mode), with the same statistics updates, bit for bit.
    module = G.BatchRenorm(train=train, momentum=0.9, epsilon=EPS, warmup=0)
    s, x = jnp.array([[1.0, 2.0, 0.5], [3.0, 6.0, -1.0]]), jnp.array([[0.3], [-2.0]])
    variables = randomised(module.init(jax.random.PRNGKey(0), jnp.concatenate([s, x], -1)))
    whole, new_whole = module.apply(variables, jnp.concatenate([s, x], -1), mutable=["batch_stats"])
    (s_hat, x_hat), new_parts = module.apply(variables, s, x, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(s_hat), np.asarray(whole)[:, :3])
    np.testing.assert_array_equal(np.asarray(x_hat), np.asarray(whole)[:, 3:])
    for a, b in zip(jax.tree_util.tree_leaves(new_whole), jax.tree_util.tree_leaves(new_parts)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def renorm_by_hand(x, scale, bias, ra_mean, ra_var, r_d=None, eps=EPS, r_max=1.5, d_max=3.0):
    """Training-mode batch renorm in float64 numpy: (y, batch mean, batch var, (r, d)); `r_d` holds r and d fixed."""
    mean, var = x.mean(0), x.var(0)
    std, ra_std = np.sqrt(var + eps), np.sqrt(ra_var + eps)
    r, d = r_d or (np.clip(std / ra_std, 1 / r_max, r_max), np.clip((mean - ra_mean) / ra_std, -d_max, d_max))
    return ((x - mean) / std * r + d) * scale + bias, mean, var, (r, d)


@pytest.mark.parametrize("renorm", [False, True])
def test_batch_renorm_gradient_matches_central_differences(renorm):
    # The written-out gradient (common/layers.py) against float64 central differences of the layer in
    # numpy, with r and d held fixed as in the layer: through y and through the returned batch mean and
    # variance, for x, scale and bias; nothing reaches the running statistics.
    from common.layers import renorm_train

    rng = np.random.default_rng(0)
    x, w = rng.normal(1.0, 3.0, (12, 3)), rng.normal(size=(12, 3))
    scale, bias, ra_mean, w_mean, w_var = rng.normal(size=(5, 3))
    ra_var = rng.uniform(0.2, 3.0, 3)
    _, _, _, r_d = renorm_by_hand(x, scale, bias, ra_mean, ra_var)
    r_d = r_d if renorm else (np.ones(3), np.zeros(3))

    def loss_np(x, scale, bias):
        y, mean, var, _ = renorm_by_hand(x, scale, bias, ra_mean, ra_var, r_d)
        return np.sum(np.sin(y) * w) + mean @ w_mean + var @ w_var

    def loss(x, scale, bias, ra_mean, ra_var):
        y, mean, var = renorm_train(x, scale, bias, ra_mean, ra_var, jnp.asarray(renorm), EPS, 1.5, 3.0)
        return jnp.sum(jnp.sin(y) * w) + mean @ w_mean + var @ w_var

    f32 = lambda a: jnp.asarray(a, jnp.float32)
    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*map(f32, (x, scale, bias, ra_mean, ra_var)))
    point, h = [x, scale, bias], 1e-6
    for i, grad in enumerate(grads[:3]):
        numeric = np.zeros_like(point[i])
        for j in np.ndindex(point[i].shape):
            up, down = [p.copy() for p in point], [p.copy() for p in point]
            up[i][j] += h
            down[i][j] -= h
            numeric[j] = (loss_np(*up) - loss_np(*down)) / (2 * h)
        np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-3, atol=1e-4)
    assert not np.any(grads[3]) and not np.any(grads[4])


class AutodiffBatchRenorm(G.BatchRenorm):
    """The same layer with its gradient left to autodiff (the formula before common/layers.py wrote it out)."""

    @nn.compact
    def __call__(self, x, *more):
        if not self.train:
            return super().__call__(x, *more)
        parts = (x, *more)
        x = jnp.concatenate(parts, -1)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((x.shape[-1],), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((x.shape[-1],), jnp.float32))
        calls = self.variable("batch_stats", "calls", lambda: jnp.zeros((), jnp.int32))
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        axes = tuple(range(x.ndim - 1))
        mean, var = jnp.mean(x, axes), jnp.var(x, axes)
        std, ra_std = jnp.sqrt(var + self.epsilon), jnp.sqrt(ra_var.value + self.epsilon)
        renorm = calls.value >= self.warmup
        r = jnp.where(renorm, jax.lax.stop_gradient(jnp.clip(std / ra_std, 1 / self.r_max, self.r_max)), 1.0)
        d = jnp.where(renorm, jax.lax.stop_gradient(jnp.clip((mean - ra_mean.value) / ra_std, -self.d_max, self.d_max)), 0.0)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * jax.lax.stop_gradient(mean)
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * jax.lax.stop_gradient(var)
            calls.value = calls.value + 1
        y = (x - mean) / std * r + d
        y = split_features(parts, lambda p, f: y[..., f] * scale[f] + bias[f] if self.affine else y[..., f])
        return y if self.affine else (y, scale, bias)


def small_args(module):
    sizes = {"hidden_dim": 16, "time_emb_dim": 8} if module is G else {"d_model": 16, "n_heads": 2, "n_layers": 1}
    return module.Args(env_id="Hopper-v4", batch_size=32, critic_width=64, log_std_hidden=16, renorm_warmup=2,
                       buffer_size=256, **sizes)


def small_updates(module, monkeypatch, **replaced):
    """Three updates of small networks (the third also updates the actor; the renorm corrections switch
    on at the third call of each layer) from a fixed agent and buffer, with the module's classes in
    `replaced` swapped in: (agent, [info of each update])."""
    from common.buffer import buffer_add, buffer_init

    for name, cls in replaced.items():
        monkeypatch.setattr(module, name, cls)
    args = small_args(module)
    obs_dim, act_dim = 11, 3
    rng = np.random.default_rng(0)
    buf = buffer_init(args.buffer_size, obs_dim, act_dim)
    for _ in range(200):
        obs = rng.normal(size=obs_dim).astype(np.float32)
        buf = buffer_add(buf, obs, rng.uniform(-1, 1, act_dim).astype(np.float32), np.float32(rng.normal()),
                         obs + 0.1, np.float32(0.0))
    seeds = lambda tree: jax.tree_util.tree_map(lambda a: a[None], tree)
    agent, infos = seeds(module.create_agent(args, obs_dim, act_dim, jax.random.PRNGKey(0))), []
    update = module.make_update(args, act_dim)
    for _ in range(args.policy_delay):
        agent, info = update(agent, seeds(buf))
        infos.append({k: np.asarray(v) for k, v in info.items() if k != "finite"})
    return agent, infos


def assert_same_updates(ours, ours_info, other, other_info):
    """Two small_updates results equal to float32 rounding: every update's metrics, and the critics after them;
    the last update did update the actor."""
    for a, b in zip(ours_info, other_info):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert ours_info[-1]["actor_loss"] != ours_info[0]["actor_loss"]
    for a, b in zip(jax.tree_util.tree_leaves(ours.critic), jax.tree_util.tree_leaves(other.critic)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("module", [G, T])
def test_updates_with_the_written_out_renorm_gradient_equal_autodiffs(module, monkeypatch):
    # The speed issue's check that the computation is unchanged: three updates with the written-out gradient
    # and with autodiff's give the same losses, actor gradient norms and critics to float32 rounding. The
    # actor's parameters after its Adam step are not compared: a parameter that batch renorm makes
    # irrelevant (a bias just before one) has a gradient of rounding size, +-1e-8, which Adam's first step
    # turns into a step of +-lr in either version.
    ours, ours_info = small_updates(module, monkeypatch, BatchRenorm=G.BatchRenorm)
    autodiff, autodiff_info = small_updates(module, monkeypatch, BatchRenorm=AutodiffBatchRenorm)
    assert_same_updates(ours, ours_info, autodiff, autodiff_info)
    assert int(ours.critic.batch_stats["VmapQNetwork_0"]["BatchRenorm_1"]["calls"][0, 0]) == 3


class NormThenDense(nn.Module):
    """BatchRenorm then a Dense on [s, a], as the critic's input layer: `folded` as the scripts write it
    (BatchRenorm(affine=False) + NormedDense, s and a as parts in eval mode), else as the layer before it."""

    train: bool
    folded: bool

    @nn.compact
    def __call__(self, s, a):
        norm = G.BatchRenorm(self.train, 0.9, EPS, 1.5, 3.0, 0, affine=not self.folded, name="norm")
        if not self.folded:
            return nn.Dense(5, name="dense")(norm(jnp.concatenate([s, a], -1)))
        return G.NormedDense(5, name="dense")(*(norm(jnp.concatenate([s, a], -1)) if self.train else norm(s, a)))


@pytest.mark.parametrize("train", [True, False])
def test_normed_dense_is_the_dense_layer_after_batch_renorm(train):
    # The same parameters (tree and initial values, bit for bit: checkpoints and random streams are
    # unchanged), the same statistics updates, and the same outputs and gradients to float32 rounding.
    rng = np.random.default_rng(0)
    s, a = (jnp.array(rng.normal(1.0, 2.0, size=(16, n)), jnp.float32) for n in (6, 2))
    plain, folded = NormThenDense(train, folded=False), NormThenDense(train, folded=True)
    init_plain, init_folded = (m.init(jax.random.PRNGKey(0), s, a) for m in (plain, folded))
    assert_same_tree(jax.device_get(init_plain), jax.device_get(init_folded))
    variables = randomised(init_plain)

    def run(module, params, a):
        out, new = module.apply({**variables, "params": params}, s, a, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(out)), (out, new)

    results = [jax.value_and_grad(run, argnums=(1, 2), has_aux=True)(m, variables["params"], a) for m in (plain, folded)]
    ((_, (out_p, stats_p)), grads_p), ((_, (out_f, stats_f)), grads_f) = results
    np.testing.assert_allclose(out_f, out_p, rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(stats_p), jax.tree_util.tree_leaves(stats_f)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree_util.tree_leaves(grads_p), jax.tree_util.tree_leaves(grads_f)):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)


class QNetwork(nn.Module):
    """The critic as it was before NormedDense (named as the scripts' class, so that its parameters have the same
    paths and initial values)."""

    args: object
    train: bool

    @nn.compact
    def __call__(self, s, a):
        norm = (lambda x: G.batch_renorm(self.args, self.train)(x)) if self.args.batch_norm else (lambda x: x)
        x = norm(jnp.concatenate([s, a], axis=-1))
        x = norm(nn.relu(nn.Dense(self.args.critic_width)(x)))
        x = norm(nn.relu(nn.Dense(self.args.critic_width)(x)))
        return nn.Dense(1)(x).squeeze(-1)


@pytest.mark.parametrize("module", [G, T])
def test_critic_skips_the_input_gradient_it_does_not_need(module, monkeypatch):
    # NormedDense: the critic step (batch statistics, gradient w.r.t. the parameters) no longer computes
    # d x_hat = dh W^T of the input layer; the actor loss (running statistics, gradient w.r.t. a) computes
    # it for a's columns alone. Each saving is most of that product's FLOPs, which the critic before paid.
    args = small_args(module)
    B, obs_dim, act_dim, width, n = 64, 40, 3, args.critic_width, args.n_critics
    s, a = jnp.ones((B, obs_dim)), jnp.ones((B, act_dim))

    def flops(train):
        critic = module.CriticEnsemble(args, train)
        variables = critic.init(jax.random.PRNGKey(0), s, a)
        loss = lambda p, a: jnp.sum(critic.apply({**variables, "params": p}, s, a, mutable=["batch_stats"])[0] ** 2)
        fn = jax.jit(jax.grad(loss, argnums=0 if train else 1))
        cost = fn.lower(variables["params"], a).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    ours = {train: flops(train) for train in (True, False)}
    monkeypatch.setattr(module, "QNetwork", QNetwork)
    before = {train: flops(train) for train in (True, False)}
    assert before[True] - ours[True] > 0.8 * 2 * B * width * (obs_dim + act_dim) * n
    assert before[False] - ours[False] > 0.8 * 2 * B * width * obs_dim * n


@pytest.mark.parametrize("module", [G, T])
def test_critic_updates_with_the_input_scale_folded_equal_the_unfolded_ones(module, monkeypatch):
    # The speed issue's check for NormedDense: the critics start from the same values (with and without batch
    # renorm), and three updates (the third also the actor) give the same losses, gradient norms and critics
    # to float32 rounding.
    s, a = jnp.ones((4, 11)), jnp.ones((4, 3))
    for batch_norm in (True, False):
        args = dataclasses.replace(small_args(module), batch_norm=batch_norm)
        ours = module.CriticEnsemble(args, True).init(jax.random.PRNGKey(0), s, a)
        with monkeypatch.context() as patched:
            patched.setattr(module, "QNetwork", QNetwork)
            before = module.CriticEnsemble(args, True).init(jax.random.PRNGKey(0), s, a)
        assert_same_tree(jax.device_get(ours), jax.device_get(before))
    folded, folded_info = small_updates(module, monkeypatch)
    unfolded, unfolded_info = small_updates(module, monkeypatch, QNetwork=QNetwork)
    assert_same_updates(folded, folded_info, unfolded, unfolded_info)


class MaskedPairAttention(T.MultiHeadAttention):
    """Flow-T's attention made to take the general path with one token: the memory gets a second
    token that the mask hides, whose softmax weight is then exactly 0."""

    @nn.compact
    def __call__(self, query, memory, mask=None):
        if memory.shape[-2] != 1 or self.is_initializing():
            return super().__call__(query, memory, mask)
        allowed = jnp.ones((query.shape[-2], 1), bool) if mask is None else mask
        hidden = jnp.zeros((query.shape[-2], 1), bool)
        out, weights = super().__call__(query, jnp.concatenate([memory, jnp.ones_like(memory)], axis=-2),
                                        jnp.concatenate([allowed, hidden], axis=-1))
        assert weights.shape[-1] == 2
        return out, weights[..., :1]


def test_flow_t_single_token_attention_skips_query_and_key_to_the_same_bits(monkeypatch):
    # The speed issue's check for Flow-T's attention shortcut: with one memory token the weights are exactly
    # 1, so out(value(memory)) is the attention's output. Three updates with it and with the general
    # path (queries, keys, softmax) give the same losses, agent and Adam states, bit for bit; the query
    # and key projections exist in both and stay at their initial values (zero gradient).
    fast, fast_info = small_updates(T, monkeypatch, MultiHeadAttention=T.MultiHeadAttention)
    general, general_info = small_updates(T, monkeypatch, MultiHeadAttention=MaskedPairAttention)
    for a, b in zip(fast_info, general_info):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(general)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    block = fast.actor.params["velocity"]["blocks_0"]
    initial = T.create_agent(small_args(T), 11, 3, jax.random.PRNGKey(0)).actor.params["velocity"]["blocks_0"]
    for attention in ("self_attention", "cross_attention"):
        for proj in ("query", "key"):
            np.testing.assert_array_equal(block[attention][proj]["kernel"][0], initial[attention][proj]["kernel"])
        assert not np.array_equal(block[attention]["value"]["kernel"][0], initial[attention]["value"]["kernel"])


# ---------------------------------------------------------------------------------------------
# The authors' actor: batch renormalisation of [s, x_k] (Flow-G); of s, x_k and each sublayer (Flow-T)
# ---------------------------------------------------------------------------------------------


def small_g_args(**kw):
    base = dict(hidden_dim=8, time_emb_dim=4, log_std_hidden=8, flow_steps=3, bn_momentum=0.9)
    return G.Args(**{**base, **kw})


def dense(p, x):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def swish(x):
    return x / (1 + np.exp(-x))


def gated_velocity_by_hand(p, u_hat, x, t, emb_dim):
    """Flow-G's v = z (h - x) from the parameters, in numpy, on already normalised [s, x] features."""
    half = emb_dim // 2
    angles = t * np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    temb = np.concatenate([np.sin(angles), np.cos(angles)], -1)
    # flax names the outer Dense first: Dense_0 is the last layer, Dense_1 the first
    temb = dense(p["TimeEmbedding_0"]["Dense_0"], swish(dense(p["TimeEmbedding_0"]["Dense_1"], temb)))
    f = np.concatenate([u_hat, temb], -1)
    z = 1 / (1 + np.exp(-dense(p["gate_out"], swish(dense(p["gate_hidden"], f)))))
    h = dense(p["candidate_out"], swish(dense(p["candidate_hidden"], f)))
    return z * (h - x)


def randomised(variables, seed=0):
    """The same tree with every float leaf drawn at random, so no layer is an identity at init."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    rng = np.random.default_rng(seed)
    # vectors (norm scales and shifts, running means and variances) positive, matrices centred
    new = [x if x.dtype == jnp.int32 else jnp.array(rng.uniform(0.5, 1.5, x.shape) if x.ndim == 1 else
                                                     rng.normal(0, 0.3, x.shape), jnp.float32) for x in leaves]
    return jax.tree_util.tree_unflatten(tree, new)


@pytest.mark.parametrize("train", [True, False])
def test_flow_g_actor_batch_renormalises_obs_and_x_per_step(train):
    # The deterministic rollout (x_0 = 0, no noise) recomputed in numpy: at every step [s, x_k] is
    # normalised with the batch's statistics (train: the actor loss) or the running ones (acting and the
    # critic target), then Flow-G's gate and candidate act on it; in train mode the running statistics
    # move once per step, in eval mode not at all.
    args = small_g_args()
    obs_dim, act_dim, B = 5, 2, 16
    rng = np.random.default_rng(3)
    s = jnp.array(rng.normal(2.0, 3.0, size=(B, obs_dim)), jnp.float32)
    policy = G.FlowPolicy(args, act_dim, train=train)
    variables = randomised(policy.init(jax.random.PRNGKey(0), s, jax.random.PRNGKey(1)))
    (action, _, path), new = policy.apply(variables, s, jax.random.PRNGKey(1), deterministic=True,
                                          mutable=["batch_stats"])
    norm_p, stats_ = variables["params"]["input_norm"], variables["batch_stats"]["input_norm"]
    mean, var = np.asarray(stats_["mean"], np.float64), np.asarray(stats_["var"], np.float64)
    x, dt = np.zeros((B, act_dim)), 1.0 / args.flow_steps
    for k in range(args.flow_steps):
        u = np.concatenate([np.asarray(s, np.float64), x], -1)
        m, v = (u.mean(0), u.var(0)) if train else (mean, var)
        u_hat = (u - m) / np.sqrt(v + args.bn_eps) * np.asarray(norm_p["scale"]) + np.asarray(norm_p["bias"])
        if train:
            mean, var = 0.9 * mean + 0.1 * u.mean(0), 0.9 * var + 0.1 * u.var(0)
        x = x + dt * gated_velocity_by_hand(variables["params"]["velocity"], u_hat, x, np.full((B, 1), k * dt), 4)
        np.testing.assert_allclose(np.asarray(path["xs"][k + 1]), x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(action), np.tanh(x), rtol=1e-4, atol=1e-5)
    assert np.isfinite(x).all() and np.abs(x).max() > 0.1
    new_stats = new["batch_stats"]["input_norm"]
    np.testing.assert_allclose(np.asarray(new_stats["mean"]), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_stats["var"]), var, rtol=1e-4, atol=1e-5)
    assert int(new_stats["calls"]) == (args.flow_steps if train else 0)


def test_flow_g_log_std_head_reads_the_observation_alone():
    args = small_g_args()
    s = jnp.array(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
    policy = G.FlowPolicy(args, 2)
    variables = policy.init(jax.random.PRNGKey(0), s, jax.random.PRNGKey(1))
    assert variables["params"]["log_std"]["Dense_0"]["kernel"].shape == (5, 8)  # s only, no time input
    expected = G.LogStdHead(2, 8, -5.0, 2.0).apply({"params": variables["params"]["log_std"]}, s)
    log_std = policy.apply(variables, s, jax.random.PRNGKey(1))[2]["log_std"]
    np.testing.assert_allclose(log_std, jnp.mean(expected), rtol=1e-6)  # the same sigma at every step
    timed = G.FlowPolicy(small_g_args(log_std_input="obs-time"), 2).init(jax.random.PRNGKey(0), s, jax.random.PRNGKey(1))
    assert timed["params"]["log_std"]["Dense_0"]["kernel"].shape == (6, 8)  # (s, t)


def test_flow_t_actor_normalises_obs_once_x_per_step_and_every_sublayer():
    args = T.Args(d_model=8, n_heads=2, n_layers=2, flow_steps=3, bn_momentum=0.9)
    B, obs_dim = 16, 5
    s = jnp.array(np.random.default_rng(4).normal(1.0, 2.0, size=(B, obs_dim)), jnp.float32)
    policy = T.FlowPolicy(args, 2, train=True)
    variables = randomised(policy.init(jax.random.PRNGKey(0), s, jax.random.PRNGKey(1)))
    (_, log_pi, _), new = policy.apply(variables, s, jax.random.PRNGKey(2), mutable=["batch_stats"])
    calls = {"/".join(str(getattr(p, "key", p)) for p in path[:-1]): int(leaf)
             for path, leaf in jax.tree_util.tree_flatten_with_path(new["batch_stats"])[0] if path[-1].key == "calls"}
    expected = {"velocity/state_norm": 1, **{f"velocity/x_norms_{k}": 1 for k in range(3)},
                **{f"velocity/blocks_{i}/norm_{n}": 3 for i in range(2) for n in ["self", "cross", "ffn"]}}
    assert calls == expected
    # the state token: the observation normalised with its batch statistics, then the encoder
    p = variables["params"]["velocity"]
    s64 = np.asarray(s, np.float64)
    s_hat = (s64 - s64.mean(0)) / np.sqrt(s64.var(0) + args.bn_eps) * np.asarray(p["state_norm"]["scale"]) \
        + np.asarray(p["state_norm"]["bias"])
    h = dense(p["state_encoder_0"], s_hat)
    token = dense(p["state_encoder_1"], h / (1 + np.exp(-h)))
    velocity = T.DecodedVelocity(2, 8, 2, 2, functools.partial(T.batch_renorm, args, True), 3)
    got, _ = velocity.apply({"params": p, "batch_stats": variables["batch_stats"]["velocity"]}, s, method="encode_state",
                            mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(got)[:, 0], token, rtol=1e-4, atol=1e-5)
    # log pi from the decoder output head: sigma depends on x_k, and the log-density stays finite
    assert "log_std" in variables["params"] and variables["params"]["log_std"]["kernel"].shape == (8, 2)
    assert np.isfinite(np.asarray(log_pi)).all()
    # running statistics differ from batch statistics, so acting (eval mode) differs from the actor loss's pass
    eval_pi = T.FlowPolicy(args, 2, train=False).apply(variables, s, jax.random.PRNGKey(2))[1]
    assert not np.allclose(np.asarray(eval_pi), np.asarray(log_pi))


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

TINY = ["--env-id", "Hopper-v4", "--total-timesteps", "500", "--learning-starts", "250", "--batch-size", "32",
        "--buffer-size", "1000", "--critic-width", "32", "--log-std-hidden", "16", "--log-every", "50",
        "--eval-every", "500", "--eval-episodes", "1", "--no-progress", "--save-model"]
RUNS = {
    "gated": ("sac_flow_g.py", ["--hidden-dim", "32"]),
    "naive_target_marginal": ("sac_flow_g.py", ["--hidden-dim", "16", "--velocity", "mlp", "--target-network",
                                                "--drift", "marginal", "--step-noise", "sqrt-dt", "--log-std-input",
                                                "obs-time", "--no-actor-batch-norm", "--flow-steps", "2"]),
    "decoded": ("sac_flow_t.py", ["--d-model", "16", "--n-heads", "2", "--n-layers", "1"]),
    "decoded_layernorm_marginal": ("sac_flow_t.py", ["--d-model", "16", "--n-heads", "2", "--n-layers", "1",
                                                     "--no-actor-batch-norm", "--drift", "marginal", "--step-noise",
                                                     "sqrt-dt", "--log-std-input", "obs-time", "--action-units", "unit"]),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_short_run_learns_logs_saves_and_reloads(tmp_path, name):
    script, extra = RUNS[name]
    track = ["--track"] if name == "gated" else []  # also to wandb, offline (no network here)
    result = run_script(script, TINY + extra + track, cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "update compiled 1 time(s)" in result.stdout  # one compiled update for the whole run

    run_dir = only_run_dir(tmp_path)
    scalars = read_scalars(run_dir)
    K = int(extra[extra.index("--flow-steps") + 1]) if "--flow-steps" in extra else 4
    tags = ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "eval/episodic_return", "losses/qf_loss",
            "losses/qf_values", "losses/actor_loss", "losses/alpha", "losses/alpha_loss", "losses/entropy",
            "losses/log_std", *[f"grad/step_{k}" for k in range(K)]]
    for tag in tags:
        assert tag in scalars and scalars[tag] and all_finite(scalars[tag]), tag
    assert f"grad/step_{K}" not in scalars
    assert scalars["losses/qf_loss"][0][0] == 300  # the first log point after learning starts at 250
    alphas = [v for _, v in scalars["losses/alpha"]]
    assert alphas[-1] != pytest.approx(0.2, abs=1e-4)  # autotuned away from its initial value
    assert all(v > 0 for v in alphas)
    if track:
        assert_wandb_matches_tensorboard(run_dir, tags, {"env_id": "Hopper-v4", "hidden_dim": 32, "agent_seed": 1})

    model = os.path.join(run_dir, f"{script[:-3]}.msgpack")
    assert os.path.isfile(model)
    result = run_script(script, ["--eval-only", "--checkpoint", model, "--eval-episodes", "1", "--no-progress"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Hopper-v4: eval return" in result.stdout and "over 1 episodes" in result.stdout


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, nothing started
# ---------------------------------------------------------------------------------------------

BAD_BOTH = [
    (["--env-id", "Hoper-v4"], ["unknown --env-id 'Hoper-v4'", "Hopper-v4"]),
    (["--keep-checkpoints", "0"], ["--keep-checkpoints must be at least 1, got 0"]),
    (["--batch-size", "512", "--buffer-size", "100"], ["--batch-size 512", "--buffer-size 100"]),
    (["--batch-size", "-4"], ["--batch-size must be positive, got -4"]),
    (["--q-lr", "0"], ["--q-lr must be positive, got 0"]),
    (["--policy-lr", "-0.001"], ["--policy-lr must be positive, got -0.001"]),
    (["--alpha-lr", "0"], ["--alpha-lr must be positive"]),
    (["--flow-steps", "0"], ["--flow-steps must be positive, got 0"]),
    (["--critic-width", "0"], ["--critic-width must be positive, got 0"]),
    (["--tau", "0"], ["--tau must be in (0.0, 1.0], got 0.0"]),
    (["--gamma", "1.5"], ["--gamma must be in [0.0, 1.0], got 1.5"]),
    (["--eval-only"], ["--eval-only needs --checkpoint"]),
    (["--eval-only", "--checkpoint", "missing.msgpack"], ["--checkpoint 'missing.msgpack' does not exist"]),
]
BAD = [(G, args, f) for args, f in BAD_BOTH] + [(T, args, f) for args, f in BAD_BOTH] + [
    (T, ["--d-model", "100", "--n-heads", "3"], ["--d-model 100 is not divisible by --n-heads 3"]),
    (T, ["--n-heads", "0"], ["--n-heads must be positive, got 0"]),
    (G, ["--time-emb-dim", "7"], ["--time-emb-dim must be an even number"]),
    (G, ["--drift", "marginal"], ["--drift marginal needs --step-noise sqrt-dt", "got --step-noise sigma"]),
    (T, ["--drift", "marginal"], ["--drift marginal needs --step-noise sqrt-dt", "got --step-noise sigma-dt"]),
    (T, ["--drift", "marginal", "--step-noise", "sqrt-dt"], ["--drift marginal needs a noise level independent of x_k",
                                                              "--log-std-input obs-time"]),
]


@pytest.mark.parametrize("module,args,fragments", BAD, ids=[f"{m.__name__}:{' '.join(a)}" for m, a, _ in BAD])
def test_bad_input_is_one_line_before_anything_starts(tmp_path, monkeypatch, capsys, module, args, fragments):
    monkeypatch.chdir(tmp_path)
    assert module.main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{module.__name__}.py: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("script,args,fragment", [
    ("sac_flow_t.py", ["--d-model", "96", "--n-heads", "5"], "--d-model 96 is not divisible by --n-heads 5"),
    ("sac_flow_g.py", ["--flow-steps", "-1"], "--flow-steps must be positive, got -1"),
])
def test_bad_input_as_a_user_sees_it(tmp_path, script, args, fragment):
    result = run_script(script, args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0]
    assert not os.path.exists(tmp_path / "runs")


def test_checkpoint_of_the_other_script_is_refused(tmp_path, monkeypatch, capsys):
    from common.checkpoint import save_model

    foreign = tmp_path / "g.msgpack"
    save_model(str(foreign), "sac_flow_g", {}, {})
    monkeypatch.chdir(tmp_path)
    assert T.main(["--eval-only", "--checkpoint", str(foreign)]) == 2
    assert "was written by sac_flow_g, not sac_flow_t" in capsys.readouterr().err


@pytest.mark.parametrize("module", [G, T])
def test_model_file_of_the_earlier_actor_is_refused_saying_why(tmp_path, monkeypatch, capsys, module):
    # A model file written before the authors' actor (no batch renormalisation, other log-std inputs): its
    # config has none of the new settings, and its networks cannot be rebuilt.
    from common.checkpoint import save_model

    old_config = {"env_id": "Hopper-v4", "flow_steps": 4, "drift": "plain", "log_std_hidden": 512, "log_std_min": -5.0,
                  "log_std_max": 2.0}
    path = tmp_path / "old.msgpack"
    save_model(str(path), module.ALGO, old_config, {"actor": {"params": {}}})
    monkeypatch.chdir(tmp_path)
    assert module.main(["--eval-only", "--checkpoint", str(path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"was written by an older version of {module.ALGO}" in lines[0], lines
    assert "--step-noise" in lines[0] and "--actor-batch-norm" in lines[0]
