"""llama4_jax -> Hugging Face checkpoint, one tensor at a time, into a directory that appears only when complete.

Output: model-0000i-of-0000N.safetensors (metadata {"format": "pt"}), model.safetensors.index.json,
config.json (`Llama4ForCausalLM`, model_type `llama4_text`), generation_config.json, and tokenizer files
when given. Shards follow Hugging Face's order and split rule; tensors are produced parameter by parameter
(each stacked parameter is fetched once) and written at their planned offsets.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from llama4_jax.config import Llama4Config
from llama4_jax.convert import safetensors_io as st
from llama4_jax.convert.files import ConversionStats, atomic_directory, release_freed_memory, write_json
from llama4_jax.convert.hf import TEXT_PREFIX, Entry, entries

LLAMA4_VOCAB_SIZE = 202048
# Special tokens of the Llama 4 tokenizer (<|begin_of_text|>, <|end_of_text|>, <|eom|>, <|eot|>,
# <|finetune_right_pad|>), as in the published Scout and Maverick configs.
LLAMA4_SPECIAL_TOKENS = {"bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
_TORCH_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}

# Our parameter paths -> those parameters, each an array-like indexable by block (jax.Array or numpy).
ParamSource = Callable[[list[tuple]], dict[tuple, Any]]
# Small parameters travel together (one Orbax call has a fixed cost); a larger one goes alone.
BATCH_BYTES = 64 * 2**20


def save_hf(model, path: str | Path, *, dtype=None, max_shard_size: int | str = "5GB", tokenizer=None,
            overwrite: bool = False, progress: bool = False) -> ConversionStats:
    """Saves a `Llama4ForCausalLM` as a Hugging Face checkpoint that `transformers` loads directly.

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
    return write_hf(model.config, shapes, lambda paths: {p: params[p].get_value() for p in paths}, path, dtype=dtype,
                    max_shard_size=max_shard_size, tokenizer=tokenizer, overwrite=overwrite, progress=progress)


def write_hf(config: Llama4Config, shapes: dict[tuple, tuple[tuple[int, ...], np.dtype]], source: ParamSource,
             path: str | Path, *, dtype=None, max_shard_size: int | str = "5GB", tokenizer=None,
             overwrite: bool = False, progress: bool = False) -> ConversionStats:
    """`save_hf` for any source of parameters: `shapes` maps each of our parameter paths to (shape, dtype),
    and `source(paths)` returns those parameters. It is called once per parameter, or per batch of small
    ones (see `batches`), and only one batch is held at a time."""
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
            by_param = _by_param(plan)
            for batch in batches(shapes, BATCH_BYTES, order=list(by_param)):
                values = source(batch)
                for entry, code, hf_shape, nbytes in (item for path in batch for item in by_param[path]):
                    writers[entry.hf_name].write(entry.hf_name, _to_hf(values[entry.path], entry, code, hf_shape))
                    stats.tensors, stats.bytes = stats.tensors + 1, stats.bytes + nbytes
                    bar.update(nbytes)
                del values
                release_freed_memory()
            for writer in dict.fromkeys(writers.values()):
                writer.close()
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


def hf_config_json(config: Llama4Config, dtype_name: str) -> dict[str, Any]:
    """config.json for `Llama4ForCausalLM`. RoPE is written both as `rope_parameters` (transformers >= 5)
    and as legacy `rope_theta`/`rope_scaling` (config.to_hf does both), and the dtype as `dtype` and
    `torch_dtype`, so old and new transformers read the same model."""
    out = config.to_hf()
    out["architectures"] = ["Llama4ForCausalLM"]
    out["dtype"] = out["torch_dtype"] = dtype_name
    if config.vocab_size == LLAMA4_VOCAB_SIZE:
        out.update(LLAMA4_SPECIAL_TOKENS)
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


def _by_param(plan: list) -> dict[tuple, list]:
    """The plan grouped by our parameter (its blocks together), so each parameter is fetched once."""
    groups: dict[tuple, list] = {}
    for item in plan:
        groups.setdefault(item[0].path, []).append(item)
    return groups


def batches(shapes: dict[tuple, tuple[tuple[int, ...], Any]], limit: int,
            order: list[tuple] | None = None) -> list[list[tuple]]:
    """Parameter paths (in `order`, default that of `shapes`) in consecutive batches of at most `limit`
    bytes; a parameter larger than `limit` forms a batch alone."""
    out, size = [[]], 0
    for path in order or list(shapes):
        shape, dtype = shapes[path]
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if out[-1] and size + nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(path)
        size += nbytes
    return out


def _to_hf(value, entry: Entry, code: str, hf_shape: tuple[int, ...]) -> np.ndarray:
    part = value if entry.block is None else value[entry.block]
    # One block of one parameter to the host. Multi-host: gather with
    # jax.experimental.multihost_utils.process_allgather and write from one process instead.
    host = np.asarray(jax.device_get(part))
    return entry.transform.to_hf(host, hf_shape).astype(st.DTYPES[code], copy=False)


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
