"""Random-access document sources: `len(source)` documents, `source[i]` -> str (text) or int32 array (tokens).

Random access is what lets grain shuffle globally, shard by process and resume from an index. Every source
is picklable (open files are reopened lazily), so grain worker processes can read it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama4_jax.data import config as config_lib
from llama4_jax.data.config import DataConfig, heldout_mask

# Written by tools/prepare_data.py beside its shards; its presence means records hold int32 token ids.
TOKENS_METADATA = "llama4_jax_tokens.json"
TOKENS_FORMAT = "llama4_jax.tokens.v1"


class TextSource:
    """In-memory texts (the embedded corpus)."""

    def __init__(self, texts: Sequence[str]):
        self._texts = list(texts)

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, index: int) -> str:
        return self._texts[index]


class TextFiles:
    """One document per .txt file (use .jsonl for many documents in one file)."""

    def __init__(self, paths: Sequence[Path]):
        self._paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> str:
        return Path(self._paths[index]).read_text(encoding="utf-8", errors="replace")


class JsonlFiles:
    """One document per non-empty line of .jsonl files: the `field` of a JSON object. Line offsets are indexed
    once; reads use os.pread, which is safe from grain's reader threads."""

    def __init__(self, paths: Sequence[Path], field: str):
        self._paths = [str(p) for p in paths]
        self._field = field
        index = [_line_index(p) for p in self._paths]
        self._file = np.concatenate([np.full(len(s), i, np.int32) for i, (s, _, _) in enumerate(index)])
        self._start = np.concatenate([s for s, _, _ in index])
        self._end = np.concatenate([e for _, e, _ in index])
        self._line = np.concatenate([n for _, _, n in index])
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._start)

    def __getitem__(self, index: int) -> str:
        return _text_field(self.record(index), self._field, self.where(index))

    def record(self, index: int) -> Any:
        """The whole JSON value of document `index` (every field, e.g. prompt/answer pairs for pruning)."""
        f = int(self._file[index])
        if f not in self._fds:
            self._fds[f] = os.open(self._paths[f], os.O_RDONLY)
        raw = os.pread(self._fds[f], int(self._end[index] - self._start[index]), int(self._start[index]))
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.where(index)}: not a JSON object ({e})") from e

    def where(self, index: int) -> str:
        """"path:line" of document `index`, for error messages."""
        return f"{self._paths[int(self._file[index])]}:{int(self._line[index]) + 1}"

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}}


