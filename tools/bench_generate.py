"""Decode tokens/s with the KV cache at prefixes of 1x, 4x and 16x the attention chunk size, side by side for a
model of only chunked (RoPE) layers and a normal one (NoPE global layer every 4th).

Chunked layers keep a ring of chunk - 1 keys, so their decode step costs the same at any prefix; global layers
attend to the whole cache, whose capacity grows with the prefix. Each prompt length generates once to compile,
then `--repeats` rounds alternate the lengths: tokens/s = batch x steps / seconds between step `--skip` and the
last step, as the streaming callback sees them; the median round is printed.

Usage: python tools/bench_generate.py [--batch 8] [--experts 4] [--new-tokens 64] [--multiples 1,4,16]
"""

from __future__ import annotations

import argparse
import time


def decode_rate(gen, prompts, new_tokens: int, skip: int) -> float:
    """Decode tokens/s of one (already compiled) generation."""
    import jax

    stamps = []
    gen.generate(prompts, max_new_tokens=new_tokens, key=jax.random.key(0),
                 on_step=lambda step, tokens, finished: stamps.append(time.perf_counter()))
    return len(prompts) * (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])


def decode_rates(model, prompt_lens: list[int], batch: int, new_tokens: int, skip: int, repeats: int) -> list[float]:
    """Median decode tokens/s per prompt length; the lengths alternate within each round, so a load change
    on the machine hits them alike."""
    import statistics

    import jax
    import numpy as np

    from llama4_jax.generate import Generator

    gen = Generator(model)  # greedy, no stop tokens: exactly new_tokens steps
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, (batch, n)).tolist() for n in prompt_lens]
    for p in prompts:
        gen.generate(p, max_new_tokens=new_tokens, key=jax.random.key(0))  # compile
    rounds = [[decode_rate(gen, p, new_tokens, skip) for p in prompts] for _ in range(repeats)]
    return [statistics.median(r[i] for r in rounds) for i in range(len(prompts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--experts", type=int, default=4,
                        help="routed experts (mid config: 16); decode on CPU is bound by reading weights, so fewer "
                             "experts leave attention a visible share of the step")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip", type=int, default=8, help="first decode steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--multiples", default="1,4,16", help="prefix lengths in units of the chunk size")
    args = parser.parse_args()

    import jax
    from benchlib import mid_config
    from flax import nnx

    from llama4_jax import Llama4ForCausalLM

    base = mid_config().replace(num_local_experts=args.experts)
    configs = {
        "chunked only": base.replace(no_rope_layer_interval=base.num_hidden_layers + 1),  # every layer RoPE
        "normal (NoPE every 4th)": base,
    }
    multiples = [int(m) for m in args.multiples.split(",")]
    chunk = base.attention_chunk_size
    print(f"decode tokens/s on {jax.devices()[0].platform}: D={base.hidden_size}, {base.num_hidden_layers} layers, "
          f"{base.num_local_experts} experts, chunk {chunk}, batch {args.batch}, {args.new_tokens} new tokens")
    header = f"{'config':<26}" + "".join(f"{f'prefix {m}x={m * chunk}':>20}" for m in multiples)
    print(header)
    print("-" * len(header))
    for name, config in configs.items():
        model = Llama4ForCausalLM(config, rngs=nnx.Rngs(0))
        rates = decode_rates(model, [m * chunk for m in multiples], args.batch, args.new_tokens, args.skip,
                             args.repeats)
        cells = "".join(f"{f'{r:8.1f} ({r / rates[0]:.2f}x)':>20}" for r in rates)
        print(f"{name:<26}{cells}", flush=True)
    print("(x) = tokens/s relative to the 1x prefix; 1.00x = decode cost independent of the prefix.")


if __name__ == "__main__":
    main()
