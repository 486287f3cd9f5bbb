"""The Llama 4 KV cache and the cached forward pass (prefill and decode steps share it).

Chunked (RoPE) layers keep a ring of the last W = attention_chunk_size - 1 keys and values: a query at
position p attends to [floor(p / C) * C, p], at most C - 1 earlier keys plus itself, so W entries are exactly
enough (as HF's sliding-window cache layer) and a decode step's cost on these layers does not grow with the
prefix. Global (NoPE) layers keep every position up to a fixed `capacity`.

Rows may be left-padded: every token carries its position within its row (-1 for padding). RoPE, chunk
boundaries and the NoPE temperature are computed from these positions, so a padded row computes exactly what
it computes alone. (HF's generate takes the temperature from the raw cache index, pads included; the two
agree on unpadded rows, where our choice also matches the full forward.)

Legend: L blocks, B batch, T new tokens, S cached keys, W ring size, D model, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llama4_jax.config import Llama4Config
from llama4_jax.model.attention import AttentionInputs, _attend, dot_product_attention, temperature_scales
from llama4_jax.model.layers import rope_angles, rope_inv_freq
from llama4_jax.sharding import TRAIN_RULES, Rules, logical_to_spec

KV_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")
POSITION_AXES = ("batch", "length")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer, stacked like the block parameters (leading block axis).

    keys, values: one array per slot of the repeating block, (L, B, S, K, H) with S = W for chunked slots and
      S = capacity for global ones.
    positions: (B, capacity) int32, the position of each absolute index of global caches; -1 = empty or pad.
    ring_positions: (B, W) int32, the position held by each ring slot of chunked caches; -1 = empty or pad.
    length: () int32, absolute indices written so far (the same for every row: rows are left-padded).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    positions: jax.Array
    ring_positions: jax.Array
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]


def ring_size(config: Llama4Config) -> int:
    """W = attention_chunk_size - 1 (1 when the model has no chunked layers, so shapes stay non-empty)."""
    return max(config.attention_chunk_size - 1, 1) if config.attention_chunk_size else 1


def init_cache(config: Llama4Config, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` rows of at most `capacity` tokens (prompt padding included)."""
    if capacity < 1 or batch < 1:
        raise ValueError(f"cache batch and capacity must be >= 1, got batch={batch}, capacity={capacity}")
    w = ring_size(config)
    shapes = [(config.num_blocks, batch, w if spec.chunked else capacity, config.num_key_value_heads,
               config.head_dim) for spec in config.layer_specs[: config.block_size]]
    return KVCache(keys=tuple(jnp.zeros(s, dtype) for s in shapes), values=tuple(jnp.zeros(s, dtype) for s in shapes),
                   positions=jnp.full((batch, capacity), -1, jnp.int32),
                   ring_positions=jnp.full((batch, w), -1, jnp.int32), length=jnp.zeros((), jnp.int32))


def cache_shardings(cache: KVCache, mesh: Mesh, rules: Rules = TRAIN_RULES) -> KVCache:
    """NamedShardings for a cache: batch over the data axes, kv heads over the tensor axis (as the K/V
    projections), so a sharded model decodes without moving its cache."""
    kv = NamedSharding(mesh, logical_to_spec(KV_AXES, rules, what="kv cache"))
    pos = NamedSharding(mesh, logical_to_spec(POSITION_AXES, rules, what="cache positions"))
    return KVCache(keys=tuple(kv for _ in cache.keys), values=tuple(kv for _ in cache.values), positions=pos,
                   ring_positions=pos, length=NamedSharding(mesh, logical_to_spec((), rules)))


