"""Identities of the distillation loss family (docs/distillation.md), against float64 numpy references.

Tolerances: float32 against float64 references at rtol 1e-5 / atol 1e-5 (small, well-conditioned logits);
statistical checks state their own bound. alpha = 0 against `cross_entropy` is bitwise."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama4_jax import sharding
from llama4_jax.train import losses
from llama4_jax.train.losses import (
    DistillLossConfig,
    OnlineTargets,
    SampledTargets,
    TaidState,
    TopKTargets,
    alpha_at,
    corrected,
    distill_loss,
    divergence,
    taid_update,
)

B, T, V = 2, 8, 16
RTOL = ATOL = 1e-5
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl")
identity = lambda h: h  # "hidden" are the logits themselves: gradients are then d/d logits


def _data(seed=0, b=B, t=T, v=V, scale=1.5):
    rng = np.random.default_rng(seed)
    zs = (scale * rng.normal(size=(b, t, v))).astype(np.float32)
    zt = (scale * rng.normal(size=(b, t, v))).astype(np.float32)
    return zs, zt, rng.integers(0, v, (b, t)), np.ones((b, t), np.float32)


# ---- float64 references ------------------------------------------------------------------------------------

def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(lp, lq):
    p = np.exp(lp)
    return np.where(p > 0, p * (lp - lq), 0.0).sum(-1)


def _div(kind, lt, ls, beta=0.5, lam=0.1):
    pt, ps = np.exp(lt), np.exp(ls)
    if kind == "forward_kl":
        return _kl(lt, ls)
    if kind == "reverse_kl":
        return _kl(ls, lt)
    if kind == "jsd":
        lm = np.log(beta * pt + (1 - beta) * ps)
        return beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)
    return _kl(lt, np.log(lam * pt + (1 - lam) * ps))


def _reference(zs, zt, y, w, kind, tau, alpha):
    zs, zt = zs.astype(np.float64), zt.astype(np.float64)
    ls1, lt1 = _log_softmax(zs), _log_softmax(zt)
    nll = -np.take_along_axis(ls1, y[..., None], -1)[..., 0]
    soft = tau**2 * _div(kind, _log_softmax(zt / tau), _log_softmax(zs / tau))
    return {"loss_sum": (((1 - alpha) * nll + alpha * soft) * w).sum(), "soft_sum": (soft * w).sum(),
            "hard_sum": (nll * w).sum(), "kl_sum": (_kl(lt1, ls1) * w).sum(),
            "teacher_ce_sum": (-np.take_along_axis(lt1, y[..., None], -1)[..., 0] * w).sum(),
            "disagree_sum": ((zt.argmax(-1) != y) * w).sum(), "tokens": w.sum()}


def _online(zs, zt, y, w, config, step=0, chunk=1024, **kw):
    return distill_loss(identity, jnp.asarray(zs), OnlineTargets(identity, jnp.asarray(zt)), jnp.asarray(y),
                        jnp.asarray(w), config=config, step=step, chunk=chunk, **kw)


def _with_grad(loss_fn, x):
    """loss_fn's dict of sums and the gradient of its "loss_sum" at x, from one jitted program."""
    both = jax.jit(jax.value_and_grad(lambda z: (loss_fn(z)["loss_sum"], loss_fn(z)), has_aux=True))
    (_, sums), grad = both(jnp.asarray(x))
    return {k: np.asarray(v) for k, v in sums.items()}, grad


def _close(a, b, rtol=RTOL, atol=ATOL):
    for k in b:
        np.testing.assert_allclose(np.asarray(a[k], np.float64), b[k], rtol=rtol, atol=atol, err_msg=k)


