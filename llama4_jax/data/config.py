"""Data configuration: where documents come from, how they are tokenized, shuffled and held out.

`source` forms:
  "embedded"               the Python standard library's docs and sources (always present, nothing downloaded)
  "tfds:NAME[:SPLIT]"      a prepared TFDS dataset read through `tfds.data_source` (ArrayRecord, random access);
                           NAME may carry a version ("c4/en:3.1.0"), SPLIT defaults to "train"
  PATH                     a .jsonl/.txt/.parquet/.array_record file, or a directory of files of one kind

Only the form is checked here (configs are built on machines that may not hold the data); paths are checked
when the data is opened, before training starts.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

EMBEDDED = "embedded"
TFDS_PREFIX = "tfds:"
FILE_KINDS = (".jsonl", ".txt", ".parquet", ".array_record")
SPLITS = ("train", "eval")
_TFDS = re.compile(r"^(?P<name>[^:\[\]]+(?::\d+(?:\.\d+){0,2})?)(?::(?P<split>[^:].*))?$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where training text comes from and how it becomes token rows."""

    source: str = EMBEDDED
    text_field: str = "text"  # jsonl / parquet / tfds field holding the text
    tokenizer: str = "bpe:embedded"  # "bpe:embedded", "llama4" (Meta's llama-models) or a tokenizer.json path
    bpe_vocab_size: int = 512
    shuffle: bool = True
    seed: int = 0
    eval_fraction: float = 0.05  # documents held out for evaluation (sources without their own eval split)
    num_workers: int = 0  # grain worker processes for reading and tokenizing (0 = in-process)
    read_threads: int = 4  # threads reading and tokenizing documents in each process
    data_dir: str | None = None  # TFDS data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)
    # Image+text records (experiments with `vision`; see data/image_text.py). Paths are relative to the jsonl.
    image_field: str = "image"  # jsonl field holding an image path (or a list of them)
    max_image_tiles: int = 16  # tiles per image before its global tile (Llama4ImageProcessor's max_patches)
    image_tiles_per_example: int = 17  # fixed tile slots per batch row (one 16-tile image + its global tile)

    def __post_init__(self):
        source_kind(self.source)  # raises on an unknown kind
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"data.text_field must be a non-empty string, got {self.text_field!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(f"data.tokenizer must be 'bpe:embedded', 'llama4' or a tokenizer.json path, "
                             f"got {self.tokenizer!r}")
        # Byte-level BPE starts from 256 byte tokens plus 3 special tokens.
        if not isinstance(self.bpe_vocab_size, int) or self.bpe_vocab_size < 260:
            raise ValueError(f"data.bpe_vocab_size must be an int >= 260 (256 bytes + 3 special tokens + merges), "
                             f"got {self.bpe_vocab_size!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"data.seed must be an int in [0, 2**32), got {self.seed!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if not isinstance(self.image_field, str) or not self.image_field:
            raise ValueError(f"data.image_field must be a non-empty string, got {self.image_field!r}")
        for name in ("max_image_tiles", "image_tiles_per_example"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("num_workers", "read_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0 or (name == "read_threads" and value < 1):
                low = 1 if name == "read_threads" else 0
                raise ValueError(f"data.{name} must be an int >= {low}, got {value!r}")

    def replace(self, **changes) -> DataConfig:
        return dataclasses.replace(self, **changes)


def source_kind(source: str) -> str:
    """"embedded", "tfds", or the file kind (".jsonl", ...) / "dir" of a path; ValueError for anything else."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"data.source must be a non-empty string, got {source!r}")
    if source == EMBEDDED:
        return EMBEDDED
    if source.startswith(TFDS_PREFIX):
        parse_tfds(source)
        return "tfds"
    for kind in FILE_KINDS:
        if source.endswith(kind):
            return kind
    suffix = source.rstrip("/").rsplit("/", 1)[-1]
    if "." in suffix and not suffix.startswith(".") and not os.path.isdir(source):
        raise ValueError(f"data.source {source!r}: unknown source kind {'.' + suffix.rsplit('.', 1)[-1]!r}; use "
                         f"'embedded', 'tfds:NAME[:SPLIT]', a {'/'.join(FILE_KINDS)} file or a directory of them")
    return "dir"


def parse_tfds(source: str) -> tuple[str, str | None]:
    """"tfds:NAME[:VERSION][:SPLIT]" -> (name with version, split or None). SPLIT may use TFDS slicing
    ("train[:90%]")."""
    match = _TFDS.match(source[len(TFDS_PREFIX):])
    if match is None:
        raise ValueError(f"data.source {source!r}: expected 'tfds:NAME[:SPLIT]', e.g. 'tfds:lm1b', "
                         f"'tfds:c4/en:3.1.0:train' or 'tfds:lm1b:train[:90%]'")
    return match["name"], match["split"]


def heldout_mask(num_documents: int, eval_fraction: float) -> np.ndarray:
    """(num_documents,) bool: True for documents held out for evaluation.

    A stable hash of the document index (splitmix64), so the split needs no reading, is the same on every host
    and Python version, and about `eval_fraction` of the documents (every 20th at 0.05) land in it.
    """
    x = np.arange(num_documents, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < eval_fraction
