"""Distillation losses: the config, the soft/hard weight alpha, the divergences and the target formats.

Every function here works on one sequence chunk of float32 log-probabilities whose last axis is the vocabulary
(dense targets, possibly sharded over "tensor") or a set of bins (top-k ids + one tail bucket). The math is
written only with elementwise ops and reductions over that last axis (sum, max, logsumexp), which XLA's SPMD
partitioner turns into local reductions + an all-reduce when the vocabulary is sharded, so no psum appears
here. The chunked driver `distill_loss` lives in `losses.py`. See docs/distillation.md for the design.

Shapes: B batch, c chunk length, V vocabulary, K top-k or sampled slots.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl")
ALPHA_SCHEDULES = ("constant", "linear", "cosine", "wsd")
CONFIDENCES = ("none", "label_prob", "entropy")
TARGET_KINDS = ("teacher", "corrected", "taid")


def _check(ok: bool, field: str, allowed: str, value) -> None:
    if not ok:
        raise ValueError(f"DistillLossConfig.{field} must be {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillLossConfig:
    """L = sum_i [alpha_i * tau^2 * D(target_i || student_i) + (1 - alpha_i) * CE_i] / n_valid.

    alpha is the weight of the SOFT term (alpha = 0 is exactly the hard cross entropy). The global alpha follows
    `alpha_schedule` from `alpha` (after `burn_in_steps`, before which it is 0) to `alpha_end` at `total_steps`;
    `confidence` multiplies it per token by the teacher's confidence; `target` replaces the teacher's
    distribution by the label-corrected one (MFT) or the student-to-teacher interpolation (TAID).
    """

    divergence: str = "forward_kl"
    beta: float = 0.5  # JSD(beta) mixture weight of the teacher
    skew_lambda: float = 0.1  # skew KL mixture weight of the teacher (DistiLLM's default)
    temperature: float = 1.0
    alpha_schedule: str = "constant"
    alpha: float = 0.5  # the start (and the stable value of "wsd")
    alpha_end: float = 0.5
    burn_in_steps: int = 0
    warmup_steps: int = 0  # "wsd": 0 -> alpha over these steps after the burn-in
    decay_steps: int = 0  # "wsd": alpha -> alpha_end over the last decay_steps before total_steps
    total_steps: int = 1
    confidence: str = "none"
    target: str = "teacher"
    correction_margin: float = 0.2  # MFT: the label leads the teacher's argmax by this much
    topk_tail: bool = True  # top-k targets keep the tail bucket; False renormalises over the k ids (biased)
    taid_t_start: float = 0.4
    taid_t_end: float = 1.0
    taid_momentum: float = 0.99
    taid_rate: float = 5e-4

    def __post_init__(self):
        _check(self.divergence in DIVERGENCES, "divergence", f"one of {DIVERGENCES}", self.divergence)
        _check(self.alpha_schedule in ALPHA_SCHEDULES, "alpha_schedule", f"one of {ALPHA_SCHEDULES}",
               self.alpha_schedule)
        _check(self.confidence in CONFIDENCES, "confidence", f"one of {CONFIDENCES}", self.confidence)
        _check(self.target in TARGET_KINDS, "target", f"one of {TARGET_KINDS}", self.target)
        for name in ("beta", "skew_lambda", "alpha", "alpha_end", "taid_momentum"):
            _check(0.0 <= getattr(self, name) <= 1.0, name, "in [0, 1]", getattr(self, name))
        _check(0.0 <= self.correction_margin < 1.0, "correction_margin", "in [0, 1)", self.correction_margin)
        _check(0.0 < self.taid_t_start <= self.taid_t_end <= 1.0, "taid_t_start",
               "in (0, taid_t_end] with taid_t_end <= 1", (self.taid_t_start, self.taid_t_end))
        _check(self.temperature > 0, "temperature", "> 0", self.temperature)
        # Without the tail bucket the teacher has zero mass where the student has some: KL(S || T) is infinite.
        _check(self.topk_tail or self.divergence != "reverse_kl", "topk_tail",
               "True with divergence='reverse_kl' (the renormalised top-k makes KL(S||T) infinite)", self.topk_tail)
        _check(self.taid_rate >= 0, "taid_rate", ">= 0", self.taid_rate)
        for name in ("burn_in_steps", "warmup_steps", "decay_steps"):
            _check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        _check(self.total_steps > self.burn_in_steps, "total_steps", f"> burn_in_steps ({self.burn_in_steps})",
               self.total_steps)
        _check(self.warmup_steps + self.decay_steps <= self.total_steps - self.burn_in_steps, "warmup_steps",
               "such that warmup_steps + decay_steps <= total_steps - burn_in_steps",
               (self.warmup_steps, self.decay_steps))


# --------------------------------------------------------------------------------------------------
# alpha: the weight of the soft term.

def alpha_at(config: DistillLossConfig, step) -> jax.Array:
    """Global alpha at `step` (int or traced scalar): 0 during burn-in (as in codistillation), then the schedule."""
    step = jnp.asarray(step, jnp.float32)
    s0, s1 = config.burn_in_steps, config.total_steps
    u = jnp.clip((step - s0) / (s1 - s0), 0.0, 1.0)
    a0, a1 = config.alpha, config.alpha_end
    if config.alpha_schedule == "constant":
        a = jnp.full((), a0, jnp.float32)
    elif config.alpha_schedule == "linear":
        a = a0 + (a1 - a0) * u
    elif config.alpha_schedule == "cosine":
        a = a1 + (a0 - a1) * 0.5 * (1.0 + jnp.cos(jnp.pi * u))
    else:  # warmup-stable-decay
        warm = jnp.clip((step - s0) / max(config.warmup_steps, 1), 0.0, 1.0)
        decay = jnp.clip((step - (s1 - config.decay_steps)) / max(config.decay_steps, 1), 0.0, 1.0)
        a = jnp.where(step >= s1 - config.decay_steps, a0 + (a1 - a0) * decay, a0 * warm)
    return jnp.where(step < s0, 0.0, a).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class TaidState:
    """TAID's interpolation coefficient t and the momentum of the relative loss decrease (scalars)."""

    t: jax.Array
    momentum: jax.Array
    prev_loss: jax.Array  # NaN before the first update

    @classmethod
    def init(cls, config: DistillLossConfig) -> TaidState:
        f32 = jnp.float32
        return cls(jnp.asarray(config.taid_t_start, f32), jnp.zeros((), f32), jnp.asarray(jnp.nan, f32))


