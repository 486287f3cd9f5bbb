"""llama4_jax: Meta's Llama 4 family in JAX / Flax NNX."""

from llama4_jax.config import BEHEMOTH, MAVERICK, PRESETS, SCOUT, TINY_MAVERICK, TINY_SCOUT, Llama4Config, RopeScaling
from llama4_jax.convert.load import load_hf
from llama4_jax.convert.save import save_hf
from llama4_jax.model import Llama4ForCausalLM, Llama4TextModel

__all__ = [
    "BEHEMOTH", "MAVERICK", "PRESETS", "SCOUT", "TINY_MAVERICK", "TINY_SCOUT", "Llama4Config", "Llama4ForCausalLM",
    "Llama4TextModel", "RopeScaling", "load_hf", "save_hf",
]
