"""The Llama 4 vision tower: patch embedding, a ViT encoder with 2-D RoPE, pixel shuffle and the adapter MLP.

Follows transformers' `Llama4VisionModel` (reference §4, G7, G14, G15): the patch embedding is an unfold
(channel, ky, kx per patch, patches row-major) followed by a linear without bias; the CLS token is appended
LAST and gets RoPE angle 0; LayerNorms use eps 1e-5 whatever `norm_eps` says; GELU is the exact (erf) one,
also after the adapter's second linear. The encoder layers are identical, so their parameters are stacked
on a leading "layers" axis and the forward scans over them (compile time does not grow with depth).

Legend: I images (tiles), C channels, P pixels per patch side, T tokens (G^2 patches + CLS), D vision width,
N heads, H head dim, F MLP width, O adapter/projector width, E text width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax import loops
from llama4_jax.model.layers import apply_rope, param, stacked
from llama4_jax.multimodal_config import Llama4VisionConfig

_LAYERNORM_EPS = 1e-5  # torch nn.LayerNorm's default; HF never passes config.norm_eps


def _zeros(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm: (x - mean) / sqrt(biased var + eps) * weight + bias, statistics in float32."""

    def __init__(self, dim: int, *, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.bias = _zeros((dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + _LAYERNORM_EPS)).astype(x.dtype)
        return y * self.weight[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, torch's nn.GELU() default; hard-coded in HF whatever `hidden_act` says (G15)."""
    return jax.nn.gelu(x, approximate=False)


def vision_rope_tables(config: Llama4VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (1, T, H/2) float32 of the 2-D RoPE, built on the host as HF's `Llama4VisionRotaryEmbedding`.

    Pair k < H/4 of patch t rotates by (t mod G + 1) * f_k (column), pair H/4 + k by (t div G + 1) * f_k (row),
    with f_k = theta^(-2k / (H/2)): the exponent divides by H/2, not H. The CLS token (last) gets angle 0.
    """
    g, freq_dim = config.grid_size, config.head_dim // 2
    exponent = np.arange(0, freq_dim, 2, dtype=np.float32)[: freq_dim // 2] / np.float32(freq_dim)
    # theta**exponent correctly rounded to float32, then a float32 reciprocal, as in llama4_jax.model.layers.
    inv_freq = np.float32(1.0) / (np.float64(config.rope_theta) ** exponent.astype(np.float64)).astype(np.float32)
    t = np.arange(g * g)
    col, row = (t % g + 1).astype(np.float32), (t // g + 1).astype(np.float32)
    angles = np.concatenate([col[:, None] * inv_freq, row[:, None] * inv_freq], axis=-1)
    angles = np.concatenate([angles, np.zeros((1, freq_dim), np.float32)])  # CLS: identity rotation
    return np.cos(angles)[None], np.sin(angles)[None]


class VisionAttention(nnx.Module):
    """Bidirectional multi-head attention with biases and 2-D RoPE on q and k (no QK norm, no GQA)."""

    def __init__(self, config: Llama4VisionConfig, *, rngs: nnx.Rngs, param_dtype):
        d, n, h, std = config.hidden_size, config.num_attention_heads, config.head_dim, config.initializer_range
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_proj", param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), std=std,
                                                dtype=param_dtype))
            setattr(self, f"{name}_bias", _zeros((n, h), ("q_heads", "head_dim"), param_dtype))
        self.o_proj = param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), std=std, dtype=param_dtype)
        self.o_bias = _zeros((d,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        dtype = x.dtype
        q, k, v = (jnp.einsum("ITD,DNH->ITNH", x, getattr(self, f"{n}_proj")[...].astype(dtype))
                   + getattr(self, f"{n}_bias")[...].astype(dtype) for n in ("q", "k", "v"))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scores = jnp.einsum("ITNH,ISNH->INTS", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("INTS,ISNH->ITNH", probs, v)
        return jnp.einsum("ITNH,NHD->ITD", out, self.o_proj[...].astype(dtype)) + self.o_bias[...].astype(dtype)


class VisionMLP(nnx.Module):
    """fc2(gelu(fc1(x))), both with biases."""

    def __init__(self, config: Llama4VisionConfig, *, rngs: nnx.Rngs, param_dtype):
        d, f, std = config.hidden_size, config.intermediate_size, config.initializer_range
        self.fc1 = param(rngs, (d, f), ("embed", "mlp"), std=std, dtype=param_dtype)
        self.fc1_bias = _zeros((f,), ("mlp",), param_dtype)
        self.fc2 = param(rngs, (f, d), ("mlp", "embed"), std=std, dtype=param_dtype)
        self.fc2_bias = _zeros((d,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        h = gelu(x @ self.fc1[...].astype(dtype) + self.fc1_bias[...].astype(dtype))
        return h @ self.fc2[...].astype(dtype) + self.fc2_bias[...].astype(dtype)


class VisionEncoderLayer(nnx.Module):
    """Pre-norm: h += attn(LN1(h)); h += mlp(LN2(h))."""

    def __init__(self, config: Llama4VisionConfig, *, rngs: nnx.Rngs, param_dtype):
        self.input_layernorm = LayerNorm(config.hidden_size, param_dtype=param_dtype)
        self.self_attn = VisionAttention(config, rngs=rngs, param_dtype=param_dtype)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, param_dtype=param_dtype)
        self.mlp = VisionMLP(config, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


def _stacked_layers(config: Llama4VisionConfig, rngs: nnx.Rngs, param_dtype) -> VisionEncoderLayer:
    """`num_hidden_layers` independently initialised layers, parameters stacked on a leading "layers" axis."""
    return stacked(lambda r: VisionEncoderLayer(config, rngs=r, param_dtype=param_dtype), config.num_hidden_layers,
                   rngs)


def pixel_shuffle(x: jax.Array, ratio: float) -> jax.Array:
    """(I, G*G, D) -> (I, (G*r)^2, D/r^2): each output token concatenates a 1/r x 1/r block of neighbouring
    patches in channel order (dy, dx, c). The same reshapes and transposes as HF's `pixel_shuffle`."""
    i, t, d = x.shape
    g = round(t**0.5)
    x = x.reshape(i, g, round(g * ratio), round(d / ratio))  # merge column pairs into channels
    x = x.transpose(0, 2, 1, 3)
    x = x.reshape(i, round(g * ratio), round(g * ratio), round(d / ratio**2))  # merge row pairs
    x = x.transpose(0, 2, 1, 3)
    return x.reshape(i, -1, x.shape[-1])


class Llama4VisionModel(nnx.Module):
    """pixel_values (I, C, S, S) -> image features (I, (G/2)^2, vision_output_dim), HF's `last_hidden_state`."""

    def __init__(self, config: Llama4VisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        d, std = config.hidden_size, config.initializer_range
        g = config.grid_size
        patch_dim = config.num_channels * config.patch_size**2
        self.patch_embedding = param(rngs, (patch_dim, d), (None, "embed"), std=std, dtype=param_dtype)
        self.class_embedding = param(rngs, (d,), ("embed",), std=d**-0.5, dtype=param_dtype)
        self.positional_embedding_vlm = param(rngs, (g * g + 1, d), (None, "embed"), std=d**-0.5,
                                              dtype=param_dtype)
        self.layernorm_pre = LayerNorm(d, param_dtype=param_dtype)
        self.layernorm_post = LayerNorm(d, param_dtype=param_dtype)
        self.layers = _stacked_layers(config, rngs, param_dtype)
        # vision_adapter.mlp: both linears without bias, GELU after each (G15).
        self.adapter_fc1 = param(rngs, (config.intermediate_size, config.projector_input_dim), ("mlp", "embed"),
                                 std=std, dtype=param_dtype)
        self.adapter_fc2 = param(rngs, (config.projector_output_dim, config.projector_output_dim), ("embed", "mlp"),
                                 std=std, dtype=param_dtype)

    def patchify(self, pixel_values: jax.Array) -> jax.Array:
        """(I, C, S, S) -> (I, G*G, C*P*P): torch.nn.Unfold's order, (c, ky, kx) within a patch, patches
        row-major."""
        i, c, s, _ = pixel_values.shape
        p, g = self.config.patch_size, s // self.config.patch_size
        x = pixel_values.reshape(i, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
        return x.reshape(i, g * g, c * p * p)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        config = self.config
        expected = (config.num_channels, config.image_size, config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be (num_tiles, {', '.join(map(str, expected))}) (the position and "
                             f"RoPE tables fix the tile size), got {tuple(pixel_values.shape)}")
        dtype = self.dtype
        with jax.named_scope("patch_embedding"):
            h = self.patchify(pixel_values.astype(dtype)) @ self.patch_embedding[...].astype(dtype)
            cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (h.shape[0], 1, h.shape[-1]))
            h = jnp.concatenate([h, cls], axis=1)  # CLS appended last (G14)
            h = self.layernorm_pre(h + self.positional_embedding_vlm[...].astype(dtype))
        cos, sin = (jnp.asarray(t) for t in vision_rope_tables(config))
        graphdef, state = nnx.split(self.layers)

        def body(h, layer_state):
            with jax.named_scope("vision_layer"):
                return nnx.merge(graphdef, layer_state)(h, cos, sin), None

        h, _ = loops.scan(body, h, state)
        h = self.layernorm_post(h)[:, :-1]  # drop CLS
        with jax.named_scope("vision_adapter"):
            h = pixel_shuffle(h, config.pixel_shuffle_ratio)
            h = gelu(h @ self.adapter_fc1[...].astype(dtype))
            return gelu(h @ self.adapter_fc2[...].astype(dtype))
