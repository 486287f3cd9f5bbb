"""Orbax checkpoints of a model's parameters, restored sharded from birth; the config rides in the metadata.

Layout (Orbax v1 API): a pytree {"params": <the nnx.Param state as a nested dict, as nnx.to_pure_dict gives>}
and custom metadata {"llama4_config": Llama4Config.to_hf()}. Each parameter is one zarr3 array stored in
chunks (one file each) of at most `CHUNK_BYTES` that never span two blocks of a stacked parameter, so a
converter can read or write one block of one parameter at a time with tensorstore, through a chunk-sized
window (`ParamReader.read_block`, `ParamWriter.write_part`), while Orbax keeps the metadata and
`restore_model` reads whole parameters straight into their shardings.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp_v0
import orbax.checkpoint.experimental.v1 as ocp
import tensorstore as ts
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from llama4_jax.config import Llama4Config
from llama4_jax.convert.files import EarlySync, atomic_directory
from llama4_jax.model import Llama4ForCausalLM
from llama4_jax.model.multimodal import Llama4ForConditionalGeneration
from llama4_jax.multimodal_config import Llama4MultimodalConfig
from llama4_jax.sharding import TRAIN_RULES, Rules, state_shardings

PARAMS_KEY = "params"
CONFIG_KEY = "llama4_config"
# Bytes per stored chunk (one file each). Blocks are read and written chunk by chunk, and tensorstore stages
# each chunk in a buffer of its own, so moving a block costs a few chunks of transient memory rather than a
# second copy of the block. At 8 MiB those buffers (about 50 MiB kept by malloc per block written, against
# ~100 MiB at 16 MiB) still come from malloc's heap and get reused instead of fresh page-faulted mmaps, and a
# checkpoint has ~120 files per GB.
CHUNK_BYTES = 8 * 2**20
# Chunk reads or writes kept going at once beyond the one waited for: tensorstore then copies one chunk while
# the kernel moves another in or out of the page cache, on two cores (~30% faster writes than one at a time).
# Each costs a chunk of memory until done.
CHUNKS_IN_FLIGHT = 2
_ITEM = "state"  # the directory ocp.save / ocp.partial.save keep the pytree in (their default checkpointable)


def _context() -> ocp.Context:
    ctx = ocp.Context()
    # Weights barely compress, and zstd would cap a save at a few hundred MB/s per core.
    ctx.array.saving.use_compression = False
    # One zarr array per parameter rather than OCDBT's shared data files: ~2.5x faster to write here, and its
    # chunks stay plain files that `ParamWriter.write_part` fills in place (both layouts restore the same way).
    ctx.array.saving.use_ocdbt = False
    # Orbax copies host arrays before an async write in case the caller mutates them; we never do, and the
    # copy would double a conversion's peak memory.
    ctx.memory.deepcopy_host_arrays = False
    # Bounded chunks: reading one costs a transient buffer of its size (see `_read_block`).
    ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    ctx.array.saving.scoped_storage_options_creator = _storage_options
    return ctx


def _storage_options(keypath, value) -> ocp.options.ArrayOptions.Saving.StorageOptions | None:
    """Stacked parameters (under model.blocks, block axis first) get chunks of one block each: Orbax would
    otherwise split the largest dimensions first and leave the few blocks together in every chunk."""
    del value
    if any(getattr(key, "key", None) == "blocks" for key in keypath):
        return ocp.options.ArrayOptions.Saving.StorageOptions(shard_axes=(0,))
    return None


@dataclasses.dataclass(frozen=True)
class FirstChunk:
    """A parameter that `ParamWriter.add` receives in parts: `value` is its leading chunk (the corner of shape
    `chunk_shape(...)`), `shape` the whole. `stacked`: the other parts are its blocks along axis 0."""

    value: np.ndarray
    shape: tuple[int, ...]
    stacked: bool


def chunk_shape(shape: tuple[int, ...], itemsize: int, *, stacked: bool) -> tuple[int, ...]:
    """The chunks `ParamWriter` stores a parameter written in parts in: C-contiguous slabs of at most
    CHUNK_BYTES within one block, i.e. a run of leading rows (after the block axis), or of rows of a row,
    and so on. Contiguous, so a chunk is written from, and read into, one run of the block's memory."""
    chunk = [1] * stacked + list(shape[stacked:])
    for axis in range(int(stacked), len(shape)):
        row = math.prod(shape[axis + 1:]) * itemsize  # bytes of one index along `axis`
        if row * shape[axis] <= CHUNK_BYTES:
            break
        chunk[axis] = max(1, CHUNK_BYTES // row)
        if row <= CHUNK_BYTES:
            break
    return tuple(chunk)


class ParamWriter:
    """Writes a new Orbax checkpoint a few parameters at a time; `finish` commits it.

    `add` saves parameters whole, through Orbax. A parameter may instead be added as its `FirstChunk` and
    receive the rest from `write_part`, a block of a stacked parameter (or the whole of another), or a run of
    its rows, at a time, so that no more than that is in memory: Orbax creates the array, its metadata and
    chunk shape from the first chunk; once every parameter is added, the array is grown to its full shape
    and the parts are written into it with tensorstore, chunk by chunk.

    Use as a context manager. The checkpoint is built beside `directory` and renamed into place only by
    `finish` (see `atomic_directory`); leaving the context without `finish` deletes it.
    """

    def __init__(self, directory: str | os.PathLike, config: Llama4Config, *, overwrite: bool = False):
        self._staging = atomic_directory(directory, overwrite=overwrite, inner="checkpoint")
        self._path: Path | None = None
        self._metadata: dict | None = {CONFIG_KEY: config.to_hf()}
        self._parts: dict[tuple, tuple[tuple[int, ...], bool]] = {}  # (shape, stacked) of each FirstChunk
        self._arrays: dict[tuple, ts.TensorStore] | None = None  # open once Orbax is done
        self._rows_left: dict[tuple[tuple, int | None], int] = {}  # per (path, block): rows still to write
        self._written: set[tuple[tuple, int | None, int]] = set()  # (path, block, first row) of each write
        self._early_sync = EarlySync()  # of each array written in parts, once complete

    def __enter__(self) -> ParamWriter:
        self._path = self._staging.__enter__() / "checkpoint"
        return self

    def add(self, params: dict[tuple, Any]) -> None:
        """Adds parameters by path, e.g. {("model", "norm", "weight"): array}: numpy or jax.Arrays, saved
        whole, or `FirstChunk`s, whose other parts `write_part` writes."""
        if self._arrays is not None:
            raise RuntimeError("ParamWriter.add after write_part")
        tree: dict = {}
        for path, value in params.items():
            if isinstance(value, FirstChunk):
                assert value.value.shape == chunk_shape(value.shape, value.value.dtype.itemsize,
                                                        stacked=value.stacked), (path, value.value.shape)
                self._parts[path] = (value.shape, value.stacked)
                value = value.value
            _nest_into(tree, path, value)
        with _context():
            ocp.partial.save(self._path, {PARAMS_KEY: tree}, custom_metadata=self._metadata)
        self._metadata = None  # merged into the checkpoint by the first save

    def write_part(self, path: tuple, index: int | None, value: np.ndarray, start: int = 0) -> None:
        """Writes block `index` (`value` without the block axis) of a stacked parameter added as a
        `FirstChunk`, or all of an unstacked one for None; or, from row `start` (a multiple of the chunk's
        extent there) on, the rows along that part's first axis that `value` holds. After the last `add`."""
        if self._arrays is None:
            self._grow()
        key = (path, index)
        if key not in self._rows_left or (*key, start) in self._written:
            raise ValueError(f"{'.'.join(map(str, path))}: part {index} was not expected, or written already")
        _write_part(self._arrays[path], index, value, start)
        self._written.add((*key, start))
        self._rows_left[key] -= value.shape[0]
        if not self._rows_left[key]:
            del self._rows_left[key]
            if not any(p == path for p, _ in self._rows_left):
                self._early_sync.submit(self._path / _ITEM / _name(path))

    def _grow(self) -> None:
        """Ends Orbax's part (a complete checkpoint whose parts-written arrays hold their first chunk), then
        grows those arrays to their shapes: the metadata records them, the data comes from `write_part`."""
        with _context():
            ocp.partial.finalize(self._path)
        # No fsync per chunk (tensorstore's default): that would serialize the writes on the disk's latency,
        # and every file is synced before the checkpoint is renamed into place anyway.
        context = ts.Context({"file_io_sync": False})
        self._arrays = {}
        for path, (shape, stacked) in self._parts.items():
            array = _open_array(self._path, path, context, write=True)
            self._arrays[path] = array.resize(exclusive_max=shape, expand_only=True, resize_metadata_only=True).result()
            rows = shape[1] if stacked else shape[0]
            self._rows_left.update({(path, b): rows for b in range(shape[0])} if stacked else {(path, None): rows})

    def finish(self) -> None:
        if self._arrays is None:
            self._grow()
        if self._rows_left:
            missing = sorted(f"{'.'.join(map(str, p))}[{'all' if b is None else b}]" for p, b in self._rows_left)
            raise ValueError(f"ParamWriter.finish: parts never (fully) written: {', '.join(missing)}")
        self._early_sync.wait()
        self._staging.__exit__(None, None, None)
        self._path = None

    def __exit__(self, kind, error, traceback) -> None:
        if self._path is not None:  # finish was not reached: discard
            self._early_sync.wait(check=False)
            self._staging.__exit__(kind or RuntimeError, error or RuntimeError("ParamWriter not finished"), traceback)


def save_model(model: Llama4ForCausalLM, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Saves the model's parameters (sharded jax.Arrays are written shard by shard) and its config."""
    with ParamWriter(directory, model.config, overwrite=overwrite) as writer:
        writer.add({p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))})
        writer.finish()


