"""The Llama 4 text stack: decoder layers grouped into the repeating block, scanned over depth.

Llama 4 repeats a short layer pattern (NoPE every 4th layer; Maverick also alternates dense/MoE), so the
stack is `num_blocks` copies of one block of `config.block_size` layers. Block parameters are stacked along
a leading "layers" axis and the forward is a `jax.lax.scan` over them, so compile time does not grow with
depth. `scan_layers=False` runs the same stacked parameters in a Python loop (for debugging).

Legend: B batch, T sequence, D model, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax import loops
from llama4_jax.config import LayerSpec, Llama4Config
from llama4_jax.model.attention import Attention, AttentionInputs, temperature_scales
from llama4_jax.model.layers import MLP, RMSNorm, param, rope_angles, rope_inv_freq, stacked
from llama4_jax.model.moe import MoE
from llama4_jax.sharding import constrain

RESIDUAL_AXES = ("batch", "length", "act_embed")

# What the backward pass keeps of each decoder layer's forward: "full" recomputes everything but the layer
# input, "dots" keeps matmul outputs without batch dims (weights-side products), "none" keeps everything.
# Per layer rather than per 4-layer block, so the backward's working set is one layer's activations.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "none": None,
}


class DecoderLayer(nnx.Module):
    """Pre-norm residual layer: h += attn(norm(h)); h += ffn(norm(h)). The one place layer kinds branch."""

    def __init__(self, config: Llama4Config, spec: LayerSpec, *, rngs: nnx.Rngs, param_dtype: jnp.dtype):
        self.spec = spec
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(config, spec, rngs=rngs, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        if spec.moe:
            self.feed_forward = MoE(config, rngs=rngs, param_dtype=param_dtype)
        else:
            self.feed_forward = MLP(config.hidden_size, config.intermediate_size_mlp, rngs=rngs,
                                    std=config.initializer_range, param_dtype=param_dtype)

    def __call__(self, h: jax.Array, inputs: AttentionInputs, *, moe_impl: str, gmm_backend: str | None,
                 capacity_factor: float | None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """(B, T, D) -> (B, T, D), and router stats for MoE layers (None for dense ones)."""
        with jax.named_scope("attention"):
            h = h + self.self_attn(self.input_layernorm(h), inputs)
        return self.feed_forward_residual(h, moe_impl=moe_impl, gmm_backend=gmm_backend,
                                          capacity_factor=capacity_factor)

    def feed_forward_residual(self, h: jax.Array, *, moe_impl: str, gmm_backend: str | None,
                              capacity_factor: float | None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """h + ffn(norm(h)) and router stats (None for dense layers); shared with the KV-cache decode path."""
        h = constrain(h, RESIDUAL_AXES)
        x = self.post_attention_layernorm(h)
        if self.spec.moe:
            y, stats = self.feed_forward(x, impl=moe_impl, backend=gmm_backend, capacity_factor=capacity_factor)
            return constrain(h + y, RESIDUAL_AXES), stats
        return constrain(h + self.feed_forward(x), RESIDUAL_AXES), None


class Block(nnx.Module):
    """One period of the layer pattern: `block_size` decoder layers of possibly different kinds."""

    def __init__(self, config: Llama4Config, *, rngs: nnx.Rngs, param_dtype: jnp.dtype):
        specs = config.layer_specs[: config.block_size]
        self.layers = nnx.List([DecoderLayer(config, s, rngs=rngs, param_dtype=param_dtype) for s in specs])

    def __call__(self, h: jax.Array, inputs: AttentionInputs, *, remat: str = "none",
                 **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns h and the MoE layers' router stats stacked in layer order ({} if the block has none)."""
        stats = []
        for layer in self.layers:
            run = lambda layer, h, inputs: layer(h, inputs, **kwargs)
            if remat != "none":
                run = nnx.remat(run, policy=REMAT_POLICIES[remat])
            h, layer_stats = run(layer, h, inputs)
            if layer_stats is not None:
                stats.append(layer_stats)
        return h, (jax.tree.map(lambda *xs: jnp.stack(xs), *stats) if stats else {})


def _stacked_blocks(config: Llama4Config, rngs: nnx.Rngs, param_dtype: jnp.dtype) -> Block:
    """`num_blocks` independently initialised blocks with parameters stacked on a new leading axis."""
    return stacked(lambda r: Block(config, rngs=r, param_dtype=param_dtype), config.num_blocks, rngs)


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 where the segment id changes: (B, T) -> (B, T) int32."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=1)
    return idx - start


