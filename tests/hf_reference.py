"""Helpers that build a transformers Llama 4 with random weights of a useful scale and copy it into ours."""

from __future__ import annotations

import numpy as np
import torch
import transformers
from flax import nnx

from llama4_jax import Llama4Config, Llama4ForCausalLM
from llama4_jax.convert.hf import set_from_hf_tensors

# Parity tolerance, relative to max |logit| (float32, highest matmul precision). Never loosen to pass.
PARITY_RTOL = 1e-5


def hf_text_config(config: Llama4Config) -> transformers.Llama4TextConfig:
    hf = transformers.Llama4TextConfig(**config.to_hf())
    hf._attn_implementation = "eager"
    return hf


def randomize_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> None:
    """Random weights that keep activations O(1): N(0, gain/sqrt(fan_in)) for matrices, 1 + N(0, 0.1) for
    norms and N(0, 1) for the embedding, so logits are a few units (HF's 0.02 init hides errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                # nn.Linear weights are (out, in); fused experts are (E, in, out).
                fan_in = p.shape[-2] if name.endswith(("gate_up_proj", "experts.down_proj")) else p.shape[-1]
                p.copy_(gain * torch.randn(p.shape, generator=gen) / fan_in**0.5)


def hf_model(config: Llama4Config, seed: int = 0, gain: float = 1.0) -> transformers.Llama4ForCausalLM:
    torch.manual_seed(seed)
    model = transformers.Llama4ForCausalLM(hf_text_config(config)).float().eval()
    randomize_(model, seed, gain)
    return model


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def ours_from_hf(model: transformers.Llama4ForCausalLM, config: Llama4Config, **kwargs) -> Llama4ForCausalLM:
    ours = Llama4ForCausalLM(config, rngs=nnx.Rngs(0), **kwargs)
    set_from_hf_tensors(ours, state_dict_numpy(model))
    return ours


def hf_logits(model: transformers.Llama4ForCausalLM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def random_ids(config: Llama4Config, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length), dtype=np.int32)
