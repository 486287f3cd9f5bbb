"""The examples data pruning scores: whole documents (or prompt/answer records) of an experiment's data, one
per row, never packed; and their padded batches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # prune.py imports this module
    from llama4_jax.distill.prune import PruneConfig


class Examples:
    """The examples of one split of `data.source`, random access: `rows(i)` frames example i for the models,
    `record(i)` is what the kept dataset holds for it."""

    def __init__(self, data, config: PruneConfig, tokenizer, seq_len: int):
        from llama4_jax.data.sources import ArrayRecordFiles, JsonlFiles, Subset, open_documents

        documents = open_documents(data, config.split)
        self.base, self.indices = (documents.source, documents.indices) if isinstance(documents, Subset) else \
            (documents, None)
        self.text_field, self.config, self.tokenizer, self.seq_len = data.text_field, config, tokenizer, seq_len
        self.count = len(documents) if config.limit is None else min(config.limit, len(documents))
        if config.uses_pairs and not isinstance(self.base, JsonlFiles):
            raise ValueError(f"prompt/answer examples need a .jsonl source, got data.source {data.source!r}")
        if isinstance(self.base, ArrayRecordFiles) and self.base.metadata is not None:
            raise ValueError(f"data.source {data.source!r} holds token ids (prepare_data shards): prune the text "
                             f"source they were made from, so that the kept dataset is text")
        if self.count:  # a misnamed field fails here, before any model is loaded (later records: while scoring)
            self.check(0)

    def source_index(self, i: int) -> int:
        return int(i if self.indices is None else self.indices[i])

    def check(self, i: int) -> None:
        """ValueError naming the record and the field when example i lacks a field it needs."""
        if self.config.uses_pairs:
            self.pair(i)
        else:
            self.base[self.source_index(i)]

    def record(self, i: int) -> Any:
        """The whole jsonl record (every field kept), or {text_field: text} for other sources."""
        j = self.source_index(i)
        return self.base.record(j) if hasattr(self.base, "record") else {self.text_field: self.base[j]}

    def pair(self, i: int) -> tuple[str, str]:
        j = self.source_index(i)
        record, where = self.base.record(j), self.base.where(j)
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with prompt/answer fields, got {type(record).__name__}")
        out = []
        for option in ("prompt_field", "answer_field"):
            name = getattr(self.config, option)
            if name not in record:
                raise ValueError(f"{where}: no field {name!r} ({option}); fields: {sorted(record)}")
            if not isinstance(record[name], str):
                raise ValueError(f"{where}: field {name!r} holds {type(record[name]).__name__}, not text")
            out.append(record[name])
        return out[0], out[1]

    def rows(self, index: range) -> dict[str, list]:
        """{"main": [(tokens, first scored target)], "alone": [...] (pairs only), "truncated": [bool]} for the
        examples at `index`."""
        tok, limit = self.tokenizer, self.seq_len + 1
        if not self.config.uses_pairs:
            framed = [[tok.bos_id, *ids, tok.eos_id] for ids in _encode(tok, [self.base[self.source_index(i)]
                                                                             for i in index])]
            return {"main": [(tokens[:limit], 0) for tokens in framed],
                    "truncated": [len(tokens) > limit for tokens in framed]}
        pairs = [self.pair(i) for i in index]
        prompts, answers = _encode(tok, [p for p, _ in pairs]), _encode(tok, [a for _, a in pairs])
        main, alone, truncated = [], [], []
        for p, a in zip(prompts, answers):
            tokens = [tok.bos_id, *p, *a, tok.eos_id]
            truncated.append(len(tokens) > limit)
            tokens = tokens[:limit]
            answered = max(0, len(tokens) - 1 - len(p))  # answer targets (eos included) left after truncation
            main.append((tokens, len(p)))
            alone.append(([tok.bos_id, *a, tok.eos_id][:answered + 1], 0))  # the same answer tokens, after bos only
        return {"main": main, "alone": alone, "truncated": truncated}


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(t) for t in texts]


def batch_arrays(rows: list[tuple[list[int], int]], batch_size: int, seq_len: int, pad_id: int) -> dict:
    """Rows (tokens, first scored target) -> "inputs", "targets" int32 and "weights" float32, (batch_size,
    seq_len) each; missing rows and the tail of short ones are padding with weight 0."""
    inputs = np.full((batch_size, seq_len), pad_id, np.int32)
    targets = np.full((batch_size, seq_len), pad_id, np.int32)
    weights = np.zeros((batch_size, seq_len), np.float32)
    for r, (tokens, first) in enumerate(rows):
        n = len(tokens) - 1
        inputs[r, :n], targets[r, :n] = tokens[:-1], tokens[1:]
        weights[r, first:n] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}


# --------------------------------------------------------------------------------------------------
# Scoring and selection