class Llama4TextModel(nnx.Module):
    """Embedding, scanned decoder blocks, final norm. Returns final hidden states (B, T, D)."""

    def __init__(self, config: Llama4Config, *, rngs: nnx.Rngs, param_dtype: jnp.dtype = jnp.float32,
                 dtype: jnp.dtype = jnp.float32, scan_layers: bool = True, moe_impl: str = "dispatch",
                 gmm_backend: str | None = None, capacity_factor: float | None = None, remat: str = "none"):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        self.config = config
        self.dtype = dtype
        self.capacity_factor = capacity_factor
        self.remat = remat
        self.scan_layers = scan_layers
        self.moe_impl = moe_impl
        self.gmm_backend = gmm_backend
        self.embed_tokens = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"),
                                  std=config.initializer_range, dtype=param_dtype)
        self.blocks = _stacked_blocks(config, rngs, param_dtype)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array | None = None, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, inputs_embeds: jax.Array | None = None,
                 return_aux: bool = False):
        """input_ids (B, T) int32, or inputs_embeds (B, T, D) -> final hidden states (B, T, D).

        positions default to 0..T-1, or restart per document when segment_ids (B, T) mark packed documents
        (attention never crosses documents). With return_aux, also a dict of router stats per MoE layer,
        each with a leading (num_moe_layers,) axis.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = jnp.take(self.embed_tokens[...], input_ids, axis=0)
        h = constrain(inputs_embeds.astype(self.dtype), RESIDUAL_AXES)
        inputs = self._attention_inputs(h.shape[:2], positions, segment_ids)
        h, aux = self._run_blocks(h, inputs)
        h = self.norm(h)
        return (h, aux) if return_aux else h

    def _attention_inputs(self, shape: tuple[int, int], positions, segment_ids) -> AttentionInputs:
        config = self.config
        if positions is None:
            if segment_ids is not None:
                positions = document_positions(segment_ids)
            else:
                positions = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        cos, sin = rope_angles(positions, inv_freq)
        if segment_ids is None:
            segment_ids = jnp.zeros(shape, jnp.int32)
        return AttentionInputs(positions=positions, segment_ids=segment_ids, cos=cos, sin=sin,
                               temperature=temperature_scales(positions, config))

    def _run_blocks(self, h: jax.Array, inputs: AttentionInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        graphdef, state = nnx.split(self.blocks)
        kwargs = dict(moe_impl=self.moe_impl, gmm_backend=self.gmm_backend, capacity_factor=self.capacity_factor,
                      remat=self.remat)

        def body(h, block_state):
            with jax.named_scope("block"):
                return nnx.merge(graphdef, block_state)(h, inputs, **kwargs)

        if self.scan_layers:
            h, stats = loops.scan(body, h, state)
        else:
            per_block = []
            for i in range(self.config.num_blocks):
                h, block_stats = body(h, jax.tree.map(lambda a, i=i: a[i], state))
                per_block.append(block_stats)
            stats = jax.tree.map(lambda *xs: jnp.stack(xs), *per_block)
        # (num_blocks, moe layers per block, ...) -> (num_moe_layers, ...), in layer order.
        return h, jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), stats)


class Llama4ForCausalLM(nnx.Module):
    """Llama 4 text model with its LM head (tied to embed_tokens when tie_word_embeddings).

    >>> model = Llama4ForCausalLM(config, rngs=nnx.Rngs(0))
    >>> logits = model(input_ids)            # (B, T) int32 -> (B, T, V)
    >>> hidden = model.model(input_ids)      # (B, T, D), for losses that compute logits in chunks
    >>> logits = model.logits(hidden)
    """

    def __init__(self, config: Llama4Config, *, rngs: nnx.Rngs, param_dtype: jnp.dtype = jnp.float32,
                 dtype: jnp.dtype = jnp.float32, scan_layers: bool = True, moe_impl: str = "dispatch",
                 gmm_backend: str | None = None, capacity_factor: float | None = None, remat: str = "none"):
        self.config = config
        self.model = Llama4TextModel(config, rngs=rngs, param_dtype=param_dtype, dtype=dtype,
                                     scan_layers=scan_layers, moe_impl=moe_impl, gmm_backend=gmm_backend,
                                     capacity_factor=capacity_factor, remat=remat)
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"),
                                 std=config.initializer_range, dtype=param_dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """(B, T, D) hidden states -> (B, T, V) logits (no soft-capping or scaling in Llama 4)."""
        if self.config.tie_word_embeddings:
            logits = hidden @ self.model.embed_tokens[...].astype(hidden.dtype).T
        else:
            logits = hidden @ self.lm_head[...].astype(hidden.dtype)
        return constrain(logits, ("batch", "length", "act_vocab"))

    def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, return_hidden_states: bool = False,
                 return_aux: bool = False):
        """(B, T) int32 ids -> (B, T, V) logits, or (B, T, D) hidden states; with return_aux a pair whose
        second item holds per-MoE-layer router stats (see `Llama4TextModel`)."""
        hidden, aux = self.model(input_ids, positions=positions, segment_ids=segment_ids, return_aux=True)
        out = hidden if return_hidden_states else self.logits(hidden)
        return (out, aux) if return_aux else out
