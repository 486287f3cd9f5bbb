"""Parameter counts and analytic training FLOPs, computed from abstract shapes (no memory, any size)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax.config import Llama4Config


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter, as transformers counts them
    active: int  # parameters used per token, excluding the input embedding (a lookup, not a matmul)
    embedding: int
    routed_experts: int  # all routed expert weights (active or not)


def abstract_model(config: Llama4Config, param_dtype: jnp.dtype = jnp.bfloat16):
    """The model with ShapeDtypeStruct leaves: builds full-size presets for free (a multimodal config gives
    `Llama4ForConditionalGeneration`)."""
    from llama4_jax.model import Llama4ForCausalLM
    from llama4_jax.model.multimodal import Llama4ForConditionalGeneration
    from llama4_jax.multimodal_config import Llama4MultimodalConfig

    model_class = Llama4ForConditionalGeneration if isinstance(config, Llama4MultimodalConfig) else Llama4ForCausalLM
    return nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0), param_dtype=param_dtype))


def count_params(config: Llama4Config) -> ParamCounts:
    params = nnx.state(abstract_model(config), nnx.Param)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    d, e, k = config.hidden_size, config.num_local_experts, config.num_experts_per_tok
    per_expert = 3 * d * config.intermediate_size
    num_moe = len(config.moe_layers)
    embedding = config.vocab_size * d
    routed = num_moe * e * per_expert
    inactive = num_moe * (e - k) * per_expert
    # With tied embeddings the one matrix still serves as the LM head, so it stays active.
    active = total - inactive - (0 if config.tie_word_embeddings else embedding)
    return ParamCounts(total=total, active=active, embedding=embedding, routed_experts=routed)


def attention_flops_per_token(config: Llama4Config, seq_len: int) -> float:
    """Training FLOPs per token of the attention scores and weighted sum, counted causally.

    Forward: 2 matmuls (QK^T and PV) x 2 FLOPs x N*H x (average keys per query); training = 3 x forward.
    A causal query sees S/2 keys on average; in a chunked layer min(S, C)/2.
    """
    heads_dim = config.num_attention_heads * config.head_dim
    total = 0.0
    for spec in config.layer_specs:
        keys = min(seq_len, config.attention_chunk_size) if spec.chunked else seq_len
        total += 3 * 2 * 2 * heads_dim * keys / 2
    return total


def training_flops_per_token(config: Llama4Config, seq_len: int) -> float:
    """6 x active parameters (forward 2, backward 4) + causal attention."""
    return 6.0 * count_params(config).active + attention_flops_per_token(config, seq_len)
