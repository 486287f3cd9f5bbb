"""Parameter counts (against transformers on the meta device) and analytic training FLOPs."""

import pytest
import torch
import transformers

from llama4_jax import BEHEMOTH, MAVERICK, SCOUT, TINY_MAVERICK
from llama4_jax.counting import count_params, training_flops_per_token


@pytest.mark.parametrize("config", [SCOUT, MAVERICK, TINY_MAVERICK.replace(tie_word_embeddings=True)],
                         ids=["scout", "maverick", "tiny_tied"])
def test_total_params_equal_transformers(config):
    with torch.device("meta"):
        hf = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**config.to_hf()))
    hf_total = sum(p.numel() for p in hf.parameters())  # tied weights are counted once
    assert count_params(config).total == hf_total


def test_full_size_counts():
    scout, maverick = count_params(SCOUT), count_params(MAVERICK)
    assert scout.total == 107_769_861_120
    assert maverick.total == 400_711_848_960
    # Published: ~17B active (16.1B text params excluding the input embedding) for both.
    assert 16.0e9 < scout.active < 16.3e9 and 16.0e9 < maverick.active < 16.3e9
    behemoth = count_params(BEHEMOTH)
    assert 280e9 < behemoth.active < 300e9 and 1.9e12 < behemoth.total < 2.1e12  # Meta: 288B / ~2T


@pytest.mark.parametrize("config", [SCOUT, MAVERICK], ids=["scout", "maverick"])
def test_training_flops_at_8192(config):
    flops = training_flops_per_token(config, 8192)
    assert abs(flops / 108.9e9 - 1) < 0.01


def test_chunked_attention_flops_stop_growing_past_the_chunk():
    short = training_flops_per_token(SCOUT, 8192)
    long = training_flops_per_token(SCOUT, 32768)
    # Only the 12 global layers grow: 12 layers x 6 x N*H x (32768 - 8192) more FLOPs per token.
    assert long - short == pytest.approx(12 * 6 * 5120 * (32768 - 8192))
