"""llama4_jax: Meta's Llama 4 family in JAX / Flax NNX."""

from llama4_jax.config import BEHEMOTH, MAVERICK, PRESETS, SCOUT, TINY_MAVERICK, TINY_SCOUT, Llama4Config, RopeScaling
from llama4_jax.convert.load import load_hf
from llama4_jax.convert.save import save_hf
from llama4_jax.model import Llama4ForCausalLM, Llama4TextModel
from llama4_jax.model.multimodal import Llama4ForConditionalGeneration
from llama4_jax.model.vision import Llama4VisionModel
from llama4_jax.multimodal_config import SCOUT_VISION, Llama4MultimodalConfig, Llama4VisionConfig

__all__ = [
    "BEHEMOTH", "MAVERICK", "PRESETS", "SCOUT", "TINY_MAVERICK", "TINY_SCOUT", "Llama4Config", "Llama4ForCausalLM",
    "Llama4TextModel", "RopeScaling", "load_hf", "save_hf",
    "Llama4ForConditionalGeneration", "Llama4MultimodalConfig", "Llama4VisionConfig", "Llama4VisionModel",
    "SCOUT_VISION",
]