# ---- the divergences ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_loss_matches_float64_reference(kind, tau):
    zs, zt, y, w = _data()
    w[1, 5:] = 0.0
    out = _online(zs, zt, y, w, DistillLossConfig(divergence=kind, temperature=tau, alpha=0.3), chunk=4)
    _close(out, _reference(zs, zt, y, w, kind, tau, 0.3))
    np.testing.assert_allclose(out["alpha_sum"], 0.3 * w.sum(), rtol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_zero_with_zero_gradient_when_student_equals_teacher(kind, tau):
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(B, T, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(8, V)), jnp.float32)
    logits_fn = lambda h: h @ head
    config = DistillLossConfig(divergence=kind, temperature=tau, alpha=1.0, alpha_end=1.0)
    soft = lambda h: distill_loss(logits_fn, h, OnlineTargets(logits_fn, hidden), jnp.zeros((B, T), int),
                                  jnp.ones((B, T)), config=config, step=0, chunk=4)["soft_sum"]
    value, grad = jax.jit(jax.value_and_grad(soft))(hidden)
    assert abs(float(value)) < 1e-5
    np.testing.assert_allclose(grad, 0.0, atol=1e-5)


def test_alpha_zero_is_exactly_cross_entropy():
    zs, zt, y, w = _data(2)
    w[0, 6:] = 0.0
    config = DistillLossConfig(divergence="jsd", temperature=2.0, alpha=0.0, alpha_end=0.0)
    ce = lambda s: losses.cross_entropy(identity, s, jnp.asarray(y), jnp.asarray(w), chunk=4)["loss_sum"]
    dist = lambda s: _online(s, zt, y, w, config, chunk=4)["loss_sum"]
    (a, ga), (b, gb) = jax.value_and_grad(ce)(jnp.asarray(zs)), jax.value_and_grad(dist)(jnp.asarray(zs))
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    np.testing.assert_array_equal(ga, gb)


def test_temperature_scaling_is_tau_squared_times_tempered_kl():
    zs, zt, y, w = _data(3)
    tau = 4.0
    config = DistillLossConfig(temperature=tau, alpha=1.0, alpha_end=1.0)
    soft = lambda s: _online(s, zt, y, w, config, chunk=4)["soft_sum"]
    value, grad = jax.value_and_grad(soft)(jnp.asarray(zs))
    ls, lt = _log_softmax(zs.astype(np.float64) / tau), _log_softmax(zt.astype(np.float64) / tau)
    np.testing.assert_allclose(value, tau**2 * _kl(lt, ls).sum(), rtol=RTOL)
    # d/dz [tau^2 KL(p_T^tau || p_S^tau)] = tau^2 (p_S^tau - p_T^tau) / tau: the soft gradient keeps its size.
    np.testing.assert_allclose(grad, tau * (np.exp(ls) - np.exp(lt)), rtol=RTOL, atol=ATOL)


def test_jsd_limits_and_symmetry_and_skew_limits():
    zs, zt, _, _ = _data(4)
    ls, lt = jax.nn.log_softmax(jnp.asarray(zs)), jax.nn.log_softmax(jnp.asarray(zt))
    d = lambda lp, lq, **kw: np.asarray(divergence(DistillLossConfig(**kw), lp, lq), np.float64)
    fkl, rkl = d(lt, ls, divergence="forward_kl"), d(lt, ls, divergence="reverse_kl")
    for beta in (0.0, 1.0):  # M is one of the two distributions: both terms vanish
        np.testing.assert_allclose(d(lt, ls, divergence="jsd", beta=beta), 0.0, atol=1e-6)
    # Near the ends JSD(beta) is the forward (beta -> 0) or reverse (beta -> 1) KL scaled by beta, up to O(beta).
    eps = 1e-4  # the O(beta) term, relative to the KL, is a chi-square: up to ~20 eps on these logits
    np.testing.assert_allclose(d(lt, ls, divergence="jsd", beta=eps) / eps, fkl, rtol=1e-2)
    np.testing.assert_allclose(d(lt, ls, divergence="jsd", beta=1 - eps) / eps, rkl, rtol=1e-2)
    # Swapping teacher and student is the same as beta -> 1 - beta; beta = 0.5 is symmetric and <= log 2.
    np.testing.assert_allclose(d(lt, ls, divergence="jsd", beta=0.3), d(ls, lt, divergence="jsd", beta=0.7),
                               rtol=1e-5)
    half = d(lt, ls, divergence="jsd", beta=0.5)
    np.testing.assert_allclose(half, d(ls, lt, divergence="jsd", beta=0.5), rtol=1e-5)
    assert np.all(half <= math.log(2) + 1e-6)  # beta = 0.5 is the classic Jensen-Shannon divergence, <= log 2
    np.testing.assert_allclose(d(lt, ls, divergence="skew_kl", skew_lambda=0.0), fkl, rtol=1e-6)
    np.testing.assert_allclose(d(lt, ls, divergence="skew_kl", skew_lambda=1.0), 0.0, atol=1e-6)


