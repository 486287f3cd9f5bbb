"""Tokenize a source once into ArrayRecord shards, so training reads token ids with random access.

Output directory:
    shard-00000-of-00004.array_record ...   one record per document: int32 [bos] + tokens + [eos]
    llama4_jax_tokens.json                  format, tokenizer, vocab_size, bos/eos/pad ids, counts

Documents keep their source order (shard k holds a contiguous block), so with split="all" the shards hold out
the same documents for evaluation as the original source does.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llama4_jax.data.config import DataConfig
from llama4_jax.data.sources import TOKENS_FORMAT, TOKENS_METADATA, check_tokens_metadata, open_documents
from llama4_jax.data.tokenizer import Tokenizer, encode_batch


def prepare_shards(config: DataConfig, out_dir: str | Path, *, tokenizer: Tokenizer, num_shards: int = 1,
                   split: str = "all", overwrite: bool = False, progress: bool = True,
                   docs_per_batch: int = 256) -> dict[str, Any]:
    """Writes `split` ("all", "train" or "eval") of config.source as token shards in out_dir; returns the
    metadata. The directory appears only when complete (written beside it, then renamed)."""
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{str(out_dir)!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    documents = open_documents(config, split)
    check_tokens_metadata(documents, tokenizer)
    num_shards = min(num_shards, len(documents))
    bounds = np.linspace(0, len(documents), num_shards + 1).astype(np.int64)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not tempfile.mkdtemp, whose 0700 mode would keep the result from other users
    try:
        num_tokens = 0
        with tqdm(total=len(documents), unit="doc", disable=not progress, desc=f"tokenizing {config.source}") as bar:
            for k in range(num_shards):
                path = tmp / f"shard-{k:05d}-of-{num_shards:05d}.array_record"
                num_tokens += _write_shard(path, documents, range(bounds[k], bounds[k + 1]), tokenizer,
                                           docs_per_batch, bar)
        metadata = {
            "format": TOKENS_FORMAT, "source": config.source, "split": split, "tokenizer": config.tokenizer,
            "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id, "num_documents": len(documents), "num_tokens": num_tokens,
            "num_shards": num_shards,
        }
        (tmp / TOKENS_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metadata


def _write_shard(path: Path, documents, indices: range, tokenizer: Tokenizer, docs_per_batch: int, bar) -> int:
    from array_record.python.array_record_module import ArrayRecordWriter

    # group_size:1 keeps every record individually addressable: random access reads one record, not a group.
    writer = ArrayRecordWriter(str(path), "group_size:1")
    num_tokens = 0
    try:
        for start in range(indices.start, indices.stop, docs_per_batch):
            batch = [documents[i] for i in range(start, min(start + docs_per_batch, indices.stop))]
            texts = [d for d in batch if isinstance(d, str)]
            encoded = iter(encode_batch(tokenizer, texts))
            for doc in batch:
                ids = doc if isinstance(doc, np.ndarray) else [tokenizer.bos_id, *next(encoded), tokenizer.eos_id]
                record = np.asarray(ids, np.int32)
                writer.write(record.tobytes())
                num_tokens += len(record)
            bar.update(len(batch))
    finally:
        writer.close()
    return num_tokens
