"""Run the teacher once over an experiment's training data and write its sparse targets (tools/cache_teacher.py).

The data iterator is the experiment's own (same source, tokenizer, seed, packing and sequence length), so the
rows a student sees during training are the rows cached here; each is stored under its key (cache.py). The
teacher's logits are computed one sequence chunk at a time, so (B, T, V) float32 logits never exist.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from llama4_jax import distributed, loops
from llama4_jax.distill.cache import CACHE_FORMATS, CacheWriter, sequence_keys, tokenizer_fingerprint, write_metadata
from llama4_jax.distill.teacher import Teacher, load_teacher
from llama4_jax.sharding import TRAIN_RULES, logical_to_spec, make_mesh, use_sharding
from llama4_jax.train.checkpointing import experiment_json
from llama4_jax.train.losses import chunk_size_for


def make_target_fn(teacher: Teacher, fmt: str, k: int, *, chunk: int = 1024):
    """targets(params, batch, key) -> (ids, values), each (B, T, K): the teacher's sparse targets of a batch."""
    from llama4_jax.distill.cache import sparse_targets

    def targets(params, batch, key):
        model = teacher.model(params)
        hidden = model.model(batch["inputs"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
        b, t, d = hidden.shape
        size = chunk_size_for(t, chunk)
        chunks = hidden.reshape(b, t // size, size, d).swapaxes(0, 1)
        keys = jax.random.split(key, t // size)

        def one(_, xs):
            h, chunk_key = xs
            return None, sparse_targets(model.logits(h), fmt, k, chunk_key)

        _, (ids, values) = loops.scan(one, None, (chunks, keys))
        return tuple(x.swapaxes(0, 1).reshape(b, t, x.shape[-1]) for x in (ids, values))

    return targets


def build_cache(experiment, out: str | pathlib.Path, *, fmt: str = "topk", k: int = 64, num_batches: int | None = None,
                seed: int = 0, overwrite: bool = False, progress: bool = True) -> pathlib.Path:
    """Writes the cache for `num_batches` training batches (default: the whole run, train.steps batches).
    Returns the cache directory; it appears only when complete."""
    from tqdm import tqdm

    from llama4_jax.train.loop import _data, _tokenizer

    if fmt not in CACHE_FORMATS:
        raise ValueError(f"cache format must be one of {CACHE_FORMATS}, got {fmt!r}")
    if experiment.distill is None:
        raise ValueError(f"experiment {experiment.name!r} has no distill section: nothing names the teacher")
    if not 1 <= k <= experiment.model.vocab_size:
        raise ValueError(f"k must be in [1, vocab_size={experiment.model.vocab_size}], got {k}")
    train = experiment.train
    num_batches = num_batches or train.steps
    mesh = make_mesh(experiment.mesh)
    teacher = load_teacher(experiment.distill, train, mesh)
    tokenizer = _tokenizer(experiment)
    fingerprint = tokenizer_fingerprint(tokenizer)
    iterator = _data(experiment, "train")
    target_fn = jax.jit(make_target_fn(teacher, fmt, k, chunk=experiment.distill.chunk))
    rng = jax.random.key(seed)
    spec = logical_to_spec(("batch", "length", None), TRAIN_RULES)
    start = time.perf_counter()
    with _cache_directory(out, overwrite=overwrite) as tmp:
        writer = CacheWriter(tmp, process_index=jax.process_index())
        for index in tqdm(range(num_batches), desc="teacher targets", unit="batch", disable=not progress):
            local = next(iterator)
            batch = distributed.global_batch(local, mesh, train.batch_size)
            with use_sharding(mesh):
                ids, values = target_fn(teacher.params, batch, jax.random.fold_in(rng, index))
            # This process's rows only (what it wrote keys for): no host holds the global batch's targets.
            ids, values = multihost_utils.global_array_to_host_local_array((ids, values), mesh, (spec, spec))
            ids, values = np.asarray(ids), np.asarray(values)
            writer.add(sequence_keys(fingerprint, local["inputs"], local["targets"]), ids, values)
        records = writer.close()
        if jax.process_count() > 1:  # every process wrote its own shard; the metadata counts them all
            records = int(np.sum(multihost_utils.process_allgather(np.asarray(records))))
        if jax.process_index() == 0:
            write_metadata(tmp, {
                "format": fmt, "k": k, "seq_len": train.seq_len, "vocab_size": experiment.model.vocab_size,
                "tokenizer": experiment.data.tokenizer, "tokenizer_fingerprint": fingerprint, "records": records,
                "batches": num_batches, "batch_size": train.batch_size, "rows": num_batches * train.batch_size,
                "seed": seed, "teacher": experiment_json(experiment.distill.teacher),
                "teacher_checkpoint": str(experiment.distill.teacher_checkpoint),
                "data": experiment_json(experiment.data), "seconds": time.perf_counter() - start,
                "bytes_per_token": 4 * (2 * k + (fmt == "topk"))})
    return pathlib.Path(out)


@contextlib.contextmanager
def _cache_directory(out, *, overwrite: bool):
    """The temporary directory every process writes its shard into, renamed to `out` once all are done.

    One process: `atomic_directory`. Several: process 0 prepares `.NAME.tmp-multihost` beside `out` (a shared
    filesystem), all processes write, and after a barrier process 0 syncs and renames it."""
    from llama4_jax.convert.files import atomic_directory, check_destination, sync_tree

    if jax.process_count() == 1:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            yield tmp
        return
    out = pathlib.Path(out).absolute()
    tmp = out.parent / f".{out.name}.tmp-multihost"
    if jax.process_index() == 0:
        check_destination(out, overwrite)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    multihost_utils.sync_global_devices("target cache: directory ready")
    yield tmp
    multihost_utils.sync_global_devices("target cache: every shard written")
    if jax.process_index() == 0:
        sync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    multihost_utils.sync_global_devices("target cache: renamed")
