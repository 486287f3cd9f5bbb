"""Llama 4 with images: vision tower, projector, and early fusion into the text model's embeddings.

Early fusion as in transformers' `Llama4ForConditionalGeneration` (reference §4 steps 9-10, G16): the
projected image features overwrite, in order, the embeddings at every `<|patch|>` position (id 200092); the
sequence then runs through the text model unchanged (ordinary positions, causal and chunked masks, RoPE).

Legend: B batch, T sequence, I image tiles, R feature rows per tile, O vision_output_dim, E text width, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax.model.layers import param
from llama4_jax.model.transformer import Llama4ForCausalLM
from llama4_jax.model.vision import Llama4VisionModel
from llama4_jax.multimodal_config import Llama4MultimodalConfig


class MultiModalProjector(nnx.Module):
    """linear_1: vision_output_dim -> text hidden_size, no bias (HF ignores multi_modal_projector_bias)."""

    def __init__(self, config: Llama4MultimodalConfig, *, rngs: nnx.Rngs, param_dtype):
        vision = config.vision_config
        self.linear_1 = param(rngs, (vision.vision_output_dim, config.text_config.hidden_size), ("mlp", "embed"),
                              std=vision.initializer_range, dtype=param_dtype)

    def __call__(self, features: jax.Array) -> jax.Array:
        return features @ self.linear_1[...].astype(features.dtype)


def merge_image_features(inputs_embeds: jax.Array, input_ids: jax.Array, features: jax.Array,
                         image_token_id: int) -> jax.Array:
    """HF's masked_scatter: row j of `features` (M, E) replaces the embedding of the j-th `image_token_id` in
    `input_ids` (B, T), counted row-major over the batch. inputs_embeds (B, T, E) -> (B, T, E).

    Per-example `features` (B, M, E) fill each sequence's placeholders from its own rows instead (training
    batches: every example has a fixed number of tile slots, the unused ones padding at the end of its rows).

    Outside jit the counts must match exactly (ValueError otherwise, as HF); with per-example features a
    sequence may have fewer placeholders than rows. Inside jit shapes are static, so extra feature rows
    (padding tiles) are ignored; the caller must not have more placeholders than rows.
    """
    mask = input_ids == image_token_id
    per_example = features.ndim == 3
    if not isinstance(mask, jax.core.Tracer):
        count = int(mask.sum(axis=1).max()) if per_example else int(mask.sum())
        if count > features.shape[-2] or (not per_example and count != features.shape[0]):
            raise ValueError(f"the prompt has {count} image placeholder tokens (id {image_token_id}) but the images "
                             f"give {features.shape[-2]} feature rows; each tile needs its own block of them")
    if per_example:
        index = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, features.shape[1] - 1)  # (B, T): each row's own count
        rows = jnp.take_along_axis(features, index[..., None], axis=1)
    else:
        index = jnp.cumsum(mask.reshape(-1)) - 1  # the feature row of each placeholder, in order
        rows = jnp.take(features, jnp.clip(index, 0, features.shape[0] - 1), axis=0).reshape(inputs_embeds.shape)
    return jnp.where(mask[..., None], rows.astype(inputs_embeds.dtype), inputs_embeds)


class Llama4ForConditionalGeneration(nnx.Module):
    """Llama 4 text model with the vision tower and projector (HF names: vision_model, multi_modal_projector,
    language_model).

    >>> model = Llama4ForConditionalGeneration(config, rngs=nnx.Rngs(0))
    >>> logits = model(input_ids, pixel_values)   # (B, T) int32, (I, 3, S, S) -> (B, T, V)
    >>> logits = model(input_ids)                 # text only
    """

    def __init__(self, config: Llama4MultimodalConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=jnp.float32, **text_kwargs):
        """text_kwargs: runtime options of the text model (scan_layers, moe_impl, remat, ...)."""
        self.config = config
        self.vision_model = Llama4VisionModel(config.vision_config, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.multi_modal_projector = MultiModalProjector(config, rngs=rngs, param_dtype=param_dtype)
        self.language_model = Llama4ForCausalLM(config.text_config, rngs=rngs, param_dtype=param_dtype, dtype=dtype,
                                                **text_kwargs)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """(I, C, S, S) -> projected features (I * R, E), in the text model's compute dtype."""
        features = self.vision_model(pixel_values)
        return self.multi_modal_projector(features.reshape(-1, features.shape[-1]))

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None, *,
              image_features: jax.Array | None = None) -> jax.Array:
        """Token embeddings (B, T, E) with image features fused in at the `<|patch|>` positions. Pass
        precomputed `image_features` (from `get_image_features`, e.g. under stop_gradient) instead of pixels:
        (M, E), or (B, M, E) per example (see `merge_image_features`)."""
        text = self.language_model.model
        embeds = jnp.take(text.embed_tokens[...], input_ids, axis=0).astype(text.dtype)
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("pass pixel_values or image_features, not both")
            image_features = self.get_image_features(pixel_values)
        if image_features is None:
            return embeds
        return merge_image_features(embeds, input_ids, image_features, self.config.image_token_index)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None, *,
                 image_features: jax.Array | None = None, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, return_hidden_states: bool = False, return_aux: bool = False):
        """(B, T) ids and optional (I, C, S, S) pixel values -> (B, T, V) logits, or (B, T, E) hidden states;
        with return_aux also the text model's per-MoE-layer router stats."""
        embeds = self.embed(input_ids, pixel_values, image_features=image_features)
        lm = self.language_model
        hidden, aux = lm.model(inputs_embeds=embeds, positions=positions, segment_ids=segment_ids, return_aux=True)
        out = hidden if return_hidden_states else lm.logits(hidden)
        return (out, aux) if return_aux else out
