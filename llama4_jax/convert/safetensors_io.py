"""safetensors files without surprises: checked headers, partial reads, and a streaming writer.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of
JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the raw
little-endian tensor data; offsets are relative to the end of the header and tile the data exactly.

We parse headers ourselves (instead of `safe_open`) so that every problem of every file can be collected
into one report before any tensor is read, and read tensors with positioned reads (no mmap) so that the
memory a conversion uses is only the buffers it asks for, which keeps its peak RSS measurable and bounded.
Nothing here ever unpickles: `.bin`/`.pt` checkpoints are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's limit

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # the dtypes we accept for weights (cast to the model's dtype)
_CODES = {dtype: code for code, dtype in DTYPES.items()}

if sys.byteorder != "little":  # raw bytes are written and read as they lie in memory
    raise ImportError("llama4_jax.convert.safetensors_io needs a little-endian host")


def dtype_code(dtype) -> str:
    """safetensors dtype code ("BF16", "F32", ...) of a numpy / jax dtype."""
    return _CODES[np.dtype(dtype)]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, safetensors dtype code, shape, absolute byte offset and length."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses and checks one file's header. Raises ValueError naming the file and what is wrong with it
    (too short, not a safetensors file, truncated, inconsistent offsets)."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: {size} bytes is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"{file}: header length {n} exceeds the file ({size} bytes): truncated, or not a "
                             "safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: header is not a JSON object: not a safetensors file")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {name: _tensor_info(file, name, entry, 8 + n) for name, entry in header.items()}
    _check_tiling(file, tensors, 8 + n, size - 8 - n)
    return tensors, metadata


def _tensor_info(file: Path, name: str, entry, data_start: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        ok = all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end)) and begin <= end
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{file}: malformed header entry for {name!r}: {entry!r}")
    if dtype not in DTYPES:
        raise ValueError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise ValueError(f"{file}: tensor {name!r} ({dtype} {list(shape)}) needs {expected} bytes but its "
                         f"data_offsets span {end - begin}")
    return TensorInfo(name, file, dtype, shape, data_start + begin, end - begin)


def _check_tiling(file: Path, tensors: dict[str, TensorInfo], data_start: int, data_bytes: int) -> None:
    """The tensors must cover the data section exactly, without gaps or overlaps (as the format demands)."""
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        if info.offset != position:
            raise ValueError(f"{file}: tensor {info.name!r} starts at a gap or overlap in the data section")
        position += info.nbytes
    needed = position - data_start
    if needed > data_bytes:
        raise ValueError(f"{file}: truncated: the header describes {needed} bytes of tensor data but the file "
                         f"holds {data_bytes}")
    if needed < data_bytes:
        raise ValueError(f"{file}: {data_bytes - needed} unexpected trailing bytes after the tensor data")


def open_directory(directory: Path) -> tuple[dict[str, TensorInfo], list[str]]:
    """Every tensor of a single-file or index-sharded safetensors checkpoint, and a list of problems (each
    naming its file) instead of an exception, so that callers can report them together."""
    directory = Path(directory)
    problems: list[str] = []
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            return {}, [f"{index}: not a valid index (expected JSON with a 'weight_map' object)"]
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            found = f"; found {', '.join(pickles)}, which are pickle files" if pickles else ""
            return {}, [f"{directory}: no .safetensors files{found}. llama4_jax never loads pickle checkpoints "
                        "(unpickling can run arbitrary code); convert them to safetensors first"]
    tensors: dict[str, TensorInfo] = {}
    readable = set()
    for name in files:
        file = directory / name
        if not name.endswith(".safetensors"):
            problems.append(f"{file}: not a .safetensors file (pickle checkpoints are never loaded)")
            continue
        if not file.is_file():
            problems.append(f"{file}: missing (listed in {INDEX_FILE})")
            continue
        try:
            found, _ = read_header(file)
        except (ValueError, OSError) as e:
            problems.append(str(e) if isinstance(e, ValueError) else f"{file}: cannot be read ({e})")
            continue
        readable.add(name)
        for key, info in found.items():
            if key in tensors:
                problems.append(f"{file}: tensor {key!r} also appears in {tensors[key].file.name}")
            elif weight_map is None or weight_map.get(key) == name:
                tensors[key] = info
    for key, name in (weight_map or {}).items():
        if key not in tensors and name in readable:
            problems.append(f"{directory / name}: has no tensor {key!r}, which {INDEX_FILE} maps to it")
    return tensors, problems


def read_tensor(info: TensorInfo, rows: slice = slice(None), out: np.ndarray | None = None) -> np.ndarray:
    """Rows `rows` (a step-1 slice of the leading dim) of a tensor, read with positioned reads into `out`
    (C-contiguous, shape (rows, *shape[1:])) or a new array. Only those bytes are read."""
    shape = info.shape
    dtype = DTYPES[info.dtype]
    if shape:
        start, stop, step = rows.indices(shape[0])
        assert step == 1, rows
        shape = (stop - start, *shape[1:])
        offset = info.offset + start * math.prod(shape[1:]) * dtype.itemsize
    else:
        offset = info.offset
    if out is None:
        out = np.empty(shape, dtype)
    assert out.shape == shape and out.dtype == dtype and out.flags.c_contiguous, (out.shape, shape, out.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(info.file, "rb", buffering=0) as f:
        while view.nbytes:
            n = os.preadv(f.fileno(), [view], offset)
            if n == 0:
                raise ValueError(f"{info.file}: unexpected end of file while reading {info.name!r}")
            view, offset = view[n:], offset + n
    return out


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, in any order, holding no more than the tensor given.

    The safetensors package only serializes a whole dict of tensors at once (`save_file`), which would hold
    a shard in memory, so this writes the format itself: the header is known up front from the planned
    names, dtypes and shapes, and each tensor's bytes go to their precomputed offset.
    """

    def __init__(self, file: Path, plan: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata}
        self._slots: dict[str, tuple[str, tuple[int, ...], int]] = {}
        position = 0
        for name, code, shape in plan:
            nbytes = math.prod(shape) * DTYPES[code].itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [position, position + nbytes]}
            self._slots[name] = (code, tuple(shape), position)
            position += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
        self._data_start = 8 + len(raw)
        self.file = Path(file)
        self._fd: int | None = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pending = {name: math.prod(shape) for name, (_, shape, _) in self._slots.items()}  # elements left
        self._write_at(memoryview(struct.pack("<Q", len(raw)) + raw), 0)
        os.ftruncate(self._fd, self._data_start + position)

    def write(self, name: str, array: np.ndarray, row: int = 0) -> None:
        """Writes tensor `name`, or, from leading-dim row `row` on, the rows `array` holds (a transposing
        writer may give a large tensor in slabs). Every element must be written exactly once."""
        code, shape, position = self._slots[name]
        fits = array.shape == shape and row == 0 or (
            len(shape) == array.ndim > 0 and array.shape[1:] == shape[1:] and 0 <= row <= shape[0] - array.shape[0])
        if not fits or dtype_code(array.dtype) != code:
            raise ValueError(f"{self.file}: tensor {name!r} planned as {code} {list(shape)}, got "
                             f"{array.dtype} {list(array.shape)} at row {row}")
        left = self._pending.get(name)
        if left is None or array.size > left:
            raise ValueError(f"{self.file}: tensor {name!r} written twice")
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        row_bytes = math.prod(shape[1:]) * DTYPES[code].itemsize
        self._write_at(memoryview(data), self._data_start + position + row * row_bytes)
        if left > array.size:
            self._pending[name] = left - array.size
        else:
            del self._pending[name]

    @property
    def complete(self) -> bool:
        """Whether every planned tensor has been written."""
        return not self._pending

    def _write_at(self, view: memoryview, offset: int) -> None:
        while view.nbytes:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self) -> None:
        """Checks that every planned tensor was written, then closes the file (idempotent). It does not sync:
        `atomic_directory` syncs every file before the rename that publishes them."""
        if self._pending:
            raise ValueError(f"{self.file}: tensors never (fully) written: {sorted(self._pending)}")
        self.abort()

    def abort(self) -> None:
        """Closes the file without checks (idempotent); the caller deletes it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(([KMGT])(I?)B?|B?)\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (10^9, as Hugging Face counts) or "2GiB" (2^30)."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(size)
    if not match:
        raise ValueError(f"cannot read a size from {size!r}; use e.g. 5GB, 500MB or 2GiB")
    number, prefix, binary = float(match.group(1)), (match.group(3) or "").upper(), match.group(4)
    power = " KMGT".index(prefix) if prefix else 0
    return int(number * (1024 if binary else 1000) ** power)
