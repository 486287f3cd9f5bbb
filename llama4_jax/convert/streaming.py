"""Checkpoint to checkpoint, at most one HF tensor at a time: Hugging Face directory <-> Orbax checkpoint.

Neither direction builds the model, nor even a whole stacked parameter: the unit moved is one HF tensor,
i.e. one block of a stacked parameter (stored in per-block chunks, see `llama4_jax.checkpoint`) or one
unstacked parameter, and into Orbax large ones go in pieces. A background thread reads the next unit
while the current one is written, so reading overlaps writing and the host holds about two units, whatever
the model size.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
from flax import nnx
from tqdm import tqdm

from llama4_jax import checkpoint
from llama4_jax.convert.files import ConversionStats, release_freed_memory
from llama4_jax.convert.hf import Entry, entries_by_param
from llama4_jax.convert.load import HFCheckpoint, open_hf, read_param
from llama4_jax.convert.pipeline import Slot, prefetch
from llama4_jax.convert.save import write_hf
from llama4_jax.counting import abstract_model

# First chunks travel to Orbax together (one Orbax save has a fixed cost).
BATCH_BYTES = 64 * 2**20
# Parts other than nn.Linear weights are read and written in pieces of about this many bytes.
PIECE_BYTES = 64 * 2**20

Shapes = dict[tuple, tuple[tuple[int, ...], np.dtype]]


def hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, overwrite: bool = False,
                progress: bool = False, multimodal: bool = False) -> ConversionStats:
    """Hugging Face directory -> Orbax checkpoint that `llama4_jax.checkpoint.restore_model` reads.
    dtype: parameter dtype (None keeps the checkpoint's). multimodal: a `llama4` checkpoint whole (vision
    tower and projector too; by default its text model only). Problems with `src` raise one ValueError.

    Orbax first saves the first chunk of every parameter (creating all arrays and the metadata, in a few
    batched saves); then every block of a stacked parameter, and every unstacked parameter, is read and
    written into its array on its own, in pieces of about PIECE_BYTES (nn.Linear weights whole).
    """
    start = time.perf_counter()
    job = _Import(open_hf(src, multimodal=multimodal), dtype)
    stats = ConversionStats()
    with checkpoint.ParamWriter(dst, job.source.config, overwrite=overwrite) as writer, \
            tqdm(total=job.total, unit="B", unit_scale=True, desc="import", disable=not progress) as bar:
        for _, chunks in prefetch(batches(job.chunks, BATCH_BYTES), job.read_chunks, slot_bytes=BATCH_BYTES):
            writer.add(chunks)
            del chunks
            release_freed_memory()
        for (path, block, rows), value in prefetch(job.pieces, job.read_piece, slot_bytes=job.slot_bytes):
            writer.write_part(path, block, value, rows.start)
            stats.tensors += rows.stop == job.part_shape(path)[0]  # the HF tensor's last piece
            stats.bytes += value.nbytes
            bar.update(value.nbytes)
            del value
            release_freed_memory()
        writer.finish()
    stats.seconds = time.perf_counter() - start
    return stats


class _Import:
    """What `hf_to_orbax` moves: our parameters' (shape, dtype) (`shapes`), the first chunk Orbax saves of
    each (`chunks`), then the pieces of the parts (one HF tensor each: every block of a stacked parameter,
    or an unstacked one) written afterwards (`pieces`: (path, block or None, rows along the part's first
    axis)). Parts go in pieces of about PIECE_BYTES of whole chunks, so that two pieces in flight cost far
    less than two HF tensors; except nn.Linear weights, whose rows in our layout are HF columns."""

    def __init__(self, source: HFCheckpoint, dtype):
        self.source = source
        self.groups = entries_by_param(source.config, source.prefix)
        dtype = np.dtype(dtype) if dtype is not None else source.dtype
        state = nnx.state(abstract_model(source.config, dtype), nnx.Param)
        self.shapes: Shapes = {path: (tuple(v.shape), np.dtype(v.dtype)) for path, v in nnx.to_flat_state(state)}
        self.stacked = {p for p, group in self.groups.items() if group[0].block is not None}
        self.chunks: Shapes = {p: (checkpoint.chunk_shape(shape, dt.itemsize, stacked=p in self.stacked), dt)
                               for p, (shape, dt) in self.shapes.items()}
        self.pieces = [(p, b, rows) for p, (shape, _) in self.shapes.items()
                       for b in (range(shape[0]) if p in self.stacked else [None]) for rows in self._rows(p)]
        self.total = sum(_nbytes(*shape) for shape in self.shapes.values())
        self.slot_bytes = max(_nbytes((rows.stop - rows.start, *self.part_shape(p)[1:]), self.shapes[p][1])
                              for p, _, rows in self.pieces)

    def part_shape(self, path: tuple) -> tuple[int, ...]:
        """The shape of one HF tensor's worth of the parameter: a block, or the whole unstacked parameter."""
        return self.shapes[path][0][path in self.stacked:]

    def _rows(self, path: tuple) -> list[slice]:
        shape, itemsize = self.part_shape(path), self.shapes[path][1].itemsize
        if self.groups[path][0].transform.kind == "linear":
            return [slice(0, shape[0])]
        per_chunk = self.chunks[path][0][path in self.stacked]  # the chunks' extent along the first axis
        step = max(1, PIECE_BYTES // (math.prod(shape[1:]) * itemsize * per_chunk)) * per_chunk
        return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]

    def read_chunks(self, batch: list[tuple], slot: Slot) -> dict[tuple, checkpoint.FirstChunk]:
        """The first chunk of each parameter in `batch`, for Orbax to create its array from."""
        out = {}
        for path in batch:
            shape, dtype = self.shapes[path]
            corner = tuple(slice(n) for n in self.chunks[path][0])
            value = read_param(self.source, self.groups[path], shape, dtype, corner, slot.array(*self.chunks[path]))
            out[path] = checkpoint.FirstChunk(value, shape, path in self.stacked)
        return out

    def read_piece(self, piece: tuple[tuple, int | None, slice], slot: Slot) -> np.ndarray:
        """Rows `rows` of one block (without the block axis) of a stacked parameter, or of an unstacked one."""
        path, block, rows = piece
        shape, dtype = self.shapes[path]
        lead = () if block is None else (slice(block, block + 1),)  # keep a block axis of 1 in read_param's out
        index = (*lead, rows, *[slice(None)] * (len(shape) - len(lead) - 1))
        out = slot.array((*[1] * len(lead), rows.stop - rows.start, *shape[len(lead) + 1:]), dtype)
        value = read_param(self.source, self.groups[path], shape, dtype, index, out)
        return value if block is None else value[0]


