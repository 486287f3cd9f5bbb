"""The teacher-target cache: sparse targets written once, read beside the data by every student.

Layout of a cache directory (written into a temporary directory and renamed into place when complete):
  metadata.json           format, k, seq_len, vocab, tokenizer fingerprint, teacher config, record count
  keys-PPPPP.npy          (N, 16) uint8: the key of every record of process PPPPP's shard, in order
  targets-PPPPP.array_record  one record per sequence: ids int32 (T, K) then values float32 (T, K + 1) for
                          top-k (log p_T of the K ids, then log of the tail mass outside them) or (T, K) counts

A record's key is a hash of the tokenizer's fingerprint and of the sequence's token rows (inputs and
targets): training looks every row up by its key, so a cache made with another tokenizer, dataset, packing or
sequence length cannot be used by mistake: the tokenizer and shape are checked when the cache is opened, and a
row with no record raises naming the row. Values are log p_T (top-k, tau = 1, full-vocabulary normalised) or
counts of N draws from p_T (sampled: unbiased, ~N/4 distinct ids per token).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CACHE_FORMATS = ("topk", "sampled")
# DataConfig fields that decide which token rows the pipeline yields (order and threads do not matter: rows are
# looked up by key).
SEQUENCE_FIELDS = ("source", "text_field", "tokenizer", "bpe_vocab_size", "seed", "eval_fraction", "data_dir",
                   "shuffle")
METADATA = "metadata.json"
KEY_BYTES = 16


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of what the tokenizer does: its full definition when it has one (tokenizer.json),
    otherwise its name, vocabulary size, special ids and the encoding of a probe text."""
    h = hashlib.sha256()
    inner = getattr(tokenizer, "_tokenizer", None)
    if hasattr(inner, "to_str"):
        h.update(inner.to_str().encode())
    probe = "The quick brown fox: 0123456789 ÄÖÜ 日本語 def f(x):\n\treturn x ** 2  # <|eot|>"
    for part in (getattr(tokenizer, "name", type(tokenizer).__name__), tokenizer.vocab_size, tokenizer.bos_id,
                 tokenizer.eos_id, tokenizer.pad_id, tokenizer.encode(probe)):
        h.update(repr(part).encode())
    return h.hexdigest()


def sequence_keys(fingerprint: str, inputs: np.ndarray, targets: np.ndarray) -> list[bytes]:
    """One key per row of (B, T) token arrays: blake2b(fingerprint, inputs row, targets row)."""
    seed = bytes.fromhex(fingerprint)
    out = []
    for x, y in zip(np.asarray(inputs, np.int32), np.asarray(targets, np.int32)):
        h = hashlib.blake2b(seed, digest_size=KEY_BYTES)
        h.update(x.tobytes())
        h.update(y.tobytes())
        out.append(h.digest())
    return out


def sparse_targets(teacher_logits: jax.Array, fmt: str, k: int, key: jax.Array | None = None):
    """(B, c, V) teacher logits -> ids (B, c, K) int32 and values float32.

    "topk": the k most likely ids, their log-probabilities (tau = 1) and, as a last column, the log of the mass
    outside them (a log-sum-exp over the other ids: exact where 1 - sum p_K rounds to 0), values (B, c, K + 1);
    "sampled": k draws from p_T by inverse CDF (O(V + k log V) per token, no (k, V) noise; the float32 CDF
    resolves probabilities down to ~1e-7 of the total), de-duplicated: each distinct id once with its count,
    unused slots id 0 and count 0, values (B, c, K)."""
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    if fmt == "topk":
        values, ids = jax.lax.top_k(log_p, k)
        flat_ids = ids.reshape(-1, k)
        in_k = jax.vmap(lambda i: jnp.zeros(log_p.shape[-1], bool).at[i].set(True))(flat_ids).reshape(log_p.shape)
        log_tail = jax.nn.logsumexp(jnp.where(in_k, -jnp.inf, log_p), axis=-1)  # -inf when k = V
        return ids.astype(jnp.int32), jnp.concatenate([values, log_tail[..., None]], axis=-1)
    cdf = jnp.cumsum(jnp.exp(log_p), axis=-1)
    u = jax.random.uniform(key, (*log_p.shape[:-1], k)) * cdf[..., -1:]
    flat_cdf, flat_u = cdf.reshape(-1, cdf.shape[-1]), u.reshape(-1, k)
    draws = jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right"))(flat_cdf, flat_u).reshape(u.shape)
    draws = jnp.sort(jnp.minimum(draws, log_p.shape[-1] - 1), axis=-1).astype(jnp.int32)
    first = jnp.concatenate([jnp.ones_like(draws[..., :1], bool), draws[..., 1:] != draws[..., :-1]], axis=-1)
    counts = jnp.sum(draws[..., :, None] == draws[..., None, :], axis=-1)
    return jnp.where(first, draws, 0), jnp.where(first, counts, 0).astype(jnp.float32)


def _shard_name(kind: str, process: int) -> str:
    return f"{kind}-{process:05d}" + (".npy" if kind == "keys" else ".array_record")


