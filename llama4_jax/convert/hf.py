"""The one table between Hugging Face Llama 4 parameter names and ours, used in both directions.

HF stores nn.Linear weights as (out, in); we store y = x @ W layouts with heads split out, e.g. q_proj as
(D, N, H). HF's fused experts are already x @ W: gate_up_proj (E, D, 2F) becomes our (E, D, 2, F) by a
reshape (gate is the first F columns, up the last F). Decoder layer i lives in scanned block i // P at
slot i % P (P = config.block_size), stacked along the blocks' leading axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from llama4_jax.config import Llama4Config
from llama4_jax.multimodal_config import Llama4MultimodalConfig

TEXT_PREFIX = ""  # text-only checkpoints: model.*, lm_head.weight
MULTIMODAL_PREFIX = "language_model."  # Llama4ForConditionalGeneration: language_model.model.*, ...


@dataclasses.dataclass(frozen=True)
class Transform:
    """How an HF tensor maps to ours. kind: 'identity'; 'linear' (transpose an (out, in) weight, then split
    dims; `in_dims` of our leading dims are the input side); 'split_last' (same memory order, HF's last dim
    split in two, e.g. gate_up (E, D, 2F) -> (E, D, 2, F))."""

    kind: str
    in_dims: int = 1

    def to_ours(self, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "linear":
            return transpose_2d(hf).reshape(shape)
        return hf.reshape(shape)

    def to_hf(self, ours: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "linear":
            fan_in = math.prod(ours.shape[: self.in_dims])
            return transpose_2d(ours.reshape(fan_in, -1))
        return ours.reshape(hf_shape)

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "linear":
            return (math.prod(shape[self.in_dims:]), math.prod(shape[: self.in_dims]))
        if self.kind == "split_last":
            return (*shape[:-2], shape[-2] * shape[-1])
        return shape


def transpose_2d(x: np.ndarray, out: np.ndarray | None = None, tile: int = 256) -> np.ndarray:
    """x.T (x 2-D) as a C-contiguous array, written into `out` if given. Copies square tiles: numpy's
    element-strided copy of a large transpose is several times slower (~1.5 s vs ~0.3 s for a 256 MiB
    (65536, 2048) bf16 lm_head), and conversions transpose every nn.Linear weight."""
    rows, cols = x.shape
    if out is None:
        out = np.empty((cols, rows), x.dtype)
    assert out.shape == (cols, rows), (out.shape, x.shape)
    if out.dtype == x.dtype and x.dtype.itemsize in (2, 4, 8):  # same bits: copy as unsigned ints
        view = np.dtype(f"u{x.dtype.itemsize}")
        x, dest = x.view(view), out.view(view)
    else:
        dest = out
    for r in range(0, rows, tile):
        for c in range(0, cols, tile):
            dest[c:c + tile, r:r + tile] = x[r:r + tile, c:c + tile].T
    return out


IDENTITY = Transform("identity")
LINEAR = Transform("linear")
LINEAR_OUT = Transform("linear", in_dims=2)  # o_proj: ours (N, H, D) <- HF (D, N*H)
SPLIT_LAST = Transform("split_last")

# HF name under model.layers.{i}. -> (our path under the layer, transform). Names mirror HF.
_LAYER_TABLE: dict[str, tuple[str, Transform]] = {
    "input_layernorm.weight": ("input_layernorm.weight", IDENTITY),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", IDENTITY),
    "self_attn.q_proj.weight": ("self_attn.q_proj", LINEAR),
    "self_attn.k_proj.weight": ("self_attn.k_proj", LINEAR),
    "self_attn.v_proj.weight": ("self_attn.v_proj", LINEAR),
    "self_attn.o_proj.weight": ("self_attn.o_proj", LINEAR_OUT),
}
_ATTENTION_BIAS_TABLE = {
    **{f"self_attn.{x}_proj.bias": (f"self_attn.{x}_bias", SPLIT_LAST) for x in ("q", "k", "v")},
    "self_attn.o_proj.bias": ("self_attn.o_bias", IDENTITY),
}
_MOE_TABLE = {
    "feed_forward.router.weight": ("feed_forward.router", LINEAR),
    "feed_forward.experts.gate_up_proj": ("feed_forward.experts.gate_up_proj", SPLIT_LAST),
    "feed_forward.experts.down_proj": ("feed_forward.experts.down_proj", IDENTITY),
    **{f"feed_forward.shared_expert.{p}_proj.weight": (f"feed_forward.shared_expert.{p}_proj", LINEAR)
       for p in ("gate", "up", "down")},
}
_DENSE_TABLE = {
    f"feed_forward.{p}_proj.weight": (f"feed_forward.{p}_proj", LINEAR) for p in ("gate", "up", "down")
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor: where it lives in our state (path, and block index when stacked) and how it maps."""

    hf_name: str
    path: tuple[str | int, ...]
    block: int | None
    transform: Transform