# ---- target formats -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,tau,confidence", [("forward_kl", 1.0, "none"), ("reverse_kl", 2.0, "label_prob"),
                                                 ("jsd", 1.0, "entropy"), ("skew_kl", 2.0, "none")])
def test_topk_with_k_equal_vocab_equals_dense(kind, tau, confidence):
    zs, zt, y, w = _data(5)
    order = np.argsort(-zt, axis=-1)  # any order of the ids: here the teacher's ranking, as a cache stores it
    lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(jnp.asarray(zt))), order, -1)
    config = DistillLossConfig(divergence=kind, temperature=tau, alpha=0.7, confidence=confidence)
    sparse, g_sparse = _with_grad(lambda s: distill_loss(identity, s, TopKTargets(jnp.asarray(order), jnp.asarray(lp)),
                                                         jnp.asarray(y), jnp.asarray(w), config=config, step=0,
                                                         chunk=4), zs)
    dense, g_dense = _with_grad(lambda s: _online(s, zt, y, w, config, chunk=4), zs)
    _close(sparse, dense)
    np.testing.assert_allclose(g_sparse, g_dense, rtol=RTOL, atol=ATOL)


def test_topk_tail_bucket_matches_formula():
    zs, zt, y, w = _data(6)
    k = 5
    lt = _log_softmax(zt.astype(np.float64))
    ids = np.argsort(-zt, axis=-1)[..., :k]
    lp = np.take_along_axis(lt, ids, -1)
    out = distill_loss(identity, jnp.asarray(zs), TopKTargets(jnp.asarray(ids), jnp.asarray(lp, jnp.float32)),
                       jnp.asarray(y), jnp.asarray(w), config=DistillLossConfig(alpha=1.0, confidence="label_prob"),
                       step=0, chunk=4)
    ls = _log_softmax(zs.astype(np.float64))
    ls_k = np.take_along_axis(ls, ids, -1)
    tail_t, tail_s = 1 - np.exp(lp).sum(-1), 1 - np.exp(ls_k).sum(-1)
    # docs/distillation.md: sum_K p_T (log p_T - log p_S) + (1 - sum_K p_T) [log(1 - sum_K p_T) - log(1 - sum_K p_S)]
    ref = (np.exp(lp) * (lp - ls_k)).sum(-1) + tail_t * (np.log(tail_t) - np.log(tail_s))
    np.testing.assert_allclose(out["soft_sum"], ref.sum(), rtol=RTOL)
    np.testing.assert_allclose(out["kl_sum"], ref.sum(), rtol=RTOL)
    in_k = (ids == y[..., None]).any(-1)
    tce = np.where(in_k, -np.take_along_axis(lt, y[..., None], -1)[..., 0], -np.log(tail_t / (V - k)))
    np.testing.assert_allclose(out["teacher_ce_sum"], tce.sum(), rtol=RTOL)
    np.testing.assert_allclose(out["alpha_sum"], np.exp(-tce).sum(), rtol=RTOL)  # alpha * p_T(label)
    assert float(out["disagree_sum"]) == float((ids[..., 0] != y).sum())


def test_topk_without_tail_is_the_renormalised_target():
    """topk_tail=False (the biased ablation): sum_K q log(q / p_S) with q = p_T / sum_K p_T; metrics unchanged."""
    zs, zt, y, w = _data(7)
    k = 5
    lt = _log_softmax(zt.astype(np.float64))
    ids = np.argsort(-zt, axis=-1)[..., :k]
    lp = np.take_along_axis(lt, ids, -1)
    targets = TopKTargets(jnp.asarray(ids), jnp.asarray(lp, jnp.float32))
    run = lambda tail: distill_loss(identity, jnp.asarray(zs), targets, jnp.asarray(y), jnp.asarray(w), step=0,
                                    config=DistillLossConfig(alpha=1.0, topk_tail=tail), chunk=4)
    out, with_tail = run(False), run(True)
    ls_k = np.take_along_axis(_log_softmax(zs.astype(np.float64)), ids, -1)
    q = np.exp(lp) / np.exp(lp).sum(-1, keepdims=True)
    np.testing.assert_allclose(out["soft_sum"], (q * (np.log(q) - ls_k)).sum(), rtol=RTOL)
    np.testing.assert_allclose(out["kl_sum"], with_tail["kl_sum"], rtol=RTOL)
    assert abs(float(out["soft_sum"]) - float(with_tail["soft_sum"])) > 1e-2


