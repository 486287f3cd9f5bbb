"""Generation with the Llama 4 KV cache.

Streaming, batched (left-padded) generation on the host:

>>> gen = Generator(model, sampling=SamplingConfig(temperature=0.6, top_p=0.9), stop_tokens=LLAMA4_STOP_TOKENS)
>>> new_tokens = gen.generate([[200000, 1, 2], [200000, 5]], max_new_tokens=64, key=jax.random.key(0),
...                           on_step=lambda step, tokens, finished: ...)   # tokens (B,) as they come

On-policy sampling inside another jitted function (e.g. a distillation step): a pure function of the model,
the prompts and an explicit PRNG key, fixed-length, no host synchronisation:

>>> def rollout(params, prompts, prompt_mask, key):                         # under jax.jit
...     model = nnx.merge(graphdef, params)
...     tokens, generated = sample_continuations(model, prompts, key, num_new_tokens=128,
...                                              prompt_mask=prompt_mask,
...                                              sampling=SamplingConfig(temperature=1.0))
...     # tokens (B, P + 128): prompts then samples (pad_id after a stop token);
...     # generated (B, P + 128) bool: sampled tokens up to and including each row's first stop token.

The cache path itself: `init_cache(config, batch, capacity)` and `forward_with_cache(model, cache, tokens,
positions, prefill=...)` -> (hidden, cache); chunked layers keep a ring of attention_chunk_size - 1 entries,
global layers every position (see `cache.py`). `cache_shardings` places a cache on a mesh.
"""

from llama4_jax.generate.cache import KVCache, cache_shardings, forward_with_cache, init_cache, ring_size
from llama4_jax.generate.generator import Generator, left_pad, length_bucket, sample_continuations
from llama4_jax.generate.sampling import LLAMA4_STOP_TOKENS, SamplingConfig, filter_logits, sample_logits

__all__ = [
    "LLAMA4_STOP_TOKENS", "Generator", "KVCache", "SamplingConfig", "cache_shardings", "filter_logits",
    "forward_with_cache", "init_cache", "left_pad", "length_bucket", "ring_size", "sample_continuations",
    "sample_logits",
]