def _nbytes(shape: tuple[int, ...], dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def batches(shapes: Shapes, limit: int) -> list[list[tuple]]:
    """Parameter paths (in the order of `shapes`) in consecutive batches of at most `limit` bytes; a
    parameter larger than `limit` forms a batch alone."""
    out, size = [[]], 0
    for path, (shape, dtype) in shapes.items():
        nbytes = _nbytes(shape, dtype)
        if out[-1] and size + nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(path)
        size += nbytes
    return out


def orbax_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, max_shard_size: int | str = "5GB",
                tokenizer=None, overwrite: bool = False, progress: bool = False) -> ConversionStats:
    """Orbax checkpoint (ours) -> Hugging Face directory; see `llama4_jax.save_hf` for the arguments. Each
    HF tensor is read on its own from the checkpoint's per-block chunks (`ParamReader.read_block`)."""
    reader = checkpoint.ParamReader(src)

    def source(entry: Entry, slot: Slot) -> np.ndarray:
        return reader.read_block(entry.path, entry.block, slot.array(*reader.block_shape(entry.path, entry.block)))

    return write_hf(reader.config, reader.shapes, source, dst, dtype=dtype, max_shard_size=max_shard_size,
                    tokenizer=tokenizer, overwrite=overwrite, progress=progress)


def convert(src: str | os.PathLike, dst: str | os.PathLike, **kwargs) -> ConversionStats:
    """Converts in the direction `src` implies: an Orbax checkpoint becomes a Hugging Face directory (a
    multimodal one if it holds a multimodal model), and a Hugging Face directory (config.json + safetensors)
    becomes an Orbax checkpoint (with `multimodal=True`, of the whole multimodal model)."""
    if checkpoint.is_checkpoint(src):
        kwargs.pop("multimodal", None)  # the stored config says which model it is
        return orbax_to_hf(src, dst, **kwargs)
    if os.path.isfile(os.path.join(src, "config.json")):
        kwargs.pop("max_shard_size", None)
        if kwargs.pop("tokenizer", None) is not None:
            raise ValueError("--tokenizer applies to exports to Hugging Face only")
        return hf_to_orbax(src, dst, **kwargs)
    raise ValueError(f"{src}: neither an Orbax checkpoint nor a Hugging Face directory with config.json")
