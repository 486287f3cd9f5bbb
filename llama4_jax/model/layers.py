"""Small building blocks: parameter creation with logical axes, RMSNorm, SwiGLU MLP, RoPE.

Legend for einsum subscripts in the model files: B batch, T query length, S key length, D model width,
N query heads, K kv heads, G query heads per kv head (N = K*G), H head dim, F ffn width, E experts, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax.config import RopeScaling


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], *, std: float,
          dtype: jnp.dtype) -> nnx.Param:
    """A normally initialised weight that carries its logical axis names (mapped to a mesh by sharding rules)."""
    assert len(shape) == len(axes), (shape, axes)
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def ones_param(shape: tuple[int, ...], axes: tuple[str | None, ...], *, dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) over the last dim, in float32, cast back (HF `_norm(x.float()).type_as(x)`)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a plain multiplicative weight (no 1 + w), applied after the cast back (as HF)."""

    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.weight = ones_param((dim,), ("norm",), dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_normalize(x, self.eps) * self.weight[...].astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up)). Dense layers use intermediate_size_mlp; the shared expert
    uses intermediate_size."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, std: float, param_dtype: jnp.dtype):
        self.gate_proj = param(rngs, (dim, hidden), ("embed", "mlp"), std=std, dtype=param_dtype)
        self.up_proj = param(rngs, (dim, hidden), ("embed", "mlp"), std=std, dtype=param_dtype)
        self.down_proj = param(rngs, (hidden, dim), ("mlp", "embed"), std=std, dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        with jax.named_scope("mlp"):
            gate = x @ self.gate_proj[...].astype(dtype)
            up = x @ self.up_proj[...].astype(dtype)
            return (jax.nn.silu(gate) * up) @ self.down_proj[...].astype(dtype)


# --------------------------------------------------------------------------------------------------
# RoPE

def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies (head_dim/2,), float32, computed on the host exactly as HF does in float32."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    # theta**exponent correctly rounded to float32 (via float64), then a float32 reciprocal: bit-identical to
    # torch's float32 table here, where numpy's float32 pow differs in the last bit for ~10% of entries.
    # At position 10^4 one ulp of inv_freq moves the angle by ~1e-3 rad, so the last bit matters.
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / power
    if scaling is None:
        return inv_freq
    # llama3 rule, in float32 and in HF's operation order (torch evaluates `scalar / tensor` as
    # reciprocal(tensor) * scalar), so the table is bit-identical. With low == high (Scout's fixed config) the
    # smoothing band is empty and its formula divides by zero; np.where never selects it there, and this runs
    # on the host so no NaN can reach a gradient.
    f32 = np.float32
    orig = f32(scaling.original_max_position_embeddings)
    low, high, factor = f32(scaling.low_freq_factor), f32(scaling.high_freq_factor), f32(scaling.factor)
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = (f32(1.0) / inv_freq) * f32(2 * np.pi)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = ((f32(1.0) / wavelen) * orig - low) / f32(high - low)
        smoothed = (f32(1.0) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin of positions * inv_freq, each (B, T, H/2) in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Interleaved-pair (complex) RoPE on x (B, T, heads, H): pairs are (x[2j], x[2j+1]), NOT rotate_half.

    Llama 4 checkpoints keep Meta's q/k row order, so the rotate_half form used for Llama 2/3 is wrong here.
    """
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    real, imag = x32[..., 0], x32[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def stacked(make_one, count: int, rngs: nnx.Rngs):
    """`count` independently initialised modules from `make_one(rngs)`, parameters stacked on a leading axis
    whose logical name is "layers" (what the scanned stacks of the text and vision models run over)."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=count)
    def make(rngs: nnx.Rngs):
        return make_one(rngs)

    modules = make(rngs)
    for _, variable in nnx.iter_graph(modules):
        if isinstance(variable, nnx.Param):
            variable.set_metadata(logical_axes=("layers", *variable.get_metadata()["logical_axes"]))
    return modules
