"""Llama 4 text-model configuration: every field that changes the math, with HF config.json round trips.

The field names and defaults follow transformers' `Llama4TextConfig` so that `from_hf`/`to_hf` are near
identities. Per-layer lists that HF derives (`no_rope_layers`, `moe_layers`, `layer_types`) are filled in
`__post_init__`, so a config always holds the resolved values and compares equal after a round trip.
"""

from __future__ import annotations

import dataclasses
from typing import Any

CHUNKED_ATTENTION = "chunked_attention"
FULL_ATTENTION = "full_attention"
_LAYER_TYPES = (CHUNKED_ATTENTION, FULL_ATTENTION)
_SUPPORTED_ROPE_TYPES = ("default", "llama3")

@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """llama3-style frequency scaling (Llama 3.1 rule), as in HF `_compute_llama3_parameters`."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if not getattr(self, name) > 0:
                raise ValueError(f"rope_scaling.{name} must be > 0, got {getattr(self, name)!r}")
        # low == high is legal: Scout's fixed config uses 1/1 and the smoothing band is then empty.
        if self.high_freq_factor < self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be >= low_freq_factor "
                f"({self.low_freq_factor})"
            )


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What kind of decoder layer index i is. Layer-type branching reads only this."""

    use_rope: bool  # RoPE + optional QK norm; otherwise NoPE with temperature tuning
    chunked: bool  # chunked local attention mask; otherwise global causal
    moe: bool  # routed experts + shared expert; otherwise dense SwiGLU of width intermediate_size_mlp


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama4Config:
    """Architecture of a Llama 4 text model (no mesh, dtype or runtime settings)."""

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # each routed expert and the shared expert
    intermediate_size_mlp: int = 16384  # dense (non-MoE) layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128  # used as given, never derived from hidden/heads (HF default 128)
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    interleave_moe_layer_step: int = 1
    moe_layers: tuple[int, ...] | None = None
    use_qk_norm: bool = True
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    no_rope_layer_interval: int = 4
    no_rope_layers: tuple[int, ...] | None = None  # 1 = the layer USES RoPE (HF's inverted name)
    attention_chunk_size: int | None = 8192
    layer_types: tuple[str, ...] | None = None
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    max_position_embeddings: int = 131072  # no effect on the math for default and llama3 RoPE
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        self._validate_sizes()
        n = self.num_hidden_layers
        if self.no_rope_layers is None or len(self.no_rope_layers) == 0:  # HF: [] counts as "not given"
            self._set("no_rope_layers", tuple(int((i + 1) % self.no_rope_layer_interval != 0) for i in range(n)))
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self._set("moe_layers", tuple(range(step - 1, n, step)))
        if self.layer_types is None:
            chunk = self.attention_chunk_size is not None
            types = tuple(CHUNKED_ATTENTION if r and chunk else FULL_ATTENTION for r in self.no_rope_layers)
            self._set("layer_types", types)
        self._set("no_rope_layers", tuple(int(x) for x in self.no_rope_layers))
        self._set("moe_layers", tuple(int(x) for x in self.moe_layers))
        self._set("layer_types", tuple(self.layer_types))
        if isinstance(self.eos_token_id, list):
            self._set("eos_token_id", tuple(self.eos_token_id))
        self._validate_layers()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _validate_sizes(self) -> None:
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
            "interleave_moe_layer_step", "no_rope_layer_interval",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_local_experts "
                f"({self.num_local_experts})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (Llama 4's SwiGLU), got {self.hidden_act!r}")
        if self.attention_chunk_size is not None and self.attention_chunk_size < 1:
            raise ValueError(f"attention_chunk_size must be a positive int or None, got {self.attention_chunk_size}")
        for name in ("rms_norm_eps", "floor_scale", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def _validate_layers(self) -> None:
        n = self.num_hidden_layers
        if len(self.no_rope_layers) != n or any(x not in (0, 1) for x in self.no_rope_layers):
            raise ValueError(f"no_rope_layers must be {n} values of 0 or 1 (1 = RoPE layer), got {self.no_rope_layers}")
        if any(not 0 <= i < n for i in self.moe_layers) or len(set(self.moe_layers)) != len(self.moe_layers):
            raise ValueError(f"moe_layers must be distinct layer indices in [0, {n}), got {self.moe_layers}")
        if len(self.layer_types) != n or any(t not in _LAYER_TYPES for t in self.layer_types):
            raise ValueError(f"layer_types must be {n} values from {_LAYER_TYPES}, got {self.layer_types}")
        if CHUNKED_ATTENTION in self.layer_types and self.attention_chunk_size is None:
            raise ValueError("layer_types has 'chunked_attention' layers but attention_chunk_size is None")

    # ----------------------------------------------------------------------------------------------
    # Derived structure

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        moe = set(self.moe_layers)
        return tuple(
            LayerSpec(use_rope=bool(r), chunked=t == CHUNKED_ATTENTION, moe=i in moe)
            for i, (r, t) in enumerate(zip(self.no_rope_layers, self.layer_types))
        )

    @property
    def block_size(self) -> int:
        """Length of the repeating layer pattern (4 for Scout and Maverick); the stack scans over blocks."""
        specs = self.layer_specs
        n = len(specs)
        for period in range(1, n + 1):
            if n % period == 0 and all(specs[i] == specs[i % period] for i in range(n)):
                return period
        return n  # unreachable: period n always matches

    @property
    def num_blocks(self) -> int:
        return self.num_hidden_layers // self.block_size

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ----------------------------------------------------------------------------------------------
    # Hugging Face config.json

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Llama4Config:
        """Build from a HF config dict: `llama4_text`, or multimodal `llama4` (its `text_config` is used)."""
        return _config_from_hf(cls, hf)

    def to_hf(self) -> dict[str, Any]:
        """HF `llama4_text` config dict; RoPE is written both as `rope_parameters` and legacy keys."""
        return _config_to_hf(self)

    def replace(self, **changes: Any) -> Llama4Config:
        """A copy with some fields changed; derived per-layer lists are re-derived unless given."""
        derived = {"no_rope_layers", "moe_layers", "layer_types"}
        if changes.keys() & {"num_hidden_layers", "no_rope_layer_interval", "interleave_moe_layer_step",
                             "attention_chunk_size"}:
            changes = {**{k: None for k in derived if k not in changes}, **changes}
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------
# Presets. Published values are from the hub config.json files (see ../shared/docs/llama4_reference.md §1.4).

_COMMON_FULL = dict(
    vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
    num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
    rope_theta=500000.0, attention_chunk_size=8192, no_rope_layer_interval=4, num_experts_per_tok=1,
    bos_token_id=200000, eos_token_id=(200001, 200007, 200008), pad_token_id=200018, tie_word_embeddings=False,
)

SCOUT = Llama4Config(
    **_COMMON_FULL,
    num_local_experts=16,
    interleave_moe_layer_step=1,
    use_qk_norm=True,
    # Meta's fixed values (llama-models PR #322); the April 2025 upload had factor 8 / high_freq_factor 4.
    rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                             original_max_position_embeddings=8192),
    max_position_embeddings=10485760,
)