def _step_inputs(config: Llama4Config, positions: jax.Array) -> AttentionInputs:
    """RoPE, temperature and segment ids of the new tokens; pads (position -1) form their own segment."""
    valid = positions >= 0
    safe = jnp.where(valid, positions, 0)
    cos, sin = rope_angles(safe, rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
    return AttentionInputs(positions=safe, segment_ids=valid.astype(jnp.int32), cos=cos, sin=sin,
                           temperature=temperature_scales(safe, config))


def _cached_attention(q, k, v, k_cached, v_cached, cached_pos, q_pos, chunk_size):
    """New queries attend to the cached keys and to the new keys (causal by position, same chunk).

    q: (B, T, N, H); k, v: (B, T, K, H); k_cached, v_cached: (B, S, K, H); cached_pos (B, S), q_pos (B, T).
    """
    b, t, n, h = q.shape
    k_all = jnp.concatenate([k_cached, k], axis=1)
    v_all = jnp.concatenate([v_cached, v], axis=1)
    k_pos = jnp.concatenate([cached_pos, q_pos], axis=1)
    mask = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    if chunk_size is not None:
        mask = mask & (k_pos[:, None, :] // chunk_size == q_pos[:, :, None] // chunk_size)
    out = _attend(q.reshape(b, t, k.shape[2], n // k.shape[2], h), k_all, v_all, mask)
    return out.reshape(b, t, n, h)


def _write_ring(ring: jax.Array, new: jax.Array, length: jax.Array) -> jax.Array:
    """Writes the last min(T, W) of `new` (B, T, ...) into ring slots (length + index) % W of `ring` (B, W, ...).
    Only distinct slots are written: a scatter with repeated indices has no defined winner."""
    t, w = new.shape[1], ring.shape[1]
    m = min(t, w)
    slots = (length + t - m + jnp.arange(m)) % w
    return ring.at[:, slots].set(new[:, t - m:])


def _layer(layer, h, inputs, q_pos, cache: KVCache, slot: int, block, prefill: bool, ffn_kwargs):
    """One decoder layer with its cache: returns h and the (L, ...) key/value arrays of this slot updated."""
    attn = layer.self_attn
    chunk = attn.chunk_size if attn.spec.chunked else None
    q, k, v = attn.qkv(layer.input_layernorm(h), inputs)
    keys, values = cache.keys[slot], cache.values[slot]
    if prefill:  # empty cache: exactly the full forward's attention over the new tokens
        out = dot_product_attention(q, k, v, inputs, chunk)
    else:
        cached_pos = cache.ring_positions if attn.spec.chunked else cache.positions
        out = _cached_attention(q, k, v, keys[block], values[block], cached_pos, q_pos, chunk)
    h = h + attn.output(out)
    h, _ = layer.feed_forward_residual(h, **ffn_kwargs)
    if attn.spec.chunked:
        keys = keys.at[block].set(_write_ring(keys[block], k.astype(keys.dtype), cache.length))
        values = values.at[block].set(_write_ring(values[block], v.astype(values.dtype), cache.length))
    else:  # O(T) in-place update at the cache's end
        start = (block, 0, cache.length, 0, 0)
        keys = jax.lax.dynamic_update_slice(keys, k[None].astype(keys.dtype), start)
        values = jax.lax.dynamic_update_slice(values, v[None].astype(values.dtype), start)
    return h, keys, values


def forward_with_cache(model, cache: KVCache, tokens: jax.Array, positions: jax.Array, *,
                       prefill: bool = False) -> tuple[jax.Array, KVCache]:
    """Runs new tokens (B, T) at `positions` (B, T) (-1 = left padding) through the model with its cache.

    Returns the final-norm hidden states (B, T, D) (apply `model.logits`) and the cache with the tokens
    appended. `prefill=True` requires an empty cache and attends within the new tokens only (the full
    forward's attention, bit for bit). The caller keeps `cache.length + T <= cache.capacity` (the global
    caches would otherwise silently wrap, as dynamic_update_slice clamps).
    """
    text = model.model
    config = text.config
    ffn_kwargs = dict(moe_impl=text.moe_impl, gmm_backend=text.gmm_backend, capacity_factor=text.capacity_factor)
    inputs = _step_inputs(config, positions)
    h = jnp.take(text.embed_tokens[...], tokens, axis=0).astype(text.dtype)
    graphdef, state = nnx.split(text.blocks)

    def body(carry, xs):
        h, keys, values = carry
        block_state, block = xs
        layers = nnx.merge(graphdef, block_state).layers
        keys, values = list(keys), list(values)
        for slot, layer in enumerate(layers):
            step_cache = dataclasses.replace(cache, keys=tuple(keys), values=tuple(values))
            h, keys[slot], values[slot] = _layer(layer, h, inputs, positions, step_cache, slot, block, prefill,
                                                 ffn_kwargs)
        return (h, tuple(keys), tuple(values)), None

    with jax.named_scope("cached_blocks"):
        (h, keys, values), _ = jax.lax.scan(body, (h, cache.keys, cache.values),
                                            (state, jnp.arange(config.num_blocks)))
    t = tokens.shape[1]
    new_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache.length))
    ring_positions = _write_ring(cache.ring_positions, positions, cache.length)
    cache = KVCache(keys=keys, values=values, positions=new_positions, ring_positions=ring_positions,
                    length=cache.length + t)
    return text.norm(h), cache