def _line_index(path: str, chunk: int = 1 << 26) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, line number) of each non-empty line, scanning the file in 64 MiB chunks."""
    newlines = []
    with open(path, "rb") as f:
        offset = 0
        while block := f.read(chunk):
            newlines.append(np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + offset)
            offset += len(block)
    ends = np.concatenate([*newlines, np.array([offset], np.int64)]).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    keep = ends > starts
    return starts[keep], ends[keep], np.flatnonzero(keep)


class ParquetFiles:
    """One document per row of .parquet files: the `field` column. Row groups are read whole and the last few
    kept, so sequential reads are cheap; for shuffled training over big files, convert to ArrayRecord first
    (tools/prepare_data.py)."""

    def __init__(self, paths: Sequence[Path], field: str):
        pq = _pyarrow_parquet()
        self._paths = [str(p) for p in paths]
        self._field = field
        rows = []  # (file, row group, first row of the group) per group, with cumulative row starts
        starts = [0]
        for i, path in enumerate(self._paths):
            meta = pq.ParquetFile(path).metadata
            names = meta.schema.to_arrow_schema().names
            if field not in names:
                raise ValueError(f"{path}: no column {field!r} (data.text_field); columns: {names}")
            for g in range(meta.num_row_groups):
                rows.append((i, g))
                starts.append(starts[-1] + meta.row_group(g).num_rows)
        self._groups = rows
        self._starts = np.asarray(starts, np.int64)
        self._lock = threading.Lock()
        self._cache: dict[int, list[Any]] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> str:
        g = int(np.searchsorted(self._starts, index, side="right")) - 1
        with self._lock:
            if g not in self._cache:
                if len(self._cache) >= 4:
                    self._cache.pop(next(iter(self._cache)))
                f, group = self._groups[g]
                table = _pyarrow_parquet().ParquetFile(self._paths[f]).read_row_group(group, columns=[self._field])
                self._cache[g] = table.column(0).to_pylist()
            value = self._cache[g][index - int(self._starts[g])]
        return _as_text(value, f"{self._paths[self._groups[g][0]]} row {index - int(self._starts[g])}")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_cache")}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock(), _cache={})


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError("parquet sources need pyarrow: pip install pyarrow") from e
    return pq


class ArrayRecordFiles:
    """One document per ArrayRecord record: int32 token ids when the directory holds TOKENS_METADATA (written by
    tools/prepare_data.py, each record [bos] + tokens + [eos]), UTF-8 text otherwise."""

    def __init__(self, paths: Sequence[Path], metadata: dict[str, Any] | None):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self._paths = [str(p) for p in paths]
        self.metadata = metadata
        self._source = ArrayRecordDataSource(self._paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str | np.ndarray:
        record = self._source[index]
        if self.metadata is not None:
            return np.frombuffer(record, dtype=np.int32)
        try:
            return record.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self._paths}: record {index} is not UTF-8 text. ArrayRecord files written by TFDS "
                             f"hold serialized examples; read those with source='tfds:NAME'") from e


class TfdsSource:
    """A prepared TFDS split read through `tfds.data_source` (ArrayRecord files; no TensorFlow needed)."""

    def __init__(self, name: str, split: str, field: str, data_dir: str | None):
        tfds = _tfds()
        self._where = f"tfds:{name}:{split}"
        self._field = field
        try:
            # download=False: preparing a dataset is a separate, explicit step (never at training time).
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types (DatasetNotFoundError, KeyError, ValueError...)
            raise ValueError(f"data.source {self._where!r} could not be opened (data_dir={data_dir!r}); prepare it "
                             f"with file_format='array_record' first: {type(e).__name__}: {e}") from e

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        return _text_field(self._source[index], self._field, f"{self._where}[{index}]")


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ValueError("tfds sources need tensorflow-datasets: pip install tensorflow-datasets") from e
    return tfds


def tfds_splits(name: str, data_dir: str | None) -> list[str]:
    """Split names of a prepared TFDS dataset."""
    try:
        return list(_tfds().builder(name, data_dir=data_dir).info.splits.keys())
    except Exception as e:
        raise ValueError(f"data.source 'tfds:{name}' is not available (data_dir={data_dir!r}): "
                         f"{type(e).__name__}: {e}") from e


def _text_field(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with a {field!r} field, got {type(record).__name__}")
    if field not in record:
        raise ValueError(f"{where}: no field {field!r} (data.text_field); fields: {sorted(record)}")
    return _as_text(record[field], where)


def _as_text(value: Any, where: str) -> str:
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
        return _as_text(value.item(), where)
    if not isinstance(value, str):
        raise ValueError(f"{where}: the text field holds {type(value).__name__}, not text")
    return value


class Subset:
    """The documents of `source` at `indices`, in that order."""

    def __init__(self, source, indices: np.ndarray):
        self.source = source
        self._indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int):
        return self.source[int(self._indices[index])]

    @property
    def indices(self) -> np.ndarray:
        """Index in `source` of each document."""
        return self._indices


# --------------------------------------------------------------------------------------------------
# DataConfig -> documents


def open_documents(config: DataConfig, split: str):
    """The "train", "eval" or "all" documents of config.source, as a random-access source.

    Sources without their own eval split (all but TFDS datasets that have "validation" or "test") hold out
    documents by `heldout_mask`. Raises ValueError on missing paths and on empty data.
    """
    if split not in (*config_lib.SPLITS, "all"):
        raise ValueError(f"split must be one of {(*config_lib.SPLITS, 'all')}, got {split!r}")
    kind = config_lib.source_kind(config.source)
    if kind == "tfds":
        name, named_split = config_lib.parse_tfds(config.source)
        train = TfdsSource(name, named_split or "train", config.text_field, config.data_dir)
        own_eval = [s for s in ("validation", "test") if s in tfds_splits(name, config.data_dir)]
        if own_eval and split != "all":  # the dataset's own held-out split; its train split is used whole
            source = TfdsSource(name, own_eval[0], config.text_field, config.data_dir) if split == "eval" else train
            return _nonempty(source, config, split)
        source = train
    elif kind == config_lib.EMBEDDED:
        from llama4_jax.data.embedded import embedded_split

        return _nonempty(TextSource(embedded_split(split, config.eval_fraction)), config, split)
    else:
        source = _open_files(config)
    _nonempty(source, config, "all")
    if split == "all":
        return source
    held = heldout_mask(len(source), config.eval_fraction)
    return _nonempty(Subset(source, np.flatnonzero(held == (split == "eval"))), config, split)


def _nonempty(source, config: DataConfig, split: str):
    if len(source) == 0:
        detail = f" (eval_fraction={config.eval_fraction})" if split != "all" else ""
        raise ValueError(f"data.source {config.source!r}: the {split} split has no documents{detail}")
    return source


def _open_files(config: DataConfig):
    path = Path(config.source)
    if not path.exists():
        raise ValueError(f"data.source {config.source!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in config_lib.FILE_KINDS)
        kinds = sorted({p.suffix for p in files})
        if not files:
            raise ValueError(f"data.source {config.source!r}: no {'/'.join(config_lib.FILE_KINDS)} files in it")
        if len(kinds) > 1:
            raise ValueError(f"data.source {config.source!r} mixes file kinds {kinds}; use one kind per directory")
        kind = kinds[0]
    else:
        files, kind = [path], path.suffix
        if kind not in config_lib.FILE_KINDS:
            raise ValueError(f"data.source {config.source!r}: unknown source kind {kind!r}")
    if kind == ".txt":
        return TextFiles(files)
    if kind == ".jsonl":
        return JsonlFiles(files, config.text_field)
    if kind == ".parquet":
        return ParquetFiles(files, config.text_field)
    return ArrayRecordFiles(files, _tokens_metadata(files))


def _tokens_metadata(files: Sequence[Path]) -> dict[str, Any] | None:
    found = {str(p.parent / TOKENS_METADATA) for p in files if (p.parent / TOKENS_METADATA).is_file()}
    if not found:
        return None
    if len(found) > 1 or len({p.parent for p in files}) > 1:
        raise ValueError(f"token shards must share one directory and one {TOKENS_METADATA}; found {sorted(found)}")
    metadata = json.loads(Path(found.pop()).read_text())
    if metadata.get("format") != TOKENS_FORMAT:
        raise ValueError(f"{TOKENS_METADATA}: format {metadata.get('format')!r}, expected {TOKENS_FORMAT!r}")
    return metadata


def check_tokens_metadata(source, tokenizer) -> None:
    """ValueError when pre-tokenized shards were written with a tokenizer other than the one configured."""
    while isinstance(source, Subset):
        source = source.source
    metadata = getattr(source, "metadata", None)
    if metadata is None:
        return
    ours = {"vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    theirs = {k: metadata.get(k) for k in ours}
    if ours != theirs:
        raise ValueError(f"the token shards were written with tokenizer {metadata.get('tokenizer')!r} {theirs}, "
                         f"but data.tokenizer gives {ours}; set data.tokenizer to the one used by prepare_data")
