"""Hugging Face checkpoint -> llama4_jax: checked up front, then streamed and sharded from birth.

`open_hf` reads config.json and every safetensors header and checks them against the config, raising one
ValueError that lists every problem. `load_hf` then builds each parameter with
`jax.make_array_from_callback`: every device's callback reads only the rows of the HF tensors its shard
needs (an expert slice of a fused expert tensor, a vocabulary slice of the embedding), so the host holds
at most one shard plus one HF tensor at a time, never the model.

Multimodal checkpoints (`Llama4ForConditionalGeneration`, names under `language_model.`) load as the text
model; their `vision_model.*` and `multi_modal_projector.*` tensors are ignored, unless `multimodal=True`
loads the whole `Llama4ForConditionalGeneration`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from llama4_jax.config import Llama4Config
from llama4_jax.convert import safetensors_io as st
from llama4_jax.convert.hf import MULTIMODAL_PREFIX, TEXT_PREFIX, Entry, entries, entries_by_param, transpose_2d
from llama4_jax.counting import abstract_model
from llama4_jax.model import Llama4ForCausalLM
from llama4_jax.model.multimodal import Llama4ForConditionalGeneration
from llama4_jax.multimodal_config import Llama4MultimodalConfig
from llama4_jax.sharding import TRAIN_RULES, Rules, state_shardings

IGNORED_PREFIXES = ("vision_model.", "multi_modal_projector.")  # vision tower of multimodal checkpoints


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """A checked Hugging Face checkpoint: its config, name prefix, where each tensor lies, and the dtype
    its weights are stored in."""

    directory: Path
    config: Llama4Config | Llama4MultimodalConfig
    prefix: str
    tensors: dict[str, st.TensorInfo]
    dtype: np.dtype


def open_hf(path: str | Path, *, multimodal: bool = False) -> HFCheckpoint:
    """Checks a Hugging Face Llama 4 directory (config.json plus single or index-sharded safetensors).

    Raises one ValueError listing every problem: unreadable or unsupported config fields, missing or
    truncated or non-safetensors files, missing and unexpected tensor names, wrong shapes, non-float dtypes.
    Pickle checkpoints (.bin, .pt) are refused, never opened. With `multimodal`, the checkpoint must be a
    `llama4` one and its vision tensors are checked too.
    """
    path = Path(path)
    if path.suffix in st.PICKLE_SUFFIXES:
        raise ValueError(f"{path}: a pickle checkpoint; llama4_jax never loads pickle files (unpickling can run "
                         "arbitrary code). Convert it to safetensors first")
    if not path.is_dir():
        raise ValueError(f"{path}: expected a Hugging Face checkpoint directory (config.json + *.safetensors)")
    problems: list[str] = []
    config = _read_config(path, problems, multimodal)
    tensors, file_problems = st.open_directory(path)
    problems += file_problems
    prefix = MULTIMODAL_PREFIX if any(k.startswith(MULTIMODAL_PREFIX) for k in tensors) else TEXT_PREFIX
    if config is not None and tensors:
        problems += _check_tensors(config, prefix, tensors)
    if problems:
        lines = "\n  - ".join(problems)
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise ValueError(f"cannot load the Hugging Face checkpoint at {path} ({count}):\n  - {lines}")
    return HFCheckpoint(path, config, prefix, tensors, _stored_dtype(tensors, prefix))


def _read_config(path: Path, problems: list[str], multimodal: bool = False):
    file = path / "config.json"
    try:
        return (Llama4MultimodalConfig if multimodal else Llama4Config).from_hf(json.loads(file.read_text()))
    except FileNotFoundError:
        problems.append(f"{file}: missing")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{file}: not valid JSON ({e})")
    except (ValueError, TypeError) as e:  # fields we cannot honour (Llama4Config.from_hf names them)
        problems.append(f"{file}: {e}")
    return None


def _check_tensors(config: Llama4Config, prefix: str, tensors: dict[str, st.TensorInfo]) -> list[str]:
    params = dict(nnx.to_flat_state(nnx.state(abstract_model(config), nnx.Param)))  # shapes only
    expected = {e.hf_name: e for e in entries(config, prefix)}
    problems = [f"missing tensor {name}" for name in expected if name not in tensors]
    for name, info in tensors.items():
        entry = expected.get(name)
        if entry is None:
            text_only = not isinstance(config, Llama4MultimodalConfig)
            ignored = (text_only and name.startswith(IGNORED_PREFIXES)) or (
                config.tie_word_embeddings and name == f"{prefix}lm_head.weight")  # tied: HF ignores it too
            if not ignored:
                problems.append(f"unexpected tensor {name} (in {info.file.name})")
            continue
        shape = params[entry.path].shape[entry.block is not None:]
        hf_shape = entry.transform.hf_shape(shape)
        if info.shape != hf_shape:
            problems.append(f"{name}: expected shape {list(hf_shape)} (from config.json), found {list(info.shape)} "
                            f"in {info.file.name}")
        if info.dtype not in st.FLOAT_DTYPES:
            problems.append(f"{name}: expected a float dtype ({'/'.join(st.FLOAT_DTYPES)}), found {info.dtype} in "
                            f"{info.file.name}")
    return problems


def _stored_dtype(tensors: dict[str, st.TensorInfo], prefix: str) -> np.dtype:
    """The dtype the weights are stored in (the embedding's), rather than config.json's `dtype`, which
    is only what transformers casts to: keeping the stored dtype makes round trips bit for bit."""
    return st.DTYPES[tensors[f"{prefix}model.embed_tokens.weight"].dtype]


# --------------------------------------------------------------------------------------------------
# Reading one parameter, or the shard of it one device needs


def read_param(checkpoint: HFCheckpoint, group: Sequence[Entry], shape: tuple[int, ...], dtype,
               index: tuple[slice, ...] | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Our-layout value of one parameter of `shape`, or the part that `index` (slices, as
    `jax.make_array_from_callback` passes them) selects, cast to `dtype`, written into `out` if given (a
    C-contiguous array of the part's shape and dtype). `group` holds its HF tensors (one per block when
    stacked). Each HF tensor is read at most once, and only the rows the part needs."""
    bounds = [s.indices(n)[:2] for s, n in zip(index or (slice(None),) * len(shape), shape)]
    if out is None:
        out = np.empty([stop - start for start, stop in bounds], dtype)
    assert out.shape == tuple(b - a for a, b in bounds) and out.dtype == dtype and out.flags.c_contiguous, bounds
    if group[0].block is None:
        _fill(out, checkpoint.tensors[group[0].hf_name], group[0], shape, bounds)
        return out
    (first, last), inner = bounds[0], bounds[1:]
    for entry in group[first:last]:
        assert entry.block is not None and first <= entry.block < last, (entry, first, last)
        _fill(out[entry.block - first], checkpoint.tensors[entry.hf_name], entry, shape[1:], inner)
    return out


def _fill(out: np.ndarray, info: st.TensorInfo, entry: Entry, shape: tuple[int, ...],
          bounds: list[tuple[int, int]]) -> None:
    """Writes into `out` the part `bounds` of one HF tensor in our layout `shape`."""
    kind = entry.transform.kind
    inner = tuple(slice(*b) for b in bounds)
    if kind != "linear" and len(info.shape) >= 2:  # identity / split_last: HF and our leading dims coincide
        if all(b == (0, n) for b, n in zip(bounds[1:], shape[1:])) and st.DTYPES[info.dtype] == out.dtype:
            # Whole leading-dim rows in the same bytes: read straight into place, no copy.
            st.read_tensor(info, slice(*bounds[0]), out=out.reshape(-1, *info.shape[1:]))
            return
        rows = st.read_tensor(info, slice(*bounds[0]))  # only the leading-dim rows this part covers
        out[...] = rows.reshape(rows.shape[0], *shape[1:])[(slice(None), *inner[1:])]
    elif kind == "linear" and len(shape) - entry.transform.in_dims == 1:
        _fill_linear(out, info, shape, bounds)
    else:  # small tensors (attention projections, biases, norms): read whole, then select
        out[...] = entry.transform.to_ours(st.read_tensor(info), shape)[inner]


def _fill_linear(out: np.ndarray, info: st.TensorInfo, shape: tuple[int, ...], bounds: list[tuple[int, int]],
                 block_bytes: int = 32 * 2**20) -> None:
    """nn.Linear weight (out, in) whose HF rows are our last dim, e.g. lm_head (V, D) -> ours (D, V): read
    the output rows this part needs in blocks of ~32 MiB and transpose each into place, so the host holds
    the part plus one block, not a second copy of the tensor."""
    (first, last), inner = bounds[-1], tuple(slice(*b) for b in bounds[:-1])
    fan_in = math.prod(shape[:-1])
    step = max(1, block_bytes // (fan_in * st.DTYPES[info.dtype].itemsize))
    direct = all(b == (0, n) for b, n in zip(bounds[:-1], shape[:-1])) and st.DTYPES[info.dtype] == out.dtype
    flat = out.reshape(-1, last - first) if direct else None
    buffer = np.empty((min(step, last - first), fan_in), st.DTYPES[info.dtype])  # reused: no page faults
    for start in range(first, last, step):
        stop = min(start + step, last)
        rows = st.read_tensor(info, slice(start, stop), out=buffer[:stop - start])  # (stop - start, fan_in)
        if direct:
            transpose_2d(rows, out=flat[:, start - first:stop - first])
        else:
            out[..., start - first:stop - first] = rows.T.reshape(*shape[:-1], stop - start)[inner]


# --------------------------------------------------------------------------------------------------
# load_hf


def load_hf(path: str | Path, *, mesh: Mesh | None = None, dtype=None, rules: Rules = TRAIN_RULES,
            model_kwargs: dict | None = None, multimodal: bool = False) -> Llama4ForCausalLM:
    """Loads a Hugging Face Llama 4 checkpoint (text or multimodal layout) into `Llama4ForCausalLM`.

    Args:
      path: directory with config.json and model.safetensors or model-*.safetensors plus the index.
      mesh: place every parameter directly into its sharding on this mesh (from the logical-axis `rules`);
        None puts the model on the first device.
      dtype: parameter dtype; None keeps the checkpoint's (so bf16 stays bf16 and round trips bit for bit).
      model_kwargs: more `Llama4ForCausalLM` arguments (scan_layers, moe_impl, dtype, gmm_backend).
      multimodal: load a `llama4` checkpoint whole, as `Llama4ForConditionalGeneration` (vision tower and
        projector included); by default only its text model is loaded.

    Raises ValueError listing every problem with the checkpoint before any tensor is read.
    """
    checkpoint = open_hf(path, multimodal=multimodal)
    dtype = np.dtype(dtype) if dtype is not None else checkpoint.dtype
    model_class = Llama4ForConditionalGeneration if multimodal else Llama4ForCausalLM
    abstract = nnx.eval_shape(lambda: model_class(checkpoint.config, rngs=nnx.Rngs(0), param_dtype=dtype,
                                                  **(model_kwargs or {})))
    graphdef, state = nnx.split(abstract)
    groups = entries_by_param(checkpoint.config, checkpoint.prefix)
    flat = list(nnx.to_flat_state(state))
    assert {p for p, _ in flat} == set(groups), "convert.hf table and model parameters disagree"
    if mesh is None:
        shardings = {p: SingleDeviceSharding(jax.devices()[0]) for p, _ in flat}
    else:
        shardings = {p: v.get_value() for p, v in nnx.to_flat_state(state_shardings(state, mesh, rules))}
    loaded = []
    for p, variable in flat:
        callback = functools.partial(read_param, checkpoint, groups[p], variable.shape, variable.dtype)
        array = jax.make_array_from_callback(variable.shape, shardings[p], callback, dtype=variable.dtype)
        loaded.append((p, variable.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))