def entries(config: Llama4Config | Llama4MultimodalConfig, prefix: str = TEXT_PREFIX) -> Iterator[Entry]:
    """Every HF tensor of a text model with this config, in HF's order (of a multimodal model, whatever the
    prefix, for a `Llama4MultimodalConfig`)."""
    if isinstance(config, Llama4MultimodalConfig):
        yield from multimodal_entries(config)
        return
    yield Entry(f"{prefix}model.embed_tokens.weight", ("model", "embed_tokens"), None, IDENTITY)
    p = config.block_size
    for i, spec in enumerate(config.layer_specs):
        table = dict(_LAYER_TABLE)
        if config.attention_bias:
            table.update(_ATTENTION_BIAS_TABLE)
        table.update(_MOE_TABLE if spec.moe else _DENSE_TABLE)
        for hf_suffix, (ours, transform) in table.items():
            path = ("model", "blocks", "layers", i % p, *ours.split("."))
            yield Entry(f"{prefix}model.layers.{i}.{hf_suffix}", path, i // p, transform)
    yield Entry(f"{prefix}model.norm.weight", ("model", "norm", "weight"), None, IDENTITY)
    if not config.tie_word_embeddings:  # HF omits lm_head.weight from tied checkpoints
        yield Entry(f"{prefix}lm_head.weight", ("lm_head",), None, LINEAR)


# Vision tower, HF name under vision_model.model.layers.{j}. -> (our path under the stacked layers, transform).
_VISION_LAYER_TABLE: dict[str, tuple[str, Transform]] = {
    **{f"self_attn.{x}_proj.{kind}": (f"self_attn.{x}_{'proj' if kind == 'weight' else 'bias'}",
                                      LINEAR if kind == "weight" else SPLIT_LAST)
       for x in ("q", "k", "v") for kind in ("weight", "bias")},
    "self_attn.o_proj.weight": ("self_attn.o_proj", LINEAR_OUT),
    "self_attn.o_proj.bias": ("self_attn.o_bias", IDENTITY),
    **{f"mlp.{fc}.weight": (f"mlp.{fc}", LINEAR) for fc in ("fc1", "fc2")},
    **{f"mlp.{fc}.bias": (f"mlp.{fc}_bias", IDENTITY) for fc in ("fc1", "fc2")},
    **{f"{norm}.{kind}": (f"{norm}.{kind}", IDENTITY)
       for norm in ("input_layernorm", "post_attention_layernorm") for kind in ("weight", "bias")},
}


def multimodal_entries(config: Llama4MultimodalConfig) -> Iterator[Entry]:
    """Every HF tensor of `Llama4ForConditionalGeneration`, in HF's order: vision_model.*,
    multi_modal_projector.*, then the text model under language_model.*."""
    v = "vision_model."
    yield Entry(f"{v}class_embedding", ("vision_model", "class_embedding"), None, IDENTITY)
    yield Entry(f"{v}positional_embedding_vlm", ("vision_model", "positional_embedding_vlm"), None, IDENTITY)
    yield Entry(f"{v}patch_embedding.linear.weight", ("vision_model", "patch_embedding"), None, LINEAR)
    for norm in ("layernorm_pre", "layernorm_post"):
        for kind in ("weight", "bias"):
            yield Entry(f"{v}{norm}.{kind}", ("vision_model", norm, kind), None, IDENTITY)
    for j in range(config.vision_config.num_hidden_layers):
        for hf_suffix, (ours, transform) in _VISION_LAYER_TABLE.items():
            yield Entry(f"{v}model.layers.{j}.{hf_suffix}", ("vision_model", "layers", *ours.split(".")), j,
                        transform)
    for fc in ("fc1", "fc2"):
        yield Entry(f"{v}vision_adapter.mlp.{fc}.weight", ("vision_model", f"adapter_{fc}"), None, LINEAR)
    yield Entry("multi_modal_projector.linear_1.weight", ("multi_modal_projector", "linear_1"), None, LINEAR)
    for entry in entries(config.text_config, MULTIMODAL_PREFIX):
        yield dataclasses.replace(entry, path=("language_model", *entry.path))


def entries_by_param(config: Llama4Config, prefix: str = TEXT_PREFIX) -> dict[tuple, list[Entry]]:
    """The entries of each of our parameters (one per block when stacked, in block order), keyed by path."""
    groups: dict[tuple, list[Entry]] = {}
    for entry in entries(config, prefix):
        groups.setdefault(entry.path, []).append(entry)
    return groups


def _flat_params(model) -> dict[tuple, object]:
    from flax import nnx

    return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def set_from_hf_tensors(model, tensors, prefix: str = TEXT_PREFIX) -> None:
    """Copy HF-named tensors (a mapping name -> array) into `model` in place. Small models only: it builds
    each stacked parameter on the host; streaming, sharded import lives in `llama4_jax.load_hf`."""
    config = model.config
    params = _flat_params(model)
    staged: dict[tuple, np.ndarray] = {}
    for entry in entries(config, prefix):
        variable = params[entry.path]
        if entry.block is None:
            staged[entry.path] = entry.transform.to_ours(np.asarray(tensors[entry.hf_name]), variable.shape)
        else:
            full = staged.setdefault(entry.path, np.zeros(variable.shape, variable.dtype))
            full[entry.block] = entry.transform.to_ours(np.asarray(tensors[entry.hf_name]), variable.shape[1:])
    for path, value in staged.items():
        params[path].set_value(jnp.asarray(value, params[path].dtype))


def hf_tensors(model, prefix: str = TEXT_PREFIX) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array in HF layout) for every tensor, one at a time."""
    params = _flat_params(model)
    for entry in entries(model.config, prefix):
        value = params[entry.path][...]
        if entry.block is not None:
            value = value[entry.block]
        value = np.asarray(value)
        yield entry.hf_name, entry.transform.to_hf(value, entry.transform.hf_shape(value.shape))
