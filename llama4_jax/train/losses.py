"""Losses, computed in float32 from final hidden states in sequence chunks, so the float32 (B, T, V) logits
never exist at once (V = 202048 makes them 6.6 GB per 8192-token sequence)."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from llama4_jax import loops
from llama4_jax.sharding import constrain
from llama4_jax.train.distill_losses import (  # noqa: F401  (re-exported: losses.py is the entry point)
    DistillLossConfig,
    OnlineTargets,
    SampledTargets,
    TaidState,
    TopKTargets,
    alpha_at,
    corrected,
    divergence,
    kl,
    sampled_teacher_bins,
    student_bins,
    taid_update,
    topk_teacher_bins,
)


def _chunks(x: jax.Array, size: int) -> jax.Array:
    """(B, T, ...) -> (T/size, B, size, ...)."""
    b, t = x.shape[:2]
    return x.reshape(b, t // size, size, *x.shape[2:]).swapaxes(0, 1)


def chunk_size_for(length: int, target: int = 1024) -> int:
    """Largest divisor of `length` not above `target`."""
    return max(d for d in range(1, min(length, target) + 1) if length % d == 0)


def cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array,
                  weights: jax.Array, *, chunk: int = 1024) -> dict[str, jax.Array]:
    """Sums over valid tokens of the hard-label cross entropy and of correct top-1 predictions.

    logits_fn: (B, c, D) -> (B, c, V); hidden: (B, T, D); labels: (B, T) int; weights: (B, T) float, 0 for
    padding. Returns {"loss_sum", "correct", "tokens"}; callers divide by the global token count. Each chunk
    is rematerialised in the backward pass, so only one chunk of logits is alive at a time.
    """
    size = chunk_size_for(hidden.shape[1], chunk)

    @jax.checkpoint
    def one(carry, xs):
        h, y, w = xs
        logits = logits_fn(h).astype(jnp.float32)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        return (carry[0] + jnp.sum(nll * w), carry[1] + jnp.sum(correct * w)), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct), _ = loops.scan(one, (zero, zero),
                                          (_chunks(hidden, size), _chunks(labels, size), _chunks(weights, size)))
    return {"loss_sum": loss_sum, "correct": correct, "tokens": jnp.sum(weights.astype(jnp.float32))}


# --------------------------------------------------------------------------------------------------
# Distillation: the same chunked scan, with the teacher's chunk computed (online) or read (cache) beside the
# student's. Only one chunk of float32 logits per model is alive at a time, in the forward and in the backward.

Targets = OnlineTargets | TopKTargets | SampledTargets
DISTILL_SUMS = ("loss_sum", "soft_sum", "hard_sum", "kl_sum", "teacher_ce_sum", "disagree_sum", "alpha_sum",
                "correct")


def check_targets(config: DistillLossConfig, targets: Targets) -> None:
    """ValueError if `config` cannot be computed from this kind of targets."""
    if not isinstance(targets, OnlineTargets) and config.target != "teacher":
        raise ValueError(f"DistillLossConfig.target={config.target!r} needs the teacher's logits: use OnlineTargets, "
                         "or target='teacher' with cached targets")
    if isinstance(targets, SampledTargets) and config.confidence != "none":
        raise ValueError(f"DistillLossConfig.confidence={config.confidence!r} needs p_T, which a few sampled draws "
                         "do not estimate per token: use confidence='none' with SampledTargets")
    if isinstance(targets, SampledTargets) and (config.divergence != "forward_kl" or config.temperature != 1.0):
        raise ValueError("SampledTargets are an unbiased estimate of p_T at temperature 1 for the forward KL only: "
                         f"got divergence={config.divergence!r}, temperature={config.temperature}")


def _tempered(logits: jax.Array, tau: float) -> jax.Array:
    return jax.nn.log_softmax(logits if tau == 1.0 else logits / tau, axis=-1)


def _online_terms(config, logits, labels, teacher_logits, taid_t):
    """Per-token soft divergence and metrics against the dense teacher logits (B, c, V): dict of (B, c)."""
    tau = config.temperature
    z_t = jax.lax.stop_gradient(constrain(teacher_logits.astype(jnp.float32), ("batch", "length", "act_vocab")))
    log_t1, log_s1 = jax.nn.log_softmax(z_t, axis=-1), jax.nn.log_softmax(logits, axis=-1)
    target = z_t
    if config.target == "taid":
        # TAID: interpolate the logits from the (frozen) student toward the teacher.
        target = (1.0 - taid_t) * jax.lax.stop_gradient(logits) + taid_t * z_t
    log_t = log_t1 if (tau == 1.0 and target is z_t) else _tempered(target, tau)
    log_s = _tempered(logits, tau)
    if config.target == "corrected":
        log_t = corrected(log_t, labels, config.correction_margin)
    is_y = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == labels[..., None]
    teacher_ce = -jnp.sum(jnp.where(is_y, log_t1, 0.0), axis=-1)
    terms = {"soft": divergence(config, log_t, log_s), "kl": kl(log_t1, log_s1), "teacher_ce": teacher_ce,
             "disagree": (jnp.argmax(z_t, axis=-1) != labels).astype(jnp.float32)}
    if config.confidence == "label_prob":
        terms["confidence"] = jnp.exp(-teacher_ce)
    elif config.confidence == "entropy":
        terms["confidence"] = 1.0 + jnp.sum(jnp.exp(log_t1) * log_t1, axis=-1) / math.log(logits.shape[-1])
    return terms


def _sparse_terms(config, logits, labels, ids, values, log_tail, sampled: bool):
    """Per-token soft divergence and metrics against top-k or sampled targets over K ids + tail bucket."""
    tau, vocab = config.temperature, logits.shape[-1]
    bins = (lambda t: sampled_teacher_bins(values)) if sampled else (
        lambda t: topk_teacher_bins(values, vocab, t, log_tail=log_tail))
    log_s1 = jax.nn.log_softmax(logits, axis=-1)
    s1, t1 = student_bins(log_s1, ids), bins(1.0)
    if not sampled and not config.topk_tail:  # the biased ablation: only the soft term loses the tail
        soft_t = topk_teacher_bins(values, vocab, tau, tail_bucket=False, log_tail=log_tail)
        s_tau = s1 if tau == 1.0 else student_bins(_tempered(logits, tau), ids)
        soft = divergence(config, soft_t, s_tau)
    else:
        soft = divergence(config, t1, s1) if tau == 1.0 else divergence(
            config, bins(tau), student_bins(_tempered(logits, tau), ids))
    match = ids == labels[..., None]
    hit = jnp.sum(jnp.where(match, t1[..., :-1], 0.0), axis=-1)
    if sampled:  # the label's probability is not estimated from a handful of draws
        teacher_ce = jnp.zeros(labels.shape, jnp.float32)
    else:
        # A label outside the top-k gets the uniform share of the tail, as in topk_teacher_bins.
        tail_share = t1[..., -1] - math.log(max(vocab - ids.shape[-1], 1))
        teacher_ce = -jnp.where(jnp.any(match, axis=-1), hit, tail_share)
    top = jnp.take_along_axis(ids, jnp.argmax(values, axis=-1)[..., None], axis=-1)[..., 0]
    terms = {"soft": soft, "kl": kl(t1, s1), "teacher_ce": teacher_ce, "disagree": (top != labels).astype(jnp.float32)}
    if config.confidence == "label_prob":
        terms["confidence"] = jnp.exp(-teacher_ce)
    elif config.confidence == "entropy":
        # Entropy of the bins, plus the tail's spread over V - K tokens: tail * log(V - K).
        p = jnp.exp(t1)
        entropy = -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, t1, 0.0), 0.0), axis=-1)
        entropy += p[..., -1] * math.log(max(vocab - ids.shape[-1], 1))
        terms["confidence"] = 1.0 - entropy / math.log(vocab)
    return terms


def distill_loss(student_logits_fn: Callable[[jax.Array], jax.Array], student_hidden: jax.Array,
                 targets: Targets, labels: jax.Array, weights: jax.Array, *, config: DistillLossConfig, step,
                 taid_t=None, chunk: int = 1024) -> dict[str, jax.Array]:
    """Sums over valid tokens of the distillation objective and its metrics; callers divide by the global count.

    student_logits_fn: (B, c, D) -> (B, c, V); student_hidden: (B, T, D); targets: OnlineTargets (teacher hidden
    (B, T, D_T) + logits_fn), TopKTargets or SampledTargets ((B, T, K) each); labels: (B, T) int; weights: (B, T),
    0 for padding; step: the train step (int or traced scalar) for the alpha schedule; taid_t: TAID's t (a
    TaidState.t) when config.target == "taid". Returns {"loss_sum", "soft_sum" (tau^2 D), "hard_sum" (CE),
    "kl_sum" (forward KL at tau = 1), "teacher_ce_sum", "disagree_sum", "alpha_sum", "correct", "tokens"}.
    With alpha = 0, "loss_sum" is bitwise `cross_entropy(...)["loss_sum"]`. For SampledTargets "kl_sum" is the KL
    from count / N (an estimate) and "teacher_ce_sum" is 0 (a few draws do not estimate p_T(label)).
    """
    check_targets(config, targets)
    if config.target == "taid" and taid_t is None:
        raise ValueError("DistillLossConfig.target='taid' needs taid_t (TaidState.t) in distill_loss")
    size = chunk_size_for(student_hidden.shape[1], chunk)
    alpha = alpha_at(config, step)
    scale = config.temperature ** 2  # keeps the soft gradient's size as tau changes (Hinton et al. 2015)
    if isinstance(targets, OnlineTargets):
        extra, teacher_fn = (targets.hidden,), targets.logits_fn
    else:
        values = targets.logprobs if isinstance(targets, TopKTargets) else targets.counts
        log_tail = getattr(targets, "log_tail", None)
        extra = (targets.ids, values) if log_tail is None else (targets.ids, values, log_tail)

    @jax.checkpoint  # the backward recomputes each chunk's logits (the teacher's too) instead of storing them
    def one(carry, xs):
        h, y, w, tx = xs
        logits = constrain(student_logits_fn(h).astype(jnp.float32), ("batch", "length", "act_vocab"))
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        if isinstance(targets, OnlineTargets):
            terms = _online_terms(config, logits, y, teacher_fn(tx[0]), taid_t)
        else:
            ids, values, *tail = tx
            terms = _sparse_terms(config, logits, y, ids, values, tail[0] if tail else None,
                                  sampled=isinstance(targets, SampledTargets))
        a = alpha * terms.pop("confidence", jnp.ones_like(nll))
        live = w > 0  # padded positions may hold garbage targets: keep them out of every soft sum
        soft = jnp.where(live, scale * terms["soft"] * w, 0.0)
        masked = lambda x: jnp.sum(jnp.where(live, x * w, 0.0))
        new = {"loss_sum": carry["loss_sum"] + jnp.sum((1.0 - a) * nll * w) + jnp.sum(jnp.where(live, a * soft, 0.0)),
               "soft_sum": carry["soft_sum"] + jnp.sum(soft), "hard_sum": carry["hard_sum"] + jnp.sum(nll * w),
               "kl_sum": carry["kl_sum"] + masked(terms["kl"]),
               "teacher_ce_sum": carry["teacher_ce_sum"] + masked(terms["teacher_ce"]),
               "disagree_sum": carry["disagree_sum"] + masked(terms["disagree"]),
               "alpha_sum": carry["alpha_sum"] + masked(a),
               "correct": carry["correct"] + jnp.sum((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32) * w)}
        return new, None

    zero = {k: jnp.zeros((), jnp.float32) for k in DISTILL_SUMS}
    xs = (_chunks(student_hidden, size), _chunks(labels, size), _chunks(weights, size),
          tuple(_chunks(x, size) for x in extra))
    sums, _ = loops.scan(one, zero, xs)
    return {**sums, "tokens": jnp.sum(weights.astype(jnp.float32))}
