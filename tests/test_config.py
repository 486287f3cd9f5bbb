"""Config: HF config.json round trips (real published layouts), derived layer types, validation errors."""

import dataclasses

import pytest
import transformers

from llama4_jax import BEHEMOTH, MAVERICK, PRESETS, SCOUT, Llama4Config, RopeScaling

# Text parts of the published config.json files (see ../shared/docs/llama4_reference.md §1.4).
_COMMON = dict(
    model_type="llama4_text", vocab_size=202048, hidden_size=5120, intermediate_size=8192,
    intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
    head_dim=128, rms_norm_eps=1e-5, attention_chunk_size=8192, num_experts_per_tok=1, bos_token_id=200000,
    eos_token_id=[200001, 200007, 200008], pad_token_id=200018, tie_word_embeddings=False, attention_bias=False,
    hidden_act="silu", torch_dtype="bfloat16", router_aux_loss_coef=0.001, output_router_logits=False,
)
SCOUT_APRIL_2025 = dict(
    _COMMON, num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    attn_temperature_tuning=4, floor_scale=8192, attn_scale=0.1, max_position_embeddings=10485760,
    no_rope_layers=[1, 1, 1, 0] * 12, moe_layers=list(range(48)),
)
SCOUT_FIXED = dict(
    _COMMON, num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192},
    no_rope_layers=[], max_position_embeddings=10485760,
)
MAVERICK_HUB = dict(
    _COMMON, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False, rope_theta=500000.0,
    rope_scaling=None, max_position_embeddings=1048576,
)


def test_scout_configs_from_hub_resolve_to_preset():
    assert Llama4Config.from_hf(SCOUT_FIXED) == SCOUT
    april = Llama4Config.from_hf(SCOUT_APRIL_2025)
    assert april.attn_temperature_tuning is True  # the int 4 of the original upload
    assert april.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=8192)
    assert dataclasses.replace(april, rope_scaling=SCOUT.rope_scaling) == SCOUT


def test_maverick_and_multimodal_wrapper():
    assert Llama4Config.from_hf(MAVERICK_HUB) == MAVERICK
    wrapped = {"model_type": "llama4", "text_config": MAVERICK_HUB, "vision_config": {"hidden_size": 1408},
               "image_token_index": 200092}
    assert Llama4Config.from_hf(wrapped) == MAVERICK


def test_new_style_rope_parameters():
    hf = dict(MAVERICK_HUB, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 16.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                                             "original_max_position_embeddings": 8192})
    hf.pop("rope_theta")
    config = Llama4Config.from_hf(hf)
    assert config.rope_theta == 1e4 and config.rope_scaling.factor == 16.0


@pytest.mark.parametrize("name", list(PRESETS))
def test_round_trip_through_transformers(name):
    """to_hf -> transformers' own config class -> to_dict -> from_hf gives the same config."""
    config = PRESETS[name]
    assert Llama4Config.from_hf(config.to_hf()) == config
    hf = transformers.Llama4TextConfig(**config.to_hf())
    assert Llama4Config.from_hf(hf.to_dict()) == config
    assert list(hf.layer_types) == list(config.layer_types)
    assert list(hf.moe_layers) == list(config.moe_layers)
    assert list(hf.no_rope_layers) == list(config.no_rope_layers)


def test_to_hf_writes_rope_both_ways():
    hf = SCOUT.to_hf()
    assert hf["rope_parameters"]["rope_type"] == "llama3" and hf["rope_parameters"]["factor"] == 16.0
    assert hf["rope_theta"] == 500000.0 and hf["rope_scaling"]["high_freq_factor"] == 1.0
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    assert Llama4Config.from_hf(legacy) == SCOUT


def test_published_layer_pattern():
    for config in (SCOUT, MAVERICK):
        specs = config.layer_specs
        assert sum(s.use_rope for s in specs) == 36 and sum(not s.use_rope for s in specs) == 12
        assert [i for i, s in enumerate(specs) if not s.use_rope] == list(range(3, 48, 4))
        assert all(s.chunked == s.use_rope for s in specs)
        assert config.block_size == 4 and config.num_blocks == 12
    assert all(s.moe for s in SCOUT.layer_specs)
    assert [i for i, s in enumerate(MAVERICK.layer_specs) if s.moe] == list(range(1, 48, 2))
    assert BEHEMOTH.num_local_experts == 16


def test_irregular_pattern_falls_back_to_one_block():
    config = SCOUT.replace(num_hidden_layers=6, moe_layers=(0, 5))
    assert config.block_size == 6 and config.num_blocks == 1


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_attention_heads=40, num_key_value_heads=6), "num_key_value_heads"),
        (dict(num_experts_per_tok=17), "num_experts_per_tok"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(head_dim=127), "head_dim"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(attention_chunk_size=None, layer_types=("chunked_attention",) * 48), "attention_chunk_size"),
        (dict(moe_layers=(0, 48)), "moe_layers"),
        (dict(no_rope_layers=(1, 2) * 24), "no_rope_layers"),
        (dict(layer_types=("sliding",) * 48), "layer_types"),
        (dict(floor_scale=0), "floor_scale"),
    ],
)
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(SCOUT, **changes)


def test_invalid_rope_scaling_and_hf_fields():
    with pytest.raises(ValueError, match="high_freq_factor"):
        RopeScaling(factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0, original_max_position_embeddings=8192)
    with pytest.raises(ValueError, match="yarn"):
        Llama4Config.from_hf(dict(MAVERICK_HUB, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="quantization_config"):
        Llama4Config.from_hf(dict(MAVERICK_HUB, quantization_config={"quant_method": "fbgemm_fp8"}))
    with pytest.raises(ValueError, match="model_type"):
        Llama4Config.from_hf(dict(MAVERICK_HUB, model_type="llama"))
    with pytest.raises(ValueError, match="missing"):
        Llama4Config.from_hf(dict(MAVERICK_HUB, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