jax.tree_util.register_dataclass(TaidState, data_fields=["t", "momentum", "prev_loss"], meta_fields=[])


def taid_update(state: TaidState, loss, step, config: DistillLossConfig) -> TaidState:
    """One TAID step (Shing et al. 2025, "TAID", ICLR): t grows faster while the loss falls, never below the
    linear ramp t_start -> t_end over total_steps, never above t_end. Pure: call it after each train step."""
    loss = jnp.asarray(loss, jnp.float32)
    first = jnp.isnan(state.prev_loss)
    change = jnp.where(first, 0.0, (state.prev_loss - loss) / (jnp.abs(state.prev_loss) + 1e-12))
    momentum = config.taid_momentum * state.momentum + (1 - config.taid_momentum) * change
    delta = config.taid_rate * jax.nn.sigmoid(momentum) * (1 - state.t)
    ramp = config.taid_t_start + (config.taid_t_end - config.taid_t_start) * jnp.clip(
        jnp.asarray(step, jnp.float32) / config.total_steps, 0.0, 1.0)
    t = jnp.minimum(config.taid_t_end, jnp.maximum(ramp, state.t + delta))
    # As the reference implementation, the first call only records the loss.
    t, momentum = jnp.where(first, state.t, t), jnp.where(first, state.momentum, momentum)
    return TaidState(t.astype(jnp.float32), momentum.astype(jnp.float32), loss)


