"""Parity with transformers' Llama 4 (the reference), float32, random weights scaled so logits are O(1-10).

Sequences of 40 tokens with attention_chunk_size 8 (5 chunks) and floor_scale 4, so chunked masks and
NoPE temperature tuning are both live. Tolerance: PARITY_RTOL x max |logit|.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import PARITY_RTOL, hf_logits, hf_model, hf_text_config, ours_from_hf, random_ids
from transformers import masking_utils
from transformers.models.llama4 import modeling_llama4 as hf_llama4

from llama4_jax import SCOUT, TINY_MAVERICK, TINY_SCOUT, RopeScaling
from llama4_jax.model.attention import attention_masks
from llama4_jax.model.layers import apply_rope, rope_angles, rope_inv_freq
from llama4_jax.model.moe import route

SEQ, BATCH = 40, 2

CONFIGS = {
    # all MoE, QK norm, llama3 scaling with a live smoothing band, 2 scanned blocks
    "scout_like": TINY_SCOUT.replace(num_hidden_layers=8),
    # dense/MoE interleaved, no QK norm, no RoPE scaling
    "maverick_like": TINY_MAVERICK.replace(num_hidden_layers=8),
    "top2": TINY_SCOUT.replace(num_hidden_layers=8, num_experts_per_tok=2),
    "tied": TINY_MAVERICK.replace(num_hidden_layers=8, tie_word_embeddings=True),
    "attention_bias_no_tuning": TINY_MAVERICK.replace(attention_bias=True, attn_temperature_tuning=False),
    "scout_rope_16_1_1": TINY_SCOUT.replace(rope_scaling=RopeScaling(
        factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0, original_max_position_embeddings=32)),
}


def assert_close(ours, ref, rtol=PARITY_RTOL):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol:g} x max |ref| {scale:.3g}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    config = CONFIGS[name]
    model = hf_model(config)
    ids = random_ids(config, BATCH, SEQ)
    ref = hf_logits(model, ids)
    assert 1.0 < np.abs(ref).max() < 50.0, "weights must give logits of a few units"
    ours = ours_from_hf(model, config)
    assert_close(ours(jnp.asarray(ids)), ref)


def test_logits_match_transformers_unscanned_and_dense_moe():
    config = CONFIGS["scout_like"]
    model = hf_model(config, seed=1)
    ids = random_ids(config, BATCH, SEQ, seed=1)
    ours = ours_from_hf(model, config, scan_layers=False, moe_impl="dense")
    assert_close(ours(jnp.asarray(ids)), hf_logits(model, ids))


@pytest.mark.parametrize("scaling", [TINY_SCOUT.rope_scaling, SCOUT.rope_scaling, None])
def test_rope_inv_freq_and_rotation_match(scaling):
    config = TINY_SCOUT.replace(rope_scaling=scaling, head_dim=128, rope_theta=500000.0)
    hf_rope = hf_llama4.Llama4TextRotaryEmbedding(hf_text_config(config))
    ours = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    np.testing.assert_array_equal(ours, hf_rope.inv_freq.numpy())  # bitwise: angles reach 1e3 rad
    positions = np.arange(3 * 17, dtype=np.int64).reshape(3, 17) * 37
    x = np.random.default_rng(0).normal(size=(3, 17, 4, 128)).astype(np.float32)
    freqs_cis = hf_rope(torch.zeros(1), torch.as_tensor(positions))
    ref_q, _ = hf_llama4.apply_rotary_emb(torch.as_tensor(x), torch.as_tensor(x), freqs_cis)
    cos, sin = rope_angles(jnp.asarray(positions), ours)
    assert_close(apply_rope(jnp.asarray(x), cos, sin), ref_q.numpy())


@pytest.mark.parametrize("chunked", [True, False])
def test_masks_match_transformers(chunked):
    hf_config = hf_text_config(TINY_SCOUT)
    embeds = torch.zeros(BATCH, SEQ, TINY_SCOUT.hidden_size)
    make = masking_utils.create_chunked_causal_mask if chunked else masking_utils.create_causal_mask
    ref = make(config=hf_config, inputs_embeds=embeds, attention_mask=None, cache=None,
               position_ids=torch.arange(SEQ)[None], allow_is_causal_skip=False)
    ref_allowed = (ref == 0).numpy() if ref.dtype != torch.bool else ref.numpy()  # (B or 1, 1, T, S)
    positions = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))
    global_mask, chunked_mask = attention_masks(positions, None, TINY_SCOUT.attention_chunk_size)
    ours = np.asarray(chunked_mask if chunked else global_mask)[:, None]  # (B, 1, T, S)
    np.testing.assert_array_equal(np.broadcast_to(ours, (BATCH, 1, SEQ, SEQ)),
                                  np.broadcast_to(ref_allowed, (BATCH, 1, SEQ, SEQ)))


def _hf_moe_layer(config, seed=0):
    hf_config = hf_text_config(config)
    model = hf_model(config, seed=seed)
    ours = ours_from_hf(model, config)
    return model.model.layers[0].feed_forward, ours.model.blocks.layers[0].feed_forward, hf_config


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_matches(top_k):
    config = TINY_SCOUT.replace(num_experts_per_tok=top_k)
    hf_moe, ours, _ = _hf_moe_layer(config)
    x = np.random.default_rng(0).normal(size=(64, config.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref_scores, ref_logits = hf_moe.router(torch.as_tensor(x))
    logits, experts, scores = route(jnp.asarray(x), ours.router[...][0], top_k)
    assert_close(logits, ref_logits.numpy())
    dense_scores = np.zeros_like(ref_scores.numpy())
    np.put_along_axis(dense_scores, np.asarray(experts), np.asarray(scores), axis=1)
    assert_close(dense_scores, ref_scores.numpy())


@pytest.mark.parametrize("impl", ["dispatch", "dense"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_layer_matches(impl, top_k):
    config = TINY_SCOUT.replace(num_experts_per_tok=top_k)
    hf_moe, ours, _ = _hf_moe_layer(config, seed=2)
    x = np.random.default_rng(1).normal(size=(2, 24, config.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref, _ = hf_moe(torch.as_tensor(x))
    # Our block parameters carry a leading block axis; run the first block's layer.
    from flax import nnx

    graphdef, state = nnx.split(ours)
    layer = nnx.merge(graphdef, jax_tree_index(state, 0))
    assert_close(layer(jnp.asarray(x), impl=impl)[0], ref.numpy().reshape(x.shape))


def jax_tree_index(tree, i):
    import jax

    return jax.tree.map(lambda a: a[i], tree)


@pytest.mark.parametrize("name", ["scout_like", "maverick_like"])
def test_each_decoder_layer_matches(name):
    """Feed HF's own input of every layer to our layer; covers RoPE/NoPE, chunked/global, dense/MoE layers."""
    config = CONFIGS[name]
    model = hf_model(config, seed=3)
    ours = ours_from_hf(model, config)
    captured = {}

    def hook(i):
        def fn(module, args, kwargs, output):
            captured[i] = (args[0].detach().numpy(), output.detach().numpy())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    ids = random_ids(config, BATCH, SEQ, seed=3)
    hf_logits(model, ids)
    for h in handles:
        h.remove()
    from flax import nnx

    positions = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))
    inputs = ours.model._attention_inputs((BATCH, SEQ), positions, None)
    graphdef, state = nnx.split(ours.model.blocks)
    p = config.block_size
    for i in range(config.num_hidden_layers):
        block = nnx.merge(graphdef, jax_tree_index(state, i // p))
        layer_in, layer_out = captured[i]
        out, _ = block.layers[i % p](jnp.asarray(layer_in), inputs, moe_impl="dispatch", gmm_backend=None,
                                     capacity_factor=None)
        assert_close(out, layer_out)
