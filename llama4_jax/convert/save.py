"""llama4_jax -> Hugging Face checkpoint, one tensor at a time, into a directory that appears only when complete.

Output: model-0000i-of-0000N.safetensors (metadata {"format": "pt"}), model.safetensors.index.json,
config.json (`Llama4ForCausalLM`, model_type `llama4_text`), generation_config.json, and tokenizer files
when given. Shards follow Hugging Face's order and split rule; tensors are fetched one at a time (one block of
a stacked parameter), ahead of the writes by one tensor, and written at their planned offsets.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from llama4_jax.config import Llama4Config
from llama4_jax.convert import safetensors_io as st
from llama4_jax.convert.files import ConversionStats, EarlySync, atomic_directory, release_freed_memory, write_json
from llama4_jax.convert.hf import TEXT_PREFIX, Entry, entries, transpose_2d
from llama4_jax.convert.pipeline import Slot, prefetch
from llama4_jax.multimodal_config import Llama4MultimodalConfig

LLAMA4_VOCAB_SIZE = 202048
# Special tokens of the Llama 4 tokenizer (<|begin_of_text|>, <|end_of_text|>, <|eom|>, <|eot|>,
# <|finetune_right_pad|>), as in the published Scout and Maverick configs.
LLAMA4_SPECIAL_TOKENS = {"bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
_TORCH_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}

# The part of one of our parameters that an HF tensor holds, in our layout: block `entry.block` of a stacked
# parameter, the whole parameter otherwise; placed in the given slot (`slot.array(shape, dtype)`) if it can.
TensorSource = Callable[[Entry, Slot], np.ndarray]
# nn.Linear weights are transposed into the file in slabs of HF rows of about this size.
SLAB_BYTES = 32 * 2**20


def save_hf(model, path: str | Path, *, dtype=None, max_shard_size: int | str = "5GB", tokenizer=None,
            overwrite: bool = False, progress: bool = False) -> ConversionStats:
    """Saves a `Llama4ForCausalLM` (or a `Llama4ForConditionalGeneration`, as that) as a Hugging Face
    checkpoint that `transformers` loads directly.

    Args:
      path: output directory; written as `.{name}.tmp-*` beside it and renamed into place when complete.
      dtype: dtype of the saved tensors (e.g. jnp.bfloat16); None keeps each parameter's dtype.
      max_shard_size: bytes per safetensors file (int, or "5GB"/"2GiB"); a larger tensor gets a file alone.
      tokenizer: a directory to copy tokenizer files from, or an object with `save_pretrained`.
      overwrite: replace an existing non-empty `path` (only once the new directory is complete).

    Gathers one tensor (one block of one stacked parameter) at a time to the host, so a sharded model is
    never gathered whole.
    """
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    shapes = {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in params.items()}

    def source(entry: Entry, slot: Slot) -> np.ndarray:
        del slot  # device_get makes its own host array
        value = params[entry.path].get_value()
        # One block of one parameter to the host. Multi-host: gather with
        # jax.experimental.multihost_utils.process_allgather and write from one process instead.
        return np.asarray(jax.device_get(value if entry.block is None else value[entry.block]))

    return write_hf(model.config, shapes, source, path, dtype=dtype, max_shard_size=max_shard_size,
                    tokenizer=tokenizer, overwrite=overwrite, progress=progress)


def write_hf(config: Llama4Config, shapes: dict[tuple, tuple[tuple[int, ...], np.dtype]], source: TensorSource,
             path: str | Path, *, dtype=None, max_shard_size: int | str = "5GB", tokenizer=None,
             overwrite: bool = False, progress: bool = False) -> ConversionStats:
    """`save_hf` for any source of tensors: `shapes` maps each of our parameter paths to (shape, dtype), and
    `source(entry)` returns the part of a parameter that one HF tensor holds (see `TensorSource`).

    Tensors are written in Hugging Face's order while a background thread fetches the next one, so the
    host holds about two HF tensors at a time; files are synced once, before the directory is published.
    """
    start = time.perf_counter()
    plan = _plan(config, shapes, dtype)
    shards = _split(plan, st.parse_size(max_shard_size))
    stats = ConversionStats()
    total = sum(nbytes for *_, nbytes in plan)
    with atomic_directory(path, overwrite=overwrite) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not progress) as bar:
        writers, weight_map = {}, {}
        try:
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                writer = st.SafetensorsWriter(tmp / name, [(e.hf_name, c, s) for e, c, s, _ in shard],
                                              {"format": "pt"})
                writers.update({e.hf_name: writer for e, *_ in shard})
                weight_map.update({e.hf_name: name for e, *_ in shard})
            for nbytes in _write_tensors(plan, shapes, source, writers):
                stats.tensors, stats.bytes = stats.tensors + 1, stats.bytes + nbytes
                bar.update(nbytes)
        finally:
            for writer in dict.fromkeys(writers.values()):
                writer.abort()  # no-op for closed writers; the temporary directory is then removed
        num_params = sum(int(np.prod(s)) for _, _, s, _ in plan)
        write_json(tmp / st.INDEX_FILE, {"metadata": {"total_size": total, "total_parameters": num_params},
                                         "weight_map": weight_map})
        hf_config = hf_config_json(config, _TORCH_DTYPE_NAMES[plan[0][1]])
        write_json(tmp / "config.json", hf_config)
        write_json(tmp / "generation_config.json", {k: hf_config[k] for k in LLAMA4_SPECIAL_TOKENS})
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
    stats.seconds = time.perf_counter() - start
    return stats


def _write_tensors(plan: list, shapes: dict, source: TensorSource,
                   writers: dict[str, st.SafetensorsWriter]) -> Iterator[int]:
    """Writes every tensor of `plan` as a background thread fetches the next one, closing each file once
    complete and syncing it in the background meanwhile; yields the bytes of each tensor written."""
    # A slot holds the largest tensor in its stored dtype or its exported one, whichever is wider.
    slot_bytes = max(math.prod(s) * max(st.DTYPES[c].itemsize, np.dtype(shapes[e.path][1]).itemsize)
                     for e, c, s, _ in plan)
    scratch = np.empty(SLAB_BYTES, np.uint8)  # reused by every transpose

    def fetch(item: tuple, slot: Slot) -> np.ndarray:  # in the background thread
        return source(item[0], slot).astype(st.DTYPES[item[1]], copy=False)

    early_sync = EarlySync()
    try:
        for (entry, _, hf_shape, nbytes), value in prefetch(plan, fetch, slot_bytes=slot_bytes):
            writer = writers[entry.hf_name]
            _write_tensor(writer, entry, value, hf_shape, scratch)
            del value
            if writer.complete:
                writer.close()
                early_sync.submit(writer.file)
            release_freed_memory()
            yield nbytes
        for writer in dict.fromkeys(writers.values()):
            writer.close()  # raises if a planned tensor was never written
        early_sync.wait()
    finally:
        early_sync.wait(check=False)  # no-op after a wait


def _write_tensor(writer: st.SafetensorsWriter, entry: Entry, value: np.ndarray, hf_shape: tuple[int, ...],
                  scratch: np.ndarray) -> None:
    """Writes one tensor given in our layout. An nn.Linear weight is transposed slab by slab of HF rows
    (in `scratch`, a uint8 buffer) straight into the file, so the host never holds a transposed copy (256
    MiB more for a lm_head)."""
    if entry.transform.kind != "linear":
        writer.write(entry.hf_name, entry.transform.to_hf(value, hf_shape))  # a reshape: no copy
        return
    fan_in = math.prod(value.shape[:entry.transform.in_dims])
    ours = value.reshape(fan_in, -1)  # (in, out): HF's rows are our columns
    if fan_in * value.dtype.itemsize > scratch.size:  # not even one HF row fits
        scratch = np.empty(fan_in * value.dtype.itemsize, np.uint8)
    step = scratch.size // (fan_in * value.dtype.itemsize)
    for row in range(0, ours.shape[1], step):
        rows = min(step, ours.shape[1] - row)
        slab = scratch[:rows * fan_in * value.dtype.itemsize].view(value.dtype).reshape(rows, fan_in)
        writer.write(entry.hf_name, transpose_2d(ours[:, row:row + rows], out=slab), row=row)


def hf_config_json(config: Llama4Config | Llama4MultimodalConfig, dtype_name: str) -> dict[str, Any]:
    """config.json for `Llama4ForCausalLM` (or `Llama4ForConditionalGeneration`, model_type `llama4`). RoPE is
    written both as `rope_parameters` (transformers >= 5) and as legacy `rope_theta`/`rope_scaling`
    (config.to_hf does both), and the dtype as `dtype` and `torch_dtype`, so old and new transformers read
    the same model."""
    out = config.to_hf()
    multimodal = isinstance(config, Llama4MultimodalConfig)
    text = out["text_config"] if multimodal else out
    out["architectures"] = ["Llama4ForConditionalGeneration" if multimodal else "Llama4ForCausalLM"]
    out["dtype"] = out["torch_dtype"] = dtype_name
    if text["vocab_size"] == LLAMA4_VOCAB_SIZE:
        text.update(LLAMA4_SPECIAL_TOKENS)
    if multimodal:  # generation_config.json reads the special tokens from the top level
        out.update({k: text[k] for k in LLAMA4_SPECIAL_TOKENS})
    return out


def _plan(config: Llama4Config, shapes, dtype) -> list[tuple[Entry, str, tuple[int, ...], int]]:
    """(entry, safetensors dtype code, HF shape, bytes) for every HF tensor, in HF's order."""
    plan = []
    for entry in entries(config, TEXT_PREFIX):
        shape, param_dtype = shapes[entry.path]
        hf_shape = entry.transform.hf_shape(shape[entry.block is not None:])
        code = st.dtype_code(dtype if dtype is not None else param_dtype)
        plan.append((entry, code, hf_shape, int(np.prod(hf_shape)) * st.DTYPES[code].itemsize))
    return plan


def _split(plan: list, max_bytes: int) -> list[list]:
    """Hugging Face's rule: fill files in order, starting a new one when the next tensor would overflow."""
    shards, size = [[]], 0
    for item in plan:
        if shards[-1] and size + item[3] > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[3]
    return shards


def _save_tokenizer(tokenizer, directory: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
        return
    source = Path(tokenizer)
    found = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not found:
        raise ValueError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for file in found:
        shutil.copy2(file, directory / file.name)