# --------------------------------------------------------------------------------------------------
# Divergences between log-probabilities over the last axis. Entries with zero probability are guarded with
# double `where`s so that 0 * log 0 = 0 in the value and no NaN leaks into the gradient.

def kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) = sum p (log p - log q) over the last axis: (..., V) -> (...)."""
    p = jnp.exp(log_p)
    live = p > 0
    diff = jnp.where(live, log_p, 0.0) - jnp.where(live, log_q, 0.0)
    return jnp.sum(jnp.where(live, p * diff, 0.0), axis=-1)


def _log_mix(w: float, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """log(w p + (1 - w) q), stable; w in [0, 1] (a zero weight drops its term)."""
    if w == 0.0:
        return log_q
    if w == 1.0:
        return log_p
    return jnp.logaddexp(math.log(w) + log_p, math.log1p(-w) + log_q)


def divergence(config: DistillLossConfig, log_t: jax.Array, log_s: jax.Array) -> jax.Array:
    """D(teacher, student) of the configured kind, per token: (..., V) x2 -> (...)."""
    if config.divergence == "forward_kl":  # mode covering
        return kl(log_t, log_s)
    if config.divergence == "reverse_kl":  # mode seeking
        return kl(log_s, log_t)
    if config.divergence == "jsd":
        # Generalized JSD (Agarwal et al. 2024, GKD, ICLR): beta KL(T||M) + (1-beta) KL(S||M), M = beta T + (1-beta) S.
        b = config.beta
        log_m = _log_mix(b, log_t, log_s)
        return b * kl(log_t, log_m) + (1 - b) * kl(log_s, log_m)
    # Skew KL (Ko et al. 2024, DistiLLM, ICML): KL(T || lambda T + (1 - lambda) S).
    return kl(log_t, _log_mix(config.skew_lambda, log_t, log_s))


def corrected(log_t: jax.Array, labels: jax.Array, margin: float) -> jax.Array:
    """MFT teacher correction (arXiv 2506.15702): where argmax p_T != y, mix the one-hot label in,
    (1 - lam) p_T + lam e_y with lam = (p_max - p_y + margin) / (1 + p_max - p_y), so y leads by `margin`.

    log_t: (B, c, V) log-probabilities; labels: (B, c). Returns corrected log-probabilities (B, c, V)."""
    is_y = jax.lax.broadcasted_iota(jnp.int32, log_t.shape, log_t.ndim - 1) == labels[..., None]
    p_max = jnp.exp(jnp.max(log_t, axis=-1))
    p_y = jnp.exp(jnp.sum(jnp.where(is_y, log_t, 0.0), axis=-1))  # one-hot sum: a vocab-parallel gather
    wrong = jnp.argmax(log_t, axis=-1) != labels
    lam = jnp.where(wrong, (p_max - p_y + margin) / (1.0 + p_max - p_y), 0.0)[..., None]
    log_keep = jnp.log1p(-lam) + log_t
    return jnp.where(is_y, jnp.logaddexp(log_keep, jnp.log(jnp.maximum(lam, 1e-38))), log_keep)


# --------------------------------------------------------------------------------------------------
# Target formats.

@dataclasses.dataclass(frozen=True)
class OnlineTargets:
    """Teacher run online: hidden (B, T, D_T) and logits_fn (B, c, D_T) -> (B, c, V), under stop_gradient."""

    logits_fn: Callable[[jax.Array], jax.Array]
    hidden: jax.Array


@dataclasses.dataclass(frozen=True)
class TopKTargets:
    """Cached top-k: ids (B, T, K) int, logprobs (B, T, K) = log p_T (tau = 1, full-vocabulary normalised), and
    optionally log_tail (B, T) = log of the teacher's mass outside the K ids, computed by the cache writer from
    the full logits (exact even where 1 - sum exp(logprobs) rounds to 0 in float32); without it the tail is
    1 - sum exp(logprobs).

    The remaining mass is one tail bucket (docs/distillation.md: without it the student is driven to the
    renormalised top-k); under temperature it is treated as spread uniformly over the V - K other tokens, which
    is exact at tau = 1 and the only assumption a top-k cache allows."""

    ids: jax.Array
    logprobs: jax.Array
    log_tail: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class SampledTargets:
    """Sampled ids with counts (Anshumann et al. 2025, "Sparse Logit Sampling"): ids (B, T, K), counts (B, T, K)
    of N draws from p_T at tau = 1. Unused slots have count 0; used ids are distinct. E[count / N] = p_T, so
    the forward KL to count / N has the dense forward KL's gradient in expectation (the entropy is a constant)."""

    ids: jax.Array
    counts: jax.Array