class CacheWriter:
    """Appends (key, ids, values) records to this process's shard of a cache being written in `directory`."""

    def __init__(self, directory: pathlib.Path, *, process_index: int = 0):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.directory, self.process_index = pathlib.Path(directory), process_index
        self._writer = ArrayRecordWriter(str(self.directory / _shard_name("targets", process_index)), "group_size:1")
        self._keys: list[bytes] = []
        self._seen: set[bytes] = set()

    def add(self, keys: list[bytes], ids: np.ndarray, values: np.ndarray) -> None:
        for key, i, v in zip(keys, np.asarray(ids, np.int32), np.asarray(values, np.float32)):
            if key in self._seen:  # the same sequence twice (a repeated epoch): its targets are the same
                continue
            self._seen.add(key)
            self._keys.append(key)
            self._writer.write(i.tobytes() + v.tobytes())

    def close(self) -> int:
        self._writer.close()
        keys = np.frombuffer(b"".join(self._keys), np.uint8).reshape(len(self._keys), KEY_BYTES)
        np.save(self.directory / _shard_name("keys", self.process_index), keys)
        return len(self._keys)


def write_metadata(directory: pathlib.Path, metadata: dict[str, Any]) -> None:
    (pathlib.Path(directory) / METADATA).write_text(json.dumps(metadata, indent=1, sort_keys=True))


class TargetCache:
    """A cache directory opened for reading: checks it against the run, then serves targets for batch rows."""

    def __init__(self, directory: str | pathlib.Path):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.directory = pathlib.Path(directory)
        meta_path = self.directory / METADATA
        if not meta_path.is_file():
            raise ValueError(f"distill.cache_dir {self.directory} is not a target cache (no {METADATA}); "
                             "write one with tools/cache_teacher.py")
        self.metadata = json.loads(meta_path.read_text())
        self.format, self.k, self.seq_len = self.metadata["format"], self.metadata["k"], self.metadata["seq_len"]
        shards = sorted(self.directory.glob("targets-*.array_record"))
        self._source = ArrayRecordDataSource([str(p) for p in shards])
        self.value_columns = self.k + 1 if self.format == "topk" else self.k
        self._index: dict[bytes, int] = {}
        offset = 0
        for shard in shards:
            keys = np.load(shard.with_name(shard.name.replace("targets", "keys").replace(".array_record", ".npy")))
            for i, key in enumerate(keys):  # a sequence in two processes' shards: the first record serves
                self._index.setdefault(bytes(key), offset + i)
            offset += len(keys)
        if offset != len(self._source):
            raise ValueError(f"{self.directory}: {offset} keys but {len(self._source)} records (corrupt?)")

    def check(self, *, fingerprint: str, seq_len: int, vocab_size: int, data: dict | None = None,
              rows: int | None = None) -> None:
        """Raise before training if the cache was made for another tokenizer, sequence length, vocabulary or
        data configuration, or covers fewer rows than the run will read (`rows`)."""
        problems = []
        if data is not None:
            cached = self.metadata.get("data", {})
            problems += [f"data.{name}: cache {cached.get(name)!r}, this run {data.get(name)!r}"
                         for name in SEQUENCE_FIELDS if cached.get(name) != data.get(name)]
        if rows is not None and self.metadata.get("rows", 0) < rows:
            problems.append(f"coverage: the cache holds {self.metadata.get('rows', 0)} rows, the run reads {rows} "
                            "(train.steps x train.batch_size); write it with --batches >= train.steps")
        if self.metadata["tokenizer_fingerprint"] != fingerprint:
            problems.append(f"tokenizer: the cache was made with tokenizer {self.metadata['tokenizer']!r} "
                            f"(fingerprint {self.metadata['tokenizer_fingerprint'][:12]}), this run's tokenizer "
                            f"has fingerprint {fingerprint[:12]}")
        if self.seq_len != seq_len:
            problems.append(f"seq_len: cache {self.seq_len}, train.seq_len {seq_len}")
        if self.metadata["vocab_size"] != vocab_size:
            problems.append(f"vocab_size: cache {self.metadata['vocab_size']}, model {vocab_size}")
        if problems:
            raise ValueError(f"target cache {self.directory} does not belong to this run:\n  " + "\n  ".join(problems))

    def lookup(self, inputs: np.ndarray, targets: np.ndarray, fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
        """Targets of every row of a (B, T) batch: ids (B, T, K) int32 and values (B, T, K) float32."""
        keys = sequence_keys(fingerprint, inputs, targets)
        missing = [row for row, key in enumerate(keys) if key not in self._index]
        if missing:
            raise ValueError(f"target cache {self.directory} has no targets for batch rows {missing} (of {len(keys)}): "
                             "it was written for another dataset, data seed or packing; rerun tools/cache_teacher.py "
                             "for this experiment")
        records = self._source.__getitems__([self._index[key] for key in keys])
        t, k, columns = self.seq_len, self.k, self.value_columns
        arrays = [np.frombuffer(r, np.uint8) for r in records]
        for key, a in zip(keys, arrays):
            if a.size != 4 * t * (k + columns):
                raise ValueError(f"target cache {self.directory}: record {key.hex()} has {a.size} bytes, expected "
                                 f"{4 * t * (k + columns)} (seq_len {t}, k {k}); the cache is corrupt")
        ids = np.stack([a[: t * k * 4].view(np.int32).reshape(t, k) for a in arrays])
        values = np.stack([a[t * k * 4:].view(np.float32).reshape(t, columns) for a in arrays])
        return ids, values

    def __len__(self) -> int:
        return len(self._index)
