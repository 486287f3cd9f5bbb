"""Training throughput, measured side by side in one run: our jitted train step (forward, backward, AdamW)
against transformers' Llama4ForCausalLM with torch.optim.AdamW, same config, same weights, same token batch;
and our MFU (model FLOPs per second / peak). On CPU there is no published peak, so the peak is measured here
as the best float32 matmul rate of this machine.

Usage: python tools/bench_train.py [--repeats 5] [--batch 4] [--seq 512]
"""

from __future__ import annotations

import argparse
import os

from benchlib import mid_config, timeit


def matmul_peak(repeats: int = 5) -> float:
    """Best float32 FLOP/s of a large jitted matmul on this machine."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    seconds = timeit(lambda: jax.block_until_ready(f(a)), repeats)
    return 2 * 2048**3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from llama4_jax import Llama4ForCausalLM
    from llama4_jax.convert.hf import set_from_hf_tensors
    from llama4_jax.counting import training_flops_per_token
    from llama4_jax.experiment import TrainConfig
    from llama4_jax.train.optim import OptimConfig, make_optimizer
    from llama4_jax.train.step import make_train_step

    torch.set_num_threads(args.threads)
    config = mid_config()
    hf = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**config.to_hf())).float().train()
    ours = Llama4ForCausalLM(config, rngs=nnx.Rngs(0))
    set_from_hf_tensors(ours, {k: v.detach().numpy() for k, v in hf.state_dict().items()})
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq + 1))
    tokens = args.batch * args.seq

    optim = OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant", clip_norm=1.0, weight_decay=0.1)
    tx = make_optimizer(optim, 1000)
    graphdef, params = nnx.split(ours, nnx.Param)
    train = TrainConfig(batch_size=args.batch, seq_len=args.seq, compute_dtype="float32", remat="none")
    step = jax.jit(make_train_step(graphdef, tx, train), donate_argnums=(0, 1))
    state = {"params": params, "opt": tx.init(params)}
    batch = {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
             "weights": jnp.ones((args.batch, args.seq), jnp.float32)}

    def jax_step():
        state["params"], state["opt"], metrics = step(state["params"], state["opt"], batch)
        jax.block_until_ready(metrics["loss"])

    torch_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inputs, labels = torch.as_tensor(ids[:, :-1]), torch.as_tensor(ids[:, 1:])

    def torch_step():
        torch_opt.zero_grad(set_to_none=True)
        logits = hf(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        torch_opt.step()

    ours_s, theirs_s = timeit(jax_step, args.repeats), timeit(torch_step, args.repeats)
    peak = matmul_peak()
    model_flops = training_flops_per_token(config, args.seq) * tokens / ours_s
    print(f"platform {jax.devices()[0].platform}, torch threads {args.threads}, median of {args.repeats} steps")
    print(f"train step (fwd + bwd + AdamW), D=512, 8 layers, 16 experts top-1, B={args.batch}, T={args.seq}:")
    print(f"  llama4_jax    {tokens / ours_s:9.0f} tokens/s ({ours_s * 1e3:.0f} ms/step)")
    print(f"  transformers  {tokens / theirs_s:9.0f} tokens/s ({theirs_s * 1e3:.0f} ms/step)")
    print(f"  ratio         {theirs_s / ours_s:9.2f}x")
    print(f"MFU: {model_flops / 1e9:.1f} GFLOP/s of model FLOPs (6N + attention) / measured matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s = {model_flops / peak:.1%}")


if __name__ == "__main__":
    main()
