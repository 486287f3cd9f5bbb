"""Llama 4 text model in Flax NNX."""

from llama4_jax.model.transformer import Llama4ForCausalLM, Llama4TextModel

__all__ = ["Llama4ForCausalLM", "Llama4TextModel"]