def test_sampled_targets_average_to_teacher_distribution():
    rows, draws, v = 400, 50, 8
    rng = np.random.default_rng(7)
    pt = np.exp(_log_softmax(rng.normal(size=v)))
    zs = rng.normal(size=(1, 1, v)).astype(np.float32)
    counts = rng.multinomial(draws, pt, size=rows)[:, None, :]  # (rows, 1, V): slot j holds id j
    ids = np.broadcast_to(np.arange(v), counts.shape)
    student = jnp.broadcast_to(jnp.asarray(zs), (rows, 1, v))
    soft = lambda s: distill_loss(identity, s, SampledTargets(jnp.asarray(ids), jnp.asarray(counts)),
                                  jnp.zeros((rows, 1), int), jnp.ones((rows, 1)),
                                  config=DistillLossConfig(alpha=1.0), step=0)["soft_sum"]
    value, grad = jax.value_and_grad(soft)(student)
    q = counts / draws
    ls = _log_softmax(zs.astype(np.float64))
    entropy = np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0.0).sum()
    np.testing.assert_allclose(value, entropy - (q * ls).sum(), rtol=RTOL)  # KL(count/N || p_S)
    # Each row's gradient is p_S - count/N; their mean estimates the dense p_S - p_T with standard error
    # sqrt(p (1 - p) / (rows * N)). Bound: 5 standard errors.
    ps = np.exp(ls[0, 0])
    stderr = np.sqrt(pt * (1 - pt) / (rows * draws))
    assert np.all(np.abs(np.asarray(grad).mean((0, 1)) - (ps - pt)) < 5 * stderr + 1e-6)
    with pytest.raises(ValueError, match="forward KL only"):
        distill_loss(identity, student, SampledTargets(jnp.asarray(ids), jnp.asarray(counts)),
                     jnp.zeros((rows, 1), int), jnp.ones((rows, 1)),
                     config=DistillLossConfig(divergence="reverse_kl"), step=0)


# ---- chunks, shards, padding --------------------------------------------------------------------------------

CONFIGS = [DistillLossConfig(divergence="jsd", temperature=2.0, beta=0.3, alpha=0.6),
           DistillLossConfig(divergence="skew_kl", confidence="entropy", target="corrected", alpha=0.8),
           DistillLossConfig(confidence="label_prob", target="taid", alpha=0.5)]


@pytest.mark.parametrize("config", CONFIGS, ids=["jsd", "corrected", "taid"])
def test_chunked_equals_unchunked(config):
    zs, zt, y, w = _data(8)
    chunked, g_chunked = _with_grad(lambda s: _online(s, zt, y, w, config, chunk=2, taid_t=0.7), zs)
    whole, g_whole = _with_grad(lambda s: _online(s, zt, y, w, config, chunk=T, taid_t=0.7), zs)
    _close(chunked, whole)
    np.testing.assert_allclose(g_chunked, g_whole, rtol=RTOL, atol=ATOL)


