"""Losses, computed in float32 from final hidden states in sequence chunks, so the float32 (B, T, V) logits
never exist at once (V = 202048 makes them 6.6 GB per 8192-token sequence)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from llama4_jax import loops


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