MAVERICK = Llama4Config(
    **_COMMON_FULL,
    num_local_experts=128,
    interleave_moe_layer_step=2,
    use_qk_norm=False,
    rope_scaling=None,
    max_position_embeddings=1048576,
)

# Behemoth was never released. Meta published: 16 experts, 288B active parameters, "nearly two trillion"
# total. Everything else here is an ASSUMPTION chosen to hit those two totals with Scout's layout
# (all layers MoE, top-1 + shared expert, NoPE every 4th layer): hidden 16384, 96 layers, 128 heads of 128,
# 8 KV heads, expert width 24576. Gives 290B active / 2.03T total (see `llama4-jax demo`).
BEHEMOTH = Llama4Config(
    **{**_COMMON_FULL, "hidden_size": 16384, "num_hidden_layers": 96, "num_attention_heads": 128,
       "intermediate_size": 24576, "intermediate_size_mlp": 49152},
    num_local_experts=16,
    interleave_moe_layer_step=1,
    use_qk_norm=True,
    rope_scaling=None,
)

# Tiny models for tests and demos: small chunk and floor_scale so chunking and temperature tuning are live
# on short sequences.
_COMMON_TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
    attention_chunk_size=8, floor_scale=4, attn_scale=0.1, rope_theta=10000.0, max_position_embeddings=256,
)

