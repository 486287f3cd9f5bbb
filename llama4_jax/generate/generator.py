"""Batched generation with the KV cache: a streaming host loop (`Generator`) and a pure, fixed-length sampler
for use inside other jitted functions (`sample_continuations`).

Prompts are left-padded to a length bucket (a power of two, at least 16) and the cache capacity is the bucket
of prompt + new tokens, so prefill and decode compile once per (batch, prompt bucket, capacity bucket).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax.generate.cache import KVCache, forward_with_cache, init_cache
from llama4_jax.generate.sampling import LLAMA4_STOP_TOKENS, SamplingConfig, sample_logits

_MIN_BUCKET = 16
GREEDY = SamplingConfig()
UNIT_TEMPERATURE = SamplingConfig(temperature=1.0)  # plain sampling from the model's distribution


def length_bucket(n: int) -> int:
    """The smallest power of two >= n (at least 16): the padded length compiled programs are keyed on."""
    return max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows (B, length) padded on the left, and positions (B, length): 0.. per row, -1 on padding."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    positions = np.full((len(prompts), length), -1, np.int32)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        tokens[row, length - n:] = prompt
        positions[row, length - n:] = np.arange(n)
    return tokens, positions


@partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _prefill(graphdef, state, cache: KVCache, tokens, positions, key, sampling: SamplingConfig):
    model = nnx.merge(graphdef, state)
    hidden, cache = forward_with_cache(model, cache, tokens, positions, prefill=True)
    return sample_logits(model.logits(hidden[:, -1:])[:, 0], key, sampling), cache


@partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _decode(graphdef, state, cache: KVCache, token, position, key, sampling: SamplingConfig):
    model = nnx.merge(graphdef, state)
    hidden, cache = forward_with_cache(model, cache, token[:, None], position[:, None])
    return sample_logits(model.logits(hidden)[:, 0], key, sampling), cache


class Generator:
    """Generates from a batch of prompts, streaming each step's tokens to a callback.

    >>> gen = Generator(model, sampling=SamplingConfig(temperature=0.6, top_p=0.9), stop_tokens=LLAMA4_STOP_TOKENS)
    >>> outs = gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=64, key=jax.random.key(0),
    ...                     on_step=lambda step, tokens, finished: print(tokens))
    """

    def __init__(self, model, *, sampling: SamplingConfig = GREEDY, stop_tokens: Sequence[int] = (),
                 pad_id: int = 0):
        self.graphdef, self.state = nnx.split(model)
        self.config = model.config
        self.dtype = model.model.dtype
        self.sampling = sampling
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        self.pad_id = pad_id

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, key: jax.Array | None = None,
                 on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> list[list[int]]:
        """New tokens of each prompt (a stop token, when produced, ends its row and is included).

        on_step(step, tokens (B,), finished (B,)) is called as each step's tokens arrive; rows that finished
        earlier still get a (meaningless) token, which is not part of their output.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError(f"every prompt needs at least one token, got lengths {[len(p) for p in prompts]}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        vocab = self.config.vocab_size
        bad = [t for p in prompts for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        key = jax.random.key(0) if key is None else key
        length = length_bucket(max(len(p) for p in prompts))
        tokens, positions = left_pad(prompts, length, self.pad_id)
        cache = init_cache(self.config, len(prompts), length_bucket(length + max_new_tokens), self.dtype)
        key, sub = jax.random.split(key)
        token, cache = _prefill(self.graphdef, self.state, cache, tokens, positions, sub, self.sampling)
        next_position = jnp.asarray([len(p) for p in prompts], jnp.int32)
        outputs: list[list[int]] = [[] for _ in prompts]
        finished = np.zeros(len(prompts), bool)
        for step in range(max_new_tokens):
            current = token
            if step + 1 < max_new_tokens:  # dispatch the next step before waiting for this one's tokens
                key, sub = jax.random.split(key)
                token, cache = _decode(self.graphdef, self.state, cache, current, next_position + step, sub,
                                       self.sampling)
            host = np.asarray(current)
            for row in np.flatnonzero(~finished):
                outputs[row].append(int(host[row]))
                finished[row] = int(host[row]) in self.stop_tokens
            if on_step is not None:
                on_step(step, host, finished.copy())
            if finished.all():
                break
        return outputs


def sample_continuations(model, prompts: jax.Array, key: jax.Array, *, num_new_tokens: int,
                         prompt_mask: jax.Array | None = None, sampling: SamplingConfig = UNIT_TEMPERATURE,
                         stop_tokens: Sequence[int] = LLAMA4_STOP_TOKENS,
                         pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Samples `num_new_tokens` after each prompt; pure and jittable (a fixed-length scan, no host sync).

    model: Llama4ForCausalLM (e.g. `nnx.merge(graphdef, params)` inside the caller's jitted function).
    prompts: (B, P) int32, left-padded; prompt_mask: (B, P) bool, True on real tokens (None = no padding);
      every row needs at least one real token.
    Returns tokens (B, P + N) (the prompts, then the continuations, `pad_id` after a row's stop token) and
    generated (B, P + N) bool: True on sampled tokens up to and including the first stop token.
    """
    if not isinstance(num_new_tokens, int) or num_new_tokens < 1:
        raise ValueError(f"num_new_tokens must be an int >= 1, got {num_new_tokens!r}")
    b, p = prompts.shape
    mask = jnp.ones((b, p), bool) if prompt_mask is None else prompt_mask.astype(bool)
    positions = jnp.where(mask, jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, -1)
    cache = init_cache(model.config, b, p + num_new_tokens, model.model.dtype)
    hidden, cache = forward_with_cache(model, cache, prompts.astype(jnp.int32), positions, prefill=True)
    keys = jax.random.split(key, num_new_tokens)
    first = sample_logits(model.logits(hidden[:, -1:])[:, 0], keys[0], sampling)

    def step(carry, xs):
        token, cache = carry
        step_key, position = xs
        hidden, cache = forward_with_cache(model, cache, token[:, None], position[:, None])
        nxt = sample_logits(model.logits(hidden)[:, 0], step_key, sampling)
        return (nxt, cache), token

    lengths = mask.sum(axis=1, dtype=jnp.int32)
    offsets = jnp.arange(num_new_tokens - 1, dtype=jnp.int32)
    (last, _), earlier = jax.lax.scan(step, (first, cache), (keys[1:], lengths[None, :] + offsets[:, None]))
    new = jnp.concatenate([earlier.T, last[:, None]], axis=1)  # (B, N)
    is_stop = jnp.isin(new, jnp.asarray(tuple(stop_tokens), jnp.int32)) if stop_tokens else jnp.zeros_like(new, bool)
    # A token is valid while no stop token came before it (the stop token itself is valid).
    stopped_before = jnp.cumsum(is_stop, axis=1) - is_stop > 0
    valid = ~stopped_before
    new = jnp.where(valid, new, pad_id)
    return jnp.concatenate([prompts.astype(jnp.int32), new], axis=1), jnp.concatenate([jnp.zeros((b, p), bool), valid],
                                                                                      axis=1)
