"""Llama 4 vision tower and multimodal (early-fusion) configuration, with HF config.json round trips.

Field names follow transformers' `Llama4VisionConfig` and `Llama4Config` (model_type `llama4`). Defaults are
the published Scout/Maverick vision values (HF's own defaults are inconsistent: `vision_output_dim` 7680 vs
`projector_output_dim` 4096); `from_hf` fills a missing key with HF's default, as transformers would.
See ../shared/docs/llama4_reference.md §1.2, §1.3 and gotchas G7, G15.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llama4_jax.config import Llama4Config

# transformers 5.24 Llama4VisionConfig defaults, used only for keys a config.json leaves out.
_HF_VISION_DEFAULTS = dict(
    hidden_size=768, hidden_act="gelu", num_hidden_layers=34, num_attention_heads=16, num_channels=3,
    intermediate_size=5632, vision_output_dim=7680, image_size=448, patch_size=14, norm_eps=1e-5,
    vision_feature_select_strategy="default", initializer_range=0.02, pixel_shuffle_ratio=0.5,
    projector_input_dim=4096, projector_output_dim=4096, multi_modal_projector_bias=False, projector_dropout=0.0,
    attention_dropout=0.0, rope_theta=10000.0,
)

# Ids of the Llama 4 tokenizer's image tokens (reference §4). The features overwrite <|patch|>, not <|image|>.
IMAGE_START_ID, IMAGE_END_ID = 200080, 200081
TILE_X_SEPARATOR_ID, TILE_Y_SEPARATOR_ID = 200084, 200085
IMAGE_ID, PATCH_ID = 200090, 200092


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama4VisionConfig:
    """Architecture of the Llama 4 vision encoder, its pixel-shuffle adapter and (by width) the projector.

    `hidden_act`, `norm_eps`, `multi_modal_projector_bias` and `vision_feature_select_strategy` are kept for
    round trips only: transformers ignores them (exact GELU, LayerNorm eps 1e-5, no projector bias), so do we.
    """

    hidden_size: int = 1408
    hidden_act: str = "gelu"
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    num_channels: int = 3
    intermediate_size: int = 5632  # encoder MLP width AND the adapter's fc1 input width (G7)
    vision_output_dim: int = 4096  # adapter output = projector input
    image_size: int = 336  # fixes the position table and the 2-D RoPE table
    patch_size: int = 14
    norm_eps: float = 1e-5
    vision_feature_select_strategy: str = "default"
    initializer_range: float = 0.02
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096  # adapter fc1 output
    projector_output_dim: int = 4096  # adapter fc2 input and output
    multi_modal_projector_bias: bool = False
    projector_dropout: float = 0.0
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels", "intermediate_size",
                     "vision_output_dim", "image_size", "patch_size", "projector_input_dim", "projector_output_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"vision_config.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads or self.head_dim % 4:
            raise ValueError(f"vision_config: hidden_size ({self.hidden_size}) / num_attention_heads "
                             f"({self.num_attention_heads}) must divide evenly into a multiple of 4 (2-D RoPE: half "
                             "the pairs per axis)")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_config.image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        r = self.pixel_shuffle_ratio
        if not 0 < r <= 1 or (self.grid_size * r) % 1 or (self.hidden_size / r**2) % 1:
            raise ValueError(f"vision_config.pixel_shuffle_ratio ({r}) must shrink the {self.grid_size}-patch grid "
                             f"and the width {self.hidden_size} to whole numbers")
        # G7: transformers sizes the adapter from these fields, not from the pixel-shuffled width.
        if self.intermediate_size != self.shuffled_dim:
            raise ValueError(f"vision_config.intermediate_size ({self.intermediate_size}) must equal hidden_size / "
                             f"pixel_shuffle_ratio^2 ({self.shuffled_dim}): it is the adapter's input width")
        if not self.projector_input_dim == self.projector_output_dim == self.vision_output_dim:
            raise ValueError("vision_config: projector_input_dim, projector_output_dim and vision_output_dim must be "
                             f"equal (adapter fc1 out = fc2 in = projector in), got {self.projector_input_dim}, "
                             f"{self.projector_output_dim}, {self.vision_output_dim}")
        for name in ("projector_dropout", "attention_dropout"):
            if float(getattr(self, name)) != 0.0:
                raise ValueError(f"vision_config.{name}: only 0.0 is supported, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side G; the encoder sees G^2 patches plus the CLS token."""
        return self.image_size // self.patch_size

    @property
    def shuffled_dim(self) -> int:
        return round(self.hidden_size / self.pixel_shuffle_ratio**2)

    @property
    def tokens_per_tile(self) -> int:
        """<|patch|> tokens (feature rows) per 336-pixel tile: 144 for the published models."""
        return round(self.grid_size * self.pixel_shuffle_ratio) ** 2

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Llama4VisionConfig:
        kwargs = {k: hf.get(k, default) for k, default in _HF_VISION_DEFAULTS.items() if k != "rope_theta"}
        for key in ("image_size", "patch_size"):  # HF allows [h, w]; Llama 4 is square
            value = kwargs[key]
            if isinstance(value, list | tuple):
                if len(set(value)) != 1:
                    raise ValueError(f"vision_config.{key}: only square sizes are supported, got {value}")
                kwargs[key] = value[0]
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"vision_config: rope type {rope['rope_type']!r} is not supported (only 'default')")
        kwargs["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", _HF_VISION_DEFAULTS["rope_theta"])))
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        out = {"model_type": "llama4_vision_model", **dataclasses.asdict(self)}
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": out.pop("rope_theta")}
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama4MultimodalConfig:
    """HF `Llama4Config` (model_type `llama4`): the text model, the vision tower and the image token ids."""

    text_config: Llama4Config
    vision_config: Llama4VisionConfig
    boi_token_index: int = IMAGE_START_ID
    eoi_token_index: int = IMAGE_END_ID
    image_token_index: int = PATCH_ID  # <|patch|>: the positions image features overwrite (G16)

    def __post_init__(self):
        if not 0 <= self.image_token_index < self.text_config.vocab_size:
            raise ValueError(f"image_token_index ({self.image_token_index}) must be a token id of the "
                             f"{self.text_config.vocab_size}-token vocabulary")

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text_config.tie_word_embeddings

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Llama4MultimodalConfig:
        if hf.get("model_type", "llama4") != "llama4" or not isinstance(hf.get("text_config"), dict):
            raise ValueError("config.json: a multimodal checkpoint needs model_type 'llama4' and a 'text_config'")
        ids = {k: hf[k] for k in ("boi_token_index", "eoi_token_index", "image_token_index") if k in hf}
        return cls(text_config=Llama4Config.from_hf(hf["text_config"]),
                   vision_config=Llama4VisionConfig.from_hf(hf.get("vision_config") or {}), **ids)

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "llama4", "text_config": self.text_config.to_hf(),
                "vision_config": self.vision_config.to_hf(), "boi_token_index": self.boi_token_index,
                "eoi_token_index": self.eoi_token_index, "image_token_index": self.image_token_index,
                "tie_word_embeddings": self.tie_word_embeddings}


# Published vision tower of Scout and Maverick (identical for both, reference §1.2).
SCOUT_VISION = Llama4VisionConfig()
