"""Side-by-side timings, measured in one run:

1. forward+backward of our jitted model vs transformers' Llama4ForCausalLM (torch, CPU) on the same
   mid-size config and the same weights;
2. our MoE layer vs a dense SwiGLU with the same active FLOPs (routed top-k + shared expert), forward+backward;
3. compile time of a 48-layer vs a 4-layer tiny-width model (the scanned stack should make them equal).

Usage: python tools/bench_model.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

from benchlib import mid_config, timeit


def bench_vs_transformers(config, batch: int, seq: int, repeats: int) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    import transformers
    from flax import nnx

    from llama4_jax import Llama4ForCausalLM
    from llama4_jax.convert.hf import set_from_hf_tensors

    hf = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**config.to_hf())).float().train()
    ours = Llama4ForCausalLM(config, rngs=nnx.Rngs(0))
    set_from_hf_tensors(ours, {k: v.detach().numpy() for k, v in hf.state_dict().items()})
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1))

    torch_ids = torch.as_tensor(ids[:, :-1])
    torch_labels = torch.as_tensor(ids[:, 1:])

    def torch_step():
        hf.zero_grad(set_to_none=True)
        logits = hf(torch_ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch_labels.reshape(-1))
        loss.backward()

    graphdef, params = nnx.split(ours, nnx.Param)

    @jax.jit
    def jax_step(params, inputs, labels):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return jax.value_and_grad(loss_fn)(params)

    inputs, labels = jnp.asarray(ids[:, :-1], jnp.int32), jnp.asarray(ids[:, 1:], jnp.int32)
    jax_time = timeit(lambda: jax.block_until_ready(jax_step(params, inputs, labels)), repeats)
    torch_time = timeit(torch_step, repeats)
    return jax_time, torch_time


def bench_moe_vs_dense(config, tokens: int, repeats: int) -> tuple[float, float, float]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama4_jax.model.layers import MLP
    from llama4_jax.model.moe import MoE

    rngs = nnx.Rngs(0)
    moe = MoE(config, rngs=rngs, param_dtype=jnp.float32)
    active_width = (config.num_experts_per_tok + 1) * config.intermediate_size  # routed top-k + shared
    dense = MLP(config.hidden_size, active_width, rngs=rngs, std=0.02, param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (1, tokens, config.hidden_size))

    def timed(module, **kwargs):
        graphdef, params = nnx.split(module)

        def loss(p, x):
            y = nnx.merge(graphdef, p)(x, **kwargs)
            y = y[0] if isinstance(y, tuple) else y  # MoE also returns router stats
            return jnp.sum(y**2)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return timeit(lambda: jax.block_until_ready(step(params, x)), repeats)

    return timed(moe), timed(dense), timed(moe, backend="ragged_dot")


def compile_seconds(config) -> float:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama4_jax.counting import abstract_model

    graphdef, state = nnx.split(abstract_model(config, jnp.float32))
    loss = lambda s, ids: jnp.mean(nnx.merge(graphdef, s)(ids))
    lowered = jax.jit(jax.grad(loss)).lower(state, jax.ShapeDtypeStruct((2, 64), jnp.int32))
    start = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()

    import jax
    import torch

    from llama4_jax import TINY_SCOUT

    torch.set_num_threads(args.threads)
    mid = mid_config()
    print(f"platform {jax.devices()[0].platform}, torch threads {args.threads}, median of {args.repeats}\n")

    ours, theirs = bench_vs_transformers(mid, args.batch, args.seq, args.repeats)
    print(f"1. forward+backward, D=512, 8 layers, 16 experts top-1, B={args.batch}, T={args.seq}")
    print(f"   llama4_jax {ours * 1e3:9.1f} ms   transformers {theirs * 1e3:9.1f} ms   "
          f"speed-up {theirs / ours:.2f}x (target >= 3x)")

    tokens = args.batch * args.seq
    moe, dense, ragged = bench_moe_vs_dense(mid, tokens, args.repeats)
    print(f"\n2. forward+backward of one layer on {tokens} tokens, D=512, 16 experts of F=1024, top-1 + shared")
    print(f"   MoE {moe * 1e3:9.1f} ms   dense SwiGLU F=2048 (same active FLOPs) {dense * 1e3:9.1f} ms   "
          f"ratio {moe / dense:.2f}x (target <= 1.5x)")
    print(f"   (MoE through jax.lax.ragged_dot on this platform: {ragged * 1e3:.1f} ms, {ragged / dense:.2f}x dense)")

    shallow = compile_seconds(TINY_SCOUT.replace(num_hidden_layers=4))
    deep = compile_seconds(TINY_SCOUT.replace(num_hidden_layers=48))
    print("\n3. compile time of forward+backward, tiny width")
    print(f"   4 layers {shallow:.2f} s   48 layers {deep:.2f} s   ratio {deep / shallow:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