def test_vocab_sharded_equals_plain():
    mesh = sharding.make_mesh(sharding.MeshConfig(tensor=8, fsdp=1))
    v, d = 128, 8
    rng = np.random.default_rng(9)
    hs, ht = (jnp.asarray(rng.normal(size=(B, T, d)), jnp.float32) for _ in range(2))
    ws, wt = (jnp.asarray(rng.normal(size=(d, v)), jnp.float32) for _ in range(2))
    y, w = jnp.asarray(rng.integers(0, v, (B, T))), jnp.ones((B, T))
    ids = jnp.asarray(np.argsort(-rng.normal(size=(B, T, v)), axis=-1)[..., :6])
    lp = jnp.take_along_axis(jax.nn.log_softmax(ht @ wt), ids, axis=-1)

    def value_and_grads(config, targets):
        loss = lambda head: distill_loss(lambda h: h @ head, hs, targets, y, w, config=config, step=0, chunk=4)
        compiled = jax.jit(lambda head: (loss(head), jax.grad(lambda hd: loss(hd)["loss_sum"])(head))).lower(
            ws).compile()
        return compiled(ws), compiled.as_text()

    online = OnlineTargets(lambda h: h @ wt, ht)
    for config, targets in [(CONFIGS[0], online), (CONFIGS[1], online),
                            (DistillLossConfig(divergence="reverse_kl", temperature=2.0), TopKTargets(ids, lp))]:
        (plain, g_plain), _ = value_and_grads(config, targets)
        with sharding.use_sharding(mesh):  # every chunk's logits constrained to ("batch", "length", "tensor")
            (shard, g_shard), hlo = value_and_grads(config, targets)
        # Vocab-parallel: each device holds (B, chunk, V / 8) logits and nothing of vocabulary size is gathered
        # (argmax gathers one candidate per shard, (B, chunk, 8)).
        gathered = [line.split("all-gather(")[0] for line in hlo.splitlines() if "all-gather(" in line]
        assert f"f32[{B},4,{v // 8}]" in hlo and not any(f",{v}]" in g for g in gathered), gathered
        _close(shard, {k: np.asarray(x) for k, x in plain.items()})
        np.testing.assert_allclose(g_shard, g_plain, rtol=RTOL, atol=ATOL)


def test_padding_with_garbage_does_not_change_the_loss():
    zs, zt, y, w = _data(10, t=6)
    rng = np.random.default_rng(11)
    pad = lambda x, garbage: np.concatenate([x, garbage], axis=1)
    zs_p, zt_p = pad(zs, 1e3 * rng.normal(size=(B, 2, V))), pad(zt, 1e3 * rng.normal(size=(B, 2, V)))
    y_p, w_p = pad(y, rng.integers(0, V, (B, 2))), pad(w, np.zeros((B, 2), np.float32))
    config = CONFIGS[1]
    _close(_online(zs_p.astype(np.float32), zt_p.astype(np.float32), y_p, w_p, config, chunk=4),
           {k: np.asarray(v) for k, v in _online(zs, zt, y, w, config, chunk=3).items()})
    ids = np.argsort(-zt, -1)[..., :4]
    lp = np.take_along_axis(_log_softmax(zt.astype(np.float64)), ids, -1)
    ids_p, lp_p = pad(ids, rng.integers(0, V, (B, 2, 4))), pad(lp, 1e3 * rng.normal(size=(B, 2, 4)))
    sparse = lambda *a: distill_loss(identity, *(jnp.asarray(x) for x in a[:1]),
                                     TopKTargets(jnp.asarray(a[1]), jnp.asarray(a[2], jnp.float32)),
                                     jnp.asarray(a[3]), jnp.asarray(a[4]), config=DistillLossConfig(), step=0)
    _close(sparse(zs_p.astype(np.float32), ids_p, lp_p, y_p, w_p),
           {k: np.asarray(v) for k, v in sparse(zs, ids, lp, y, w).items()})


# ---- alpha: schedules, per token, correction, TAID ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "wsd"])
def test_schedules_reach_their_endpoints(kind):
    config = DistillLossConfig(alpha_schedule=kind, alpha=0.9, alpha_end=0.2, burn_in_steps=10, warmup_steps=5,
                               decay_steps=20, total_steps=110)
    at = lambda s: float(alpha_at(config, s))
    assert at(0) == at(9) == 0.0  # burn-in: hard labels only
    end = 0.9 if kind == "constant" else 0.2
    assert at(110) == pytest.approx(end, abs=1e-7) and at(10_000) == pytest.approx(end, abs=1e-7)
    if kind == "wsd":
        assert at(10) == 0.0 and at(15) == pytest.approx(0.9) and at(90) == pytest.approx(0.9)
        assert at(100) == pytest.approx(0.55)
    else:
        assert at(10) == pytest.approx(0.9, abs=1e-7)
        assert at(60) == pytest.approx(0.9 if kind == "constant" else 0.55, abs=1e-6)  # halfway, both schedules


