"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus), in HF's order.

transformers applies temperature, then top-k, then top-p; so do we. Everything is float32 and jittable;
the configuration is static (hashable), so greedy and sampling compile to different programs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Llama 4 instruct generation_config.json: <|end_of_text|>, <|eom|>, <|eot|>.
LLAMA4_STOP_TOKENS = (200001, 200007, 200008)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """temperature 0 = greedy (argmax; top_k and top_p are then ignored); top_k 0 and top_p 1.0 = off.
    Llama 4 instruct's defaults are temperature 0.6, top_p 0.9."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.temperature, int | float) and self.temperature >= 0):
            raise ValueError(f"sampling temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"sampling top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"sampling top_p must be in (0, 1] (1 = off), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """(B, V) logits -> float32 logits with temperature applied and tokens outside top-k / top-p set to -inf."""
    logits = logits.astype(jnp.float32) / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)  # ties with the k-th are kept, as in HF
    if config.top_p < 1.0:
        # HF: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p; the most likely
        # token always stays.
        order = jnp.argsort(logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        drop_sorted = (cumulative <= 1.0 - config.top_p).at[:, -1].set(False)
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def sample_logits(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """(B, V) logits -> (B,) int32 token ids. `key` is unused when greedy."""
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, config), axis=-1).astype(jnp.int32)
