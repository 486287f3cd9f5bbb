"""Grain pipelines: documents -> tokens -> packed rows -> this process's share of each global batch.

    documents (random access)            open_documents: one split of config.source
      [process_index::process_count]     each process reads a disjoint shard of documents
      .shuffle(seed).repeat(epochs)      global, deterministic shuffle, a new order every epoch
      .map(tokenize)                     [bos] + tokens + [eos] per document
      ConcatThenSplit(seq_len + 1)       grain's packing: segment ids from 1, positions restart per piece
      .batch(B_local) -> fields          inputs/targets shifted by one, weights 0 across documents and on padding

A document longer than the space left in a row continues in the next row as a new segment whose positions
restart at 0 (grain's concat-then-split), so no token is dropped except the one target per row boundary.
The iterator is a grain DatasetIterator: `get_state()` / `set_state()` give exact resumption, and
`iterator_checkpoint_args` saves it with Orbax beside the model.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from llama4_jax.data.config import SPLITS, DataConfig
from llama4_jax.data.sources import check_tokens_metadata, open_documents
from llama4_jax.data.tokenizer import Tokenizer, check_vocab

BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")


class Tokenize(grain.transforms.Map):
    """Document (text, or int32 ids already framed by prepare_data) -> {"tokens": int32 [bos, ..., eos]}."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def map(self, document: str | np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(document, np.ndarray):
            return {"tokens": document.astype(np.int32)}
        ids = self.tokenizer.encode(document)
        return {"tokens": np.asarray([self.tokenizer.bos_id, *ids, self.tokenizer.eos_id], np.int32)}


class PackedRowsToBatch(grain.transforms.Map):
    """Batched packed rows (b <= rows, T + 1) -> the model's batch fields, each (rows, T).

    Rows missing from a final short batch are all padding (segment 0, weight 0), so every batch has the shape
    the compiled step expects.
    """

    def __init__(self, rows: int, pad_id: int):
        self.rows = rows
        self.pad_id = pad_id

    def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens, segments = packed["tokens"], packed["tokens_segment_ids"]
        positions = packed["tokens_positions"]
        missing = self.rows - tokens.shape[0]
        if missing:
            tokens, segments, positions = (np.pad(a, ((0, missing), (0, 0))) for a in (tokens, segments, positions))
        tokens = np.where(segments == 0, self.pad_id, tokens).astype(np.int32)
        # Target t is token t + 1: trained only when both belong to the same piece of one document, so the
        # last token of a document never predicts the next document's bos, and padding never counts.
        same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "weights": same.astype(np.float32),
            "positions": positions[:, :-1].astype(np.int32),
            "segment_ids": segments[:, :-1].astype(np.int32),
        }


class _JsonSafeState(grain.IterDataset):
    """Passes elements through; restores the tuples JSON turned into lists in grain's packing state.

    ConcatThenSplit marks "whole element" slices with the tuple (-1, -1) and compares with `!=`, so the list
    [-1, -1] read back from grain's JSON checkpoint would be taken for a real slice (grain 0.2.18).
    """

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonSafeStateIterator(self._parent.__iter__())


class _JsonSafeStateIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        slices = state.get("remainder_slices", {})
        self._parent.set_state({**state, "remainder_slices": {k: tuple(v) for k, v in slices.items()}})


def make_dataset(config: DataConfig, *, split: str, seq_len: int, batch_size: int, process_index: int,
                 process_count: int, tokenizer: Tokenizer, vocab_size: int | None = None,
                 num_epochs: int | None = None) -> grain.IterDataset:
    """This process's batches of `split` ("train" or "eval"): dicts of BATCH_KEYS arrays (batch_size //
    process_count, seq_len). num_epochs=None repeats forever (use a fixed number of eval steps, which keeps
    every process in step); a finite count ends with one padded short batch. The eval split is never shuffled.
    With vocab_size, the tokenizer is checked against the model's vocabulary first.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("process_count", process_count)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if batch_size % process_count:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({process_count})")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
        raise ValueError(f"num_epochs must be a positive int or None, got {num_epochs!r}")
    if vocab_size is not None:
        check_vocab(tokenizer, vocab_size)
    documents = open_documents(config, split)
    check_tokens_metadata(documents, tokenizer)
    ds = grain.MapDataset.source(documents)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"data.source {config.source!r}: the {split} split has {len(documents)} documents, fewer "
                         f"than the {process_count} processes; process {process_index} would read nothing")
    if config.shuffle and split == "train":
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(num_epochs).map(Tokenize(tokenizer))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=64))
    if config.num_workers:
        # Reading and tokenizing run in the workers; packing stays here. The order depends on num_workers, so
        # resume with the same value.
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    it = _JsonSafeState(ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len + 1}))
    rows = batch_size // process_count
    return it.batch(rows, drop_remainder=False).map(PackedRowsToBatch(rows, tokenizer.pad_id))


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which raise unless parsed; programs that are not absl apps
    (ours) never parse them, so take the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(config: DataConfig, *, split: str, seq_len: int, batch_size: int, process_index: int,
                  process_count: int, tokenizer: Tokenizer, vocab_size: int | None = None,
                  num_epochs: int | None = None) -> grain.DatasetIterator:
    """Iterator over `make_dataset(...)` with get_state()/set_state(); same arguments."""
    return iter(make_dataset(config, split=split, seq_len=seq_len, batch_size=batch_size,
                             process_index=process_index, process_count=process_count, tokenizer=tokenizer,
                             vocab_size=vocab_size, num_epochs=num_epochs))


def iterator_checkpoint_args(iterator: grain.DatasetIterator, *, restore: bool = False) -> Any:
    """Orbax args that save (or restore into) a grain iterator: grain's own handler, which writes one JSON state
    file per process (`process_{i}-of-{n}.json`), so every host saves and restores its own position.

        manager.save(step, args=ocp.args.Composite(model=..., data=iterator_checkpoint_args(it)))
        manager.restore(step, args=ocp.args.Composite(model=..., data=iterator_checkpoint_args(it, restore=True)))
    """
    import grain.checkpoint  # registers the handler with Orbax

    return grain.checkpoint.CheckpointRestore(iterator) if restore else grain.checkpoint.CheckpointSave(iterator)