def test_confidence_alpha_per_token():
    zs, zt, y, w = _data(12)
    lt = _log_softmax(zt.astype(np.float64))
    p_y = np.exp(np.take_along_axis(lt, y[..., None], -1)[..., 0])
    entropy = -(np.exp(lt) * lt).sum(-1)
    for confidence, c in (("label_prob", p_y), ("entropy", 1 - entropy / np.log(V))):
        out = _online(zs, zt, y, w, DistillLossConfig(alpha=0.8, confidence=confidence), chunk=4)
        np.testing.assert_allclose(out["alpha_sum"], 0.8 * c.sum(), rtol=RTOL)
        ref = _reference(zs, zt, y, w, "forward_kl", 1.0, 0.8 * c)
        np.testing.assert_allclose(out["loss_sum"], ref["loss_sum"], rtol=RTOL)


def test_teacher_correction_makes_the_label_lead_by_the_margin():
    zs, zt, y, _ = _data(13)
    lt = jax.nn.log_softmax(jnp.asarray(zt))
    q = np.exp(np.asarray(corrected(lt, jnp.asarray(y), 0.2), np.float64))
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-5)
    q_y = np.take_along_axis(q, y[..., None], -1)[..., 0]
    others = np.where(np.arange(V) == y[..., None], -1.0, q).max(-1)
    wrong = np.asarray(jnp.argmax(lt, -1)) != y
    assert wrong.sum() > 5
    np.testing.assert_allclose((q_y - others)[wrong], 0.2, atol=1e-5)
    np.testing.assert_allclose(q[~wrong], np.exp(np.asarray(lt, np.float64))[~wrong], rtol=1e-5)


def test_taid_target_and_t_update():
    zs, zt, y, w = _data(14)
    # A rate above the ramp's slope, so that the adaptive step (not the linear floor) moves t.
    config = DistillLossConfig(target="taid", alpha=1.0, alpha_end=1.0, total_steps=1000, taid_rate=0.01)
    # t = 1 is the teacher; the target is otherwise a logit interpolation from the (frozen) student.
    _close(_online(zs, zt, y, w, config, taid_t=1.0), {k: np.asarray(v) for k, v in _online(
        zs, zt, y, w, DistillLossConfig(alpha=1.0, alpha_end=1.0)).items()})
    mix = _log_softmax(0.6 * zs.astype(np.float64) + 0.4 * zt)
    np.testing.assert_allclose(_online(zs, zt, y, w, config, taid_t=0.4)["soft_sum"],
                               _kl(mix, _log_softmax(zs.astype(np.float64))).sum(), rtol=RTOL)
    falling, rising = TaidState.init(config), TaidState.init(config)
    for step in range(1, 200):
        falling = taid_update(falling, 10.0 - 0.04 * step, step, config)
        rising = taid_update(rising, 2.0 + 0.04 * step, step, config)
        ramp = 0.4 + 0.6 * step / 1000
        assert (step == 1 or float(rising.t) >= ramp - 1e-6) and float(falling.t) <= 1.0  # step 1 records the loss
    assert float(falling.t) > float(rising.t)
    assert float(taid_update(falling, 1.0, 1000, config).t) == 1.0  # the ramp ends at t_end


def test_teacher_gets_no_gradient():
    zs, zt, y, w = _data(15)
    grad = jax.grad(lambda t: _online(zs, t, y, w, CONFIGS[0])["loss_sum"])(jnp.asarray(zt))
    assert not np.any(np.asarray(grad))


@pytest.mark.parametrize("field,value,match", [
    ("divergence", "kl", "divergence must be one of"), ("beta", 1.5, "beta must be in"),
    ("temperature", 0.0, "temperature must be"), ("alpha_schedule", "step", "alpha_schedule must be one of"),
    ("total_steps", 0, "total_steps must be"), ("target", "x", "target must be one of"),
    ("confidence", "x", "confidence must be one of")])
def test_config_validation_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=f"DistillLossConfig.{match}"):
        DistillLossConfig(**{field: value})
