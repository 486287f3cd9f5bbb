"""Llama 4 attention: GQA, interleaved RoPE + weightless QK norm on RoPE layers, chunked local masks,
temperature-tuned global attention on NoPE layers.

Legend: B batch, T query length, S key length, D model, N query heads, K kv heads, G = N/K, H head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax import loops
from llama4_jax.config import LayerSpec, Llama4Config
from llama4_jax.model.layers import apply_rope, param, rms_normalize

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # large, finite: a masked row never yields NaN


_QUERY_BLOCK = 512  # queries per block once T exceeds 2 blocks: score memory O(T * block), not O(T^2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """Per-sequence tensors shared by every layer, computed once outside the layer scan.

    positions: (B, T) int32 positions (restart at 0 per packed document).
    segment_ids: (B, T) int32 document ids (all 0 when not packed).
    cos, sin: (B, T, H/2) RoPE tables.
    temperature: (B, T) float32 query scale for NoPE layers (all ones when tuning is off).
    """

    positions: jax.Array
    segment_ids: jax.Array
    cos: jax.Array
    sin: jax.Array
    temperature: jax.Array


def attention_mask(q_index: jax.Array, q_pos: jax.Array, q_seg: jax.Array, k_pos: jax.Array, k_seg: jax.Array,
                   chunk_size: int | None) -> jax.Array:
    """(B, Tq, S) bool, True where query may attend: causal on the row index, same document, and for chunked
    layers the same chunk.

    Chunks are aligned to absolute positions 0, C, 2C, ... (not sliding windows), as in HF. With packed
    documents positions restart per document, so chunks align to each document's start, which makes a packed
    document compute exactly what it computes alone.
    q_index: (Tq,) row indices of the queries; q_pos, q_seg: (B, Tq); k_pos, k_seg: (B, S).
    """
    k_index = jnp.arange(k_pos.shape[1])
    mask = (k_index[None, :] <= q_index[:, None])[None] & (q_seg[:, :, None] == k_seg[:, None, :])
    if chunk_size is not None:
        mask = mask & (q_pos[:, :, None] // chunk_size == k_pos[:, None, :] // chunk_size)
    return mask


def attention_masks(positions: jax.Array, segment_ids: jax.Array | None,
                    chunk_size: int | None) -> tuple[jax.Array, jax.Array]:
    """(global, chunked) masks (B, T, T) for a whole sequence (tests and debugging)."""
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    index = jnp.arange(positions.shape[1])
    return (attention_mask(index, positions, seg, positions, seg, None),
            attention_mask(index, positions, seg, positions, seg, chunk_size))


def temperature_scales(positions: jax.Array, config: Llama4Config) -> jax.Array:
    """NoPE query scale 1 + attn_scale * log1p(floor((p + 1) / floor_scale)), (B, T) float32.

    HF reads p from the cache index (arange + past), not position_ids; for an unpadded sequence that equals
    our positions. With the published floor_scale (8192) it is exactly 1 below p = 8191.
    """
    if not config.attn_temperature_tuning:
        return jnp.ones(positions.shape, jnp.float32)
    p = positions.astype(jnp.float32)
    return jnp.log1p(jnp.floor((p + 1.0) / config.floor_scale)) * config.attn_scale + 1.0


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q: (B, Tq, K, G, H); k, v: (B, S, K, H); mask (B, Tq, S) -> (B, Tq, K, G, H). Softmax in float32."""
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, inputs: AttentionInputs,
                          chunk_size: int | None) -> jax.Array:
    """Causal softmax attention with grouped KV heads, without materialising repeated K/V.

    q: (B, T, N, H); k, v: (B, S, K, H). Query head n reads KV head n // G, which is HF's repeat_kv
    (repeat_interleave), not tile. Long sequences run in query blocks, each rematerialised in the backward
    pass, so the (T, S) score matrix never exists at once.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    pos, seg = inputs.positions, inputs.segment_ids

    def block(q_blk, start):
        size = q_blk.shape[1]
        q_pos = jax.lax.dynamic_slice_in_dim(pos, start, size, axis=1)
        q_seg = jax.lax.dynamic_slice_in_dim(seg, start, size, axis=1)
        mask = attention_mask(start + jnp.arange(size), q_pos, q_seg, pos, seg, chunk_size)
        return _attend(q_blk, k, v, mask)

    if t <= 2 * _QUERY_BLOCK or t % _QUERY_BLOCK:
        out = block(q, 0)
    else:
        blocks = q.reshape(b, t // _QUERY_BLOCK, _QUERY_BLOCK, *q.shape[2:]).swapaxes(0, 1)
        starts = jnp.arange(t // _QUERY_BLOCK) * _QUERY_BLOCK
        out = loops.block_map(lambda xs: jax.checkpoint(block)(*xs), (blocks, starts))
        out = out.swapaxes(0, 1)
    return out.reshape(b, t, n, h)


class Attention(nnx.Module):
    """Self-attention of one decoder layer; its RoPE/NoPE and chunked/global kind comes from `spec`."""

    def __init__(self, config: Llama4Config, spec: LayerSpec, *, rngs: nnx.Rngs, param_dtype: jnp.dtype):
        self.spec = spec
        self.eps = config.rms_norm_eps
        self.use_qk_norm = config.use_qk_norm and spec.use_rope  # QK norm only on RoPE layers
        self.chunk_size = config.attention_chunk_size
        d, n, kv, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        std = config.initializer_range
        self.q_proj = param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), std=std, dtype=param_dtype)
        self.k_proj = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), std=std, dtype=param_dtype)
        self.v_proj = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), std=std, dtype=param_dtype)
        self.o_proj = param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), std=std, dtype=param_dtype)
        if config.attention_bias:
            self.q_bias = nnx.Param(jnp.zeros((n, h), param_dtype), logical_axes=("q_heads", "head_dim"))
            self.k_bias = nnx.Param(jnp.zeros((kv, h), param_dtype), logical_axes=("kv_heads", "head_dim"))
            self.v_bias = nnx.Param(jnp.zeros((kv, h), param_dtype), logical_axes=("kv_heads", "head_dim"))
            self.o_bias = nnx.Param(jnp.zeros((d,), param_dtype), logical_axes=("embed",))
        self.attention_bias = config.attention_bias

    def __call__(self, x: jax.Array, inputs: AttentionInputs) -> jax.Array:
        q, k, v = self.qkv(x, inputs)
        out = dot_product_attention(q, k, v, inputs, self.chunk_size if self.spec.chunked else None)
        return self.output(out)

    def qkv(self, x: jax.Array, inputs: AttentionInputs) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(B, T, D) -> q (B, T, N, H), k and v (B, T, K, H), with RoPE, QK norm or temperature applied (the
        part the KV-cache path of llama4_jax.generate shares with the full forward)."""
        dtype = x.dtype
        q = jnp.einsum("BTD,DNH->BTNH", x, self.q_proj[...].astype(dtype))
        k = jnp.einsum("BTD,DKH->BTKH", x, self.k_proj[...].astype(dtype))
        v = jnp.einsum("BTD,DKH->BTKH", x, self.v_proj[...].astype(dtype))
        if self.attention_bias:
            q = q + self.q_bias[...].astype(dtype)
            k = k + self.k_bias[...].astype(dtype)
            v = v + self.v_bias[...].astype(dtype)
        if self.spec.use_rope:
            q = apply_rope(q, inputs.cos, inputs.sin)
            k = apply_rope(k, inputs.cos, inputs.sin)
            if self.use_qk_norm:  # weightless RMS norm per head (HF's "L2Norm"); a rotation commutes with it
                q = rms_normalize(q, self.eps)
                k = rms_normalize(k, self.eps)
        else:
            # NoPE layers: temperature tuning scales the queries; no RoPE, no QK norm.
            q = (q.astype(jnp.float32) * inputs.temperature[:, :, None, None]).astype(dtype)
        return q, k, v

    def output(self, out: jax.Array) -> jax.Array:
        """Attention output (B, T, N, H) -> (B, T, D) through o_proj."""
        y = jnp.einsum("BTNH,NHD->BTD", out, self.o_proj[...].astype(out.dtype))
        if self.attention_bias:
            y = y + self.o_bias[...].astype(out.dtype)
        return y
