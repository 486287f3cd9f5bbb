"""MoE layer forward+backward per grouped-matmul backend, beside a dense SwiGLU of equal active FLOPs.

Prints, in one run on the current platform, the time of each backend and its ratio to the dense layer, to
choose the per-platform default (`llama4_jax.model.grouped_matmul.default_backend`).

Usage: python tools/bench_moe.py [--tokens 4096] [--hidden 1024] [--ffn 2048] [--experts 16] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

from benchlib import timeit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="blocked,ragged_dot")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama4_jax import TINY_SCOUT
    from llama4_jax.model.layers import MLP
    from llama4_jax.model.moe import MoE

    config = TINY_SCOUT.replace(hidden_size=args.hidden, intermediate_size=args.ffn, num_local_experts=args.experts,
                                num_experts_per_tok=args.top_k)
    dtype = jnp.dtype(args.dtype)
    rngs = nnx.Rngs(0)
    moe = MoE(config, rngs=rngs, param_dtype=dtype)
    dense = MLP(args.hidden, (args.top_k + 1) * args.ffn, rngs=rngs, std=0.02, param_dtype=dtype)
    x = jax.random.normal(jax.random.key(0), (1, args.tokens, args.hidden), dtype)

    def timed(module, **kwargs):
        graphdef, params = nnx.split(module)

        def loss(p, x):
            y = nnx.merge(graphdef, p)(x, **kwargs)
            y = y[0] if isinstance(y, tuple) else y
            return jnp.sum(jnp.square(y.astype(jnp.float32)))

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return timeit(lambda: jax.block_until_ready(step(params, x)), args.repeats)

    print(f"platform {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), jax {jax.__version__}; "
          f"{args.tokens} tokens, D={args.hidden}, {args.experts} experts of F={args.ffn}, top-{args.top_k}, "
          f"{args.dtype}, forward+backward, median of {args.repeats}")
    base = timed(dense)
    print(f"  dense SwiGLU F={(args.top_k + 1) * args.ffn:<6} {base * 1e3:9.2f} ms   1.00x")
    for backend in args.backends.split(","):
        t = timed(moe, backend=backend)
        print(f"  MoE {backend:<17} {t * 1e3:9.2f} ms   {t / base:.2f}x")
    t = timed(moe, impl="dense")
    print(f"  MoE all experts (reference) {t * 1e3:9.2f} ms   {t / base:.2f}x")


if __name__ == "__main__":
    main()