def _masked_log_sum_exp(x: jax.Array, drop: jax.Array) -> jax.Array:
    """log sum over the last axis of exp(x) where not `drop`; -inf where nothing is left (k = V)."""
    kept = jnp.where(drop, -jnp.inf, x)
    m = jax.lax.stop_gradient(jnp.max(kept, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.sum(jnp.exp(kept - m), axis=-1)
    return jnp.where(s > 0, m[..., 0] + jnp.log(jnp.where(s > 0, s, 1.0)), -jnp.inf)


def student_bins(log_s: jax.Array, ids: jax.Array) -> jax.Array:
    """Student log-probabilities (B, c, V) collapsed onto the K ids and one tail bucket: (B, c, K + 1)."""
    at_ids = jnp.take_along_axis(log_s, ids, axis=-1)
    in_k = jax.vmap(jax.vmap(lambda i: jnp.zeros(log_s.shape[-1], bool).at[i].set(True)))(ids)
    return jnp.concatenate([at_ids, _masked_log_sum_exp(log_s, in_k)[..., None]], axis=-1)


def topk_teacher_bins(logprobs: jax.Array, vocab: int, tau: float, *, tail_bucket: bool = True,
                      log_tail: jax.Array | None = None) -> jax.Array:
    """Tempered teacher over K ids + tail bucket, (B, c, K) -> (B, c, K + 1); the tail is uniform over V - K.

    Without the tail bucket the K probabilities are renormalised and the tail bin is empty: the biased target
    that drives the student to p_T / sum_K p_T on K and 0 elsewhere (kept for ablations)."""
    k = logprobs.shape[-1]
    if log_tail is None:
        tail = jnp.clip(1.0 - jnp.sum(jnp.exp(logprobs), axis=-1), 0.0, 1.0)
        log_tail = jnp.where(tail > 0, jnp.log(jnp.where(tail > 0, tail, 1.0)), -jnp.inf)
    if not tail_bucket or vocab <= k:
        log_tail = jnp.full(logprobs.shape[:-1], -jnp.inf)
    else:
        # (V - K) tokens of probability tail / (V - K) each, raised to 1/tau: log weight log(V-K) + log(each)/tau.
        log_tail = math.log(vocab - k) + (log_tail - math.log(vocab - k)) / tau
    logits = jnp.concatenate([logprobs / tau, log_tail[..., None]], axis=-1)
    return logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def sampled_teacher_bins(counts: jax.Array) -> jax.Array:
    """log(count / N) over the K slots and an empty tail bucket: (B, c, K) -> (B, c, K + 1)."""
    counts = counts.astype(jnp.float32)
    n = jnp.sum(counts, axis=-1, keepdims=True)
    q = counts / jnp.where(n > 0, n, 1.0)
    log_q = jnp.where(q > 0, jnp.log(jnp.where(q > 0, q, 1.0)), -jnp.inf)
    return jnp.concatenate([log_q, jnp.full(n.shape, -jnp.inf)], axis=-1)