def config_from_metadata(hf: dict) -> Llama4Config | Llama4MultimodalConfig:
    """The stored config: a text model's (`llama4_text`) or a multimodal model's (`llama4`, with its vision
    tower), as the model that wrote it was."""
    if hf.get("model_type") == "llama4":
        return Llama4MultimodalConfig.from_hf(hf)
    return Llama4Config.from_hf(hf)


class ParamReader:
    """Reads parameters of a checkpoint, or single blocks of stacked ones, into host numpy arrays.

    `config` is the stored model config; `shapes` maps every parameter path to its (shape, dtype).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = directory = Path(directory).absolute()  # Orbax refuses relative paths
        metadata = ocp.metadata(directory)
        custom = metadata.custom_metadata or {}
        if CONFIG_KEY not in custom:
            raise ValueError(f"{directory}: not a llama4_jax checkpoint (no '{CONFIG_KEY}' in its metadata)")
        self.config = config_from_metadata(custom[CONFIG_KEY])
        self.shapes = {_path(keys): (tuple(m.shape), np.dtype(m.dtype))
                       for keys, m in _leaves(metadata.metadata[PARAMS_KEY])}
        # Orbax's tensorstore context: OCDBT specs refer to resources it defines.
        self._context = ocp_v0.type_handlers.get_ts_context(
            use_ocdbt=ocp_v0.type_handlers.is_ocdbt_checkpoint(directory / _ITEM))
        self._arrays: dict[tuple, ts.TensorStore] = {}

    def read_block(self, path: tuple, index: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Block `index` of the stacked parameter at `path` (shape without the block axis), or the whole
        parameter for None, into `out` if given. Read one stored chunk at a time, so the host holds the
        result plus one chunk. (Chunks that span blocks, as with Orbax's default of one chunk per array,
        are read correctly too, but decoded whole for each block.)"""
        if path not in self._arrays:
            self._arrays[path] = _open_array(self.directory, path, self._context)
        return _read_block(self._arrays[path], index, out)

    def block_shape(self, path: tuple, index: int | None = None) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of what `read_block(path, index)` returns."""
        shape, dtype = self.shapes[path]
        return shape[index is not None:], dtype


def restore_model(directory: str | os.PathLike, *, mesh: Mesh | None = None, rules: Rules = TRAIN_RULES,
                  dtype=None, model_kwargs: dict | None = None) -> Llama4ForCausalLM:
    """Restores a model saved by `save_model` (or converted), each parameter read straight into its sharding
    on `mesh` (None: the first device), in the dtype it was stored in or cast to `dtype` as it is read. A
    multimodal checkpoint restores as `Llama4ForConditionalGeneration`."""
    reader = ParamReader(directory)
    config, stored = reader.config, reader.shapes
    model_class = Llama4ForConditionalGeneration if isinstance(config, Llama4MultimodalConfig) else Llama4ForCausalLM
    abstract = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0), **(model_kwargs or {})))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    problems = [f"missing parameter {'.'.join(map(str, p))}" for p, _ in flat if p not in stored]
    problems += [f"unexpected parameter {'.'.join(map(str, p))}" for p in stored.keys() - {p for p, _ in flat}]
    problems += [f"{'.'.join(map(str, p))}: expected shape {list(v.shape)}, found {list(stored[p][0])}"
                 for p, v in flat if p in stored and tuple(v.shape) != stored[p][0]]
    if problems:
        raise ValueError(f"{directory}: checkpoint does not match its config:\n  - " + "\n  - ".join(problems))
    if mesh is None:
        shardings = {p: SingleDeviceSharding(jax.devices()[0]) for p, _ in flat}
    else:
        shardings = {p: v.get_value() for p, v in nnx.to_flat_state(state_shardings(state, mesh, rules))}
    target: dict = {}
    for p, v in flat:
        stored_dtype = stored[p][1] if dtype is None else np.dtype(dtype)
        _nest_into(target, p, jax.ShapeDtypeStruct(v.shape, stored_dtype, sharding=shardings[p]))
    with _context():
        restored = ocp.load(reader.directory, {PARAMS_KEY: target})[PARAMS_KEY]
    return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(_lookup(restored, p))) for p, v in flat]))


def _nest_into(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _leaves(tree, keys: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*keys, key))
    else:
        yield keys, tree


def _path(keys: tuple) -> tuple:
    """Orbax metadata keys are strings; our layer slots are ints."""
    return tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in keys)


def _lookup(tree, path: tuple):
    for key in path:
        tree = tree[key] if key in tree else tree[str(key)]
    return tree


def _open_array(directory: Path, path: tuple, context: ts.Context, *, write: bool = False) -> ts.TensorStore:
    """The tensorstore array in which Orbax keeps parameter `path`, opened with Orbax's own read spec (so
    OCDBT checkpoints, and zarr v2 ones from older Orbax, open too). For `write`, chunks equal to the fill
    value (all zeros) are stored too: Orbax's reader refuses a missing chunk, and zero blocks are common
    (zero-initialised biases)."""
    item = directory / _ITEM
    ocdbt = ocp_v0.type_handlers.is_ocdbt_checkpoint(item)

    def spec(zarr3: bool) -> dict:
        info = ocp_v0.type_handlers.ParamInfo(name=_name(path), parent_dir=item, is_ocdbt_checkpoint=ocdbt,
                                              use_zarr3=zarr3, ts_context=context)
        tspec = ocp_v0.type_handlers.get_json_tspec_read(info, use_ocdbt=ocdbt)
        return {**tspec, "store_data_equal_to_fill_value": True} if write else tspec

    try:
        return ts.open(spec(zarr3=True), open=True, context=context).result()
    except ValueError:  # no zarr3 array there: zarr v2, as older Orbax wrote
        return ts.open(spec(zarr3=False), open=True, context=context).result()


def _name(path: tuple) -> str:
    """Orbax's name for the array of a parameter (and, without OCDBT, its directory): the keys joined by dots."""
    return ".".join(map(str, (PARAMS_KEY, *path)))