TINY_SCOUT = Llama4Config(
    **_COMMON_TINY,
    interleave_moe_layer_step=1,
    use_qk_norm=True,
    rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=32),
)

TINY_MAVERICK = Llama4Config(**_COMMON_TINY, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None)

PRESETS: dict[str, Llama4Config] = {
    "scout": SCOUT,
    "maverick": MAVERICK,
    "behemoth": BEHEMOTH,
    "tiny-scout": TINY_SCOUT,
    "tiny-maverick": TINY_MAVERICK,
}



# --------------------------------------------------------------------------------------------------
# HF config.json <-> Llama4Config

_FIELDS_FROM_HF = (
    "vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "num_local_experts",
    "num_experts_per_tok", "interleave_moe_layer_step", "moe_layers", "use_qk_norm", "no_rope_layer_interval",
    "no_rope_layers", "attention_chunk_size", "layer_types", "attn_temperature_tuning", "floor_scale",
    "attn_scale", "attention_bias", "tie_word_embeddings", "initializer_range", "max_position_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
)
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")


def _config_from_hf(cls: type[Llama4Config], hf: dict[str, Any]) -> Llama4Config:
    model_type = hf.get("model_type", "llama4_text")
    if model_type == "llama4" or "text_config" in hf:
        if not isinstance(hf.get("text_config"), dict):
            raise ValueError("config.json: model_type 'llama4' needs a 'text_config' object")
        return _config_from_hf(cls, {**hf["text_config"], "model_type": "llama4_text"})
    if model_type != "llama4_text":
        raise ValueError(f"config.json: model_type must be 'llama4_text' or 'llama4', got {model_type!r}")
    problems = []
    if hf.get("quantization_config"):
        problems.append("quantization_config: quantized checkpoints are not supported (use bf16/fp32 weights)")
    if float(hf.get("attention_dropout") or 0.0) != 0.0:
        problems.append(f"attention_dropout: only 0.0 is supported, got {hf['attention_dropout']}")
    if problems:
        raise ValueError("config.json has fields we cannot honour:\n  " + "\n  ".join(problems))
    kwargs = {k: hf[k] for k in _FIELDS_FROM_HF if k in hf and hf[k] is not None}
    for key in ("moe_layers", "no_rope_layers", "layer_types", "eos_token_id"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    if "head_dim" not in kwargs and "head_dim" in hf:  # explicit null: HF derives it
        kwargs["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
    if "num_key_value_heads" not in kwargs and "num_key_value_heads" in hf:
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 40)
    if "attn_temperature_tuning" in kwargs:  # the original Scout upload wrote the int 4
        kwargs["attn_temperature_tuning"] = bool(kwargs["attn_temperature_tuning"])
    kwargs.update(_rope_from_hf(hf))
    return cls(**kwargs)


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Reads `rope_parameters` (new) or `rope_theta` + `rope_scaling` (legacy) into our two fields."""
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_type", "default")
        if "rope_theta" in hf:
            params["rope_theta"] = hf["rope_theta"]
    rope_type = params.get("rope_type", "default")
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported; supported: {_SUPPORTED_ROPE_TYPES}")
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", 500000.0))}
    if rope_type == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if k not in params]
        if missing:
            raise ValueError(f"config.json: llama3 rope scaling is missing {missing}")
        out["rope_scaling"] = RopeScaling(
            factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    return out


def _config_to_hf(config: Llama4Config) -> dict[str, Any]:
    out: dict[str, Any] = {"model_type": "llama4_text"}
    for key in _FIELDS_FROM_HF:
        value = getattr(config, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        scaling = dataclasses.asdict(config.rope_scaling)
        rope_parameters = {"rope_type": "llama3", "rope_theta": config.rope_theta, **scaling}
        out["rope_scaling"] = {"rope_type": "llama3", **scaling}
    else:
        out["rope_scaling"] = None
    out["rope_parameters"] = rope_parameters
    out["rope_theta"] = config.rope_theta
    return out
