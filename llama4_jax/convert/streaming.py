"""Checkpoint to checkpoint, one parameter at a time: Hugging Face directory <-> Orbax checkpoint.

Neither direction builds the model: each of our parameters is assembled on the host from its HF tensors
and added to the Orbax checkpoint (or read from it and split into HF tensors), then dropped, so the memory
a conversion needs is about one parameter, whatever the model size. For a stacked parameter that is
num_blocks HF tensors (e.g. one expert tensor per scanned block).
"""

from __future__ import annotations

import os
import time

import numpy as np
from flax import nnx
from tqdm import tqdm

from llama4_jax import checkpoint
from llama4_jax.convert.files import ConversionStats, release_freed_memory
from llama4_jax.convert.hf import entries_by_param
from llama4_jax.convert.load import open_hf, read_param
from llama4_jax.convert.save import BATCH_BYTES, batches, write_hf
from llama4_jax.counting import abstract_model


def hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, overwrite: bool = False,
                progress: bool = False) -> ConversionStats:
    """Hugging Face directory -> Orbax checkpoint that `llama4_jax.checkpoint.restore_model` reads.
    dtype: parameter dtype (None keeps the checkpoint's). Problems with `src` raise one ValueError."""
    start = time.perf_counter()
    source = open_hf(src)
    dtype = np.dtype(dtype) if dtype is not None else source.dtype
    groups = entries_by_param(source.config, source.prefix)
    params = list(nnx.to_flat_state(nnx.state(abstract_model(source.config, dtype), nnx.Param)))
    total = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for _, v in params)
    stats = ConversionStats()
    with checkpoint.ParamWriter(dst, source.config, overwrite=overwrite) as writer, \
            tqdm(total=total, unit="B", unit_scale=True, desc="import", disable=not progress) as bar:
        shapes = {path: (tuple(v.shape), v.dtype) for path, v in params}
        for batch in batches(shapes, BATCH_BYTES):
            values = {path: read_param(source, groups[path], *shapes[path]) for path in batch}
            writer.add(values)
            nbytes = sum(v.nbytes for v in values.values())
            stats.tensors += sum(len(groups[path]) for path in batch)
            stats.bytes += nbytes
            bar.update(nbytes)
            del values
            release_freed_memory()
        writer.finish()
    stats.seconds = time.perf_counter() - start
    return stats


def orbax_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, max_shard_size: int | str = "5GB",
                tokenizer=None, overwrite: bool = False, progress: bool = False) -> ConversionStats:
    """Orbax checkpoint (ours) -> Hugging Face directory; see `llama4_jax.save_hf` for the arguments."""
    reader = checkpoint.ParamReader(src)
    return write_hf(reader.config, reader.shapes, reader.read, dst, dtype=dtype, max_shard_size=max_shard_size,
                    tokenizer=tokenizer, overwrite=overwrite, progress=progress)


def convert(src: str | os.PathLike, dst: str | os.PathLike, **kwargs) -> ConversionStats:
    """Converts in the direction `src` implies: an Orbax checkpoint becomes a Hugging Face directory, and a
    Hugging Face directory (config.json + safetensors) becomes an Orbax checkpoint."""
    if checkpoint.is_checkpoint(src):
        return orbax_to_hf(src, dst, **kwargs)
    if os.path.isfile(os.path.join(src, "config.json")):
        kwargs.pop("max_shard_size", None)
        if kwargs.pop("tokenizer", None) is not None:
            raise ValueError("--tokenizer applies to exports to Hugging Face only")
        return hf_to_orbax(src, dst, **kwargs)
    raise ValueError(f"{src}: neither an Orbax checkpoint nor a Hugging Face directory with config.json")