def _chunks(shape: tuple[int, ...], chunk: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """The regions, in C order, into which chunks of shape `chunk` (grid origin 0) cut an array of `shape`."""
    return itertools.product(*[[slice(i, min(i + c, n)) for i in range(0, n, c)] for n, c in zip(shape, chunk)])


def _read_block(array: ts.TensorStore, index: int | None, out: np.ndarray | None) -> np.ndarray:
    """array[index] (or all of it) as a numpy array (`out` if given), copied in chunk by chunk: tensorstore
    decodes a chunk into a buffer of its own before copying it out, so one read of a whole block would
    hold the block twice."""
    part = array if index is None else array[index]
    if out is None:
        out = np.empty(part.shape, part.dtype.numpy_dtype)
    assert out.shape == part.shape and out.dtype == part.dtype.numpy_dtype, (out.shape, out.dtype, part)
    dest = ts.array(out, copy=False, write=True)
    regions = _chunks(out.shape, array.chunk_layout.read_chunk.shape[index is not None:])
    _run_in_flight(dest[region].write(part[region]) for region in regions)
    return out


def _write_part(array: ts.TensorStore, index: int | None, value: np.ndarray, start: int) -> None:
    """array[index][start:start + len(value)] = value (`array` itself for index None), chunk by chunk, so that
    tensorstore stages one chunk at a time rather than the whole part. The chunk at the array's origin is
    left out: Orbax wrote it (see `ParamWriter.add`)."""
    part = array if index is None else array[index]
    chunk = array.chunk_layout.write_chunk.shape[index is not None:]
    assert (index is None or array.chunk_layout.write_chunk.shape[0] == 1) and start % chunk[0] == 0, (chunk, start)
    assert value.shape[1:] == part.shape[1:] and start + value.shape[0] <= part.shape[0], (value.shape, part.shape)
    assert value.dtype == part.dtype.numpy_dtype, (value.dtype, part.dtype)
    writes = []
    for region in _chunks(value.shape, chunk):
        target = (slice(region[0].start + start, region[0].stop + start), *region[1:])
        if not (index in (0, None) and all(r.start == 0 for r in target)):
            writes.append((target, region))
    _run_in_flight(part[target].write(value[region], can_reference_source_data_indefinitely=True)
                   for target, region in writes)


def _run_in_flight(operations: Iterator[ts.Future]) -> None:
    """Starts tensorstore operations one after another, waiting on the oldest once CHUNKS_IN_FLIGHT more
    are running (an iterator: each starts only when drawn)."""
    pending: collections.deque = collections.deque()
    try:
        for future in operations:
            pending.append(future)
            if len(pending) > CHUNKS_IN_FLIGHT:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    finally:
        for future in pending:  # after an error: let the others end before their buffers are reused
            future.exception()


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds an Orbax checkpoint. (`ocp.is_orbax_checkpoint` also says yes to a
    safetensors directory, which Orbax can read, so look for the file every Orbax save writes.)"""
    return (Path(directory) / "_CHECKPOINT_METADATA").is_file()
