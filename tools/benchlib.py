"""Shared pieces of the benchmark scripts: a median timer and the mid-size config they compare on."""

from __future__ import annotations

import statistics
import time


def timeit(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call (which also compiles)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mid_config():
    """D=512, 8 layers, 16 experts top-1, chunk 128: big enough to time, small enough for 2 CPU cores."""
    from llama4_jax import Llama4Config

    return Llama4Config(
        vocab_size=8192, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=16, num_experts_per_tok=1,
        attention_chunk_size=128, floor_scale=128, rope_theta=500000.0,
    )
