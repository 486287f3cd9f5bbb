"""Orbax checkpoints of a model's parameters, restored sharded from birth; the config rides in the metadata.

Layout (Orbax v1 API): a pytree {"params": <the nnx.Param state as a nested dict, as nnx.to_pure_dict gives>}
and custom metadata {"llama4_config": Llama4Config.to_hf()}. Writing goes through Orbax partial saves, so a
converter can add parameters a few at a time (`ParamWriter`) and hold only those in memory; reading can
restore chosen parameters to the host (`ParamReader`) or the whole model onto a mesh (`restore_model`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from llama4_jax.config import Llama4Config
from llama4_jax.convert.files import atomic_directory
from llama4_jax.model import Llama4ForCausalLM
from llama4_jax.sharding import TRAIN_RULES, Rules, state_shardings

PARAMS_KEY = "params"
CONFIG_KEY = "llama4_config"


def _context() -> ocp.Context:
    ctx = ocp.Context()
    # Weights barely compress, and zstd would cap a save at a few hundred MB/s per core.
    ctx.array.saving.use_compression = False
    # One zarr array per parameter rather than OCDBT's shared data files: ~2.5x faster to write here, and a
    # checkpoint holds only tens of arrays (both layouts restore the same way).
    ctx.array.saving.use_ocdbt = False
    # Orbax copies host arrays before an async write in case the caller mutates them; we never do, and the
    # copy would double a conversion's peak memory.
    ctx.memory.deepcopy_host_arrays = False
    return ctx


class ParamWriter:
    """Writes a new Orbax checkpoint one parameter (or sub-tree) at a time; `finish` commits it.

    Use as a context manager. The checkpoint is built beside `directory` and renamed into place only by
    `finish` (see `atomic_directory`); leaving the context without `finish` deletes it.
    """

    def __init__(self, directory: str | os.PathLike, config: Llama4Config, *, overwrite: bool = False):
        self._staging = atomic_directory(directory, overwrite=overwrite, inner="checkpoint")
        self._path: Path | None = None
        self._metadata: dict | None = {CONFIG_KEY: config.to_hf()}

    def __enter__(self) -> ParamWriter:
        self._path = self._staging.__enter__() / "checkpoint"
        return self

    def add(self, params: dict[tuple, Any]) -> None:
        """Adds parameters (numpy or jax.Array) by path, e.g. {("model", "norm", "weight"): array}."""
        tree: dict = {}
        for path, value in params.items():
            _nest_into(tree, path, value)
        with _context():
            ocp.partial.save(self._path, {PARAMS_KEY: tree}, custom_metadata=self._metadata)
        self._metadata = None  # merged into the checkpoint by the first save

    def finish(self) -> None:
        with _context():
            ocp.partial.finalize(self._path)
        self._staging.__exit__(None, None, None)
        self._path = None

    def __exit__(self, kind, error, traceback) -> None:
        if self._path is not None:  # finish was not reached: discard
            self._staging.__exit__(kind or RuntimeError, error or RuntimeError("ParamWriter not finished"), None)


def save_model(model: Llama4ForCausalLM, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Saves the model's parameters (sharded jax.Arrays are written shard by shard) and its config."""
    with ParamWriter(directory, model.config, overwrite=overwrite) as writer:
        writer.add({p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))})
        writer.finish()


class ParamReader:
    """Reads chosen parameters of a checkpoint into host numpy arrays, leaving the others on disk.

    `config` is the stored model config; `shapes` maps every parameter path to its (shape, dtype).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = directory = Path(directory).absolute()  # Orbax refuses relative paths
        metadata = ocp.metadata(directory)
        custom = metadata.custom_metadata or {}
        if CONFIG_KEY not in custom:
            raise ValueError(f"{directory}: not a llama4_jax checkpoint (no '{CONFIG_KEY}' in its metadata)")
        self.config = Llama4Config.from_hf(custom[CONFIG_KEY])
        self._tree = metadata.metadata
        self.shapes = {_path(keys): (tuple(m.shape), np.dtype(m.dtype)) for keys, m in _leaves(self._tree[PARAMS_KEY])}

    def read(self, paths: list[tuple]) -> dict[tuple, np.ndarray]:
        """The parameters at `paths`, in one Orbax load; nothing else is read."""
        target = jax.tree.map(lambda _: ocp.PLACEHOLDER, self._tree)
        for path in paths:
            node = target[PARAMS_KEY]
            for key in path[:-1]:
                node = node[str(key)]
            shape, dtype = self.shapes[path]
            node[str(path[-1])] = np.empty(shape, dtype)  # an abstract numpy leaf: restore to the host
        with _context():
            restored = ocp.load(self.directory, target)[PARAMS_KEY]
        return {path: _lookup(restored, path) for path in paths}


def restore_model(directory: str | os.PathLike, *, mesh: Mesh | None = None, rules: Rules = TRAIN_RULES,
                  model_kwargs: dict | None = None) -> Llama4ForCausalLM:
    """Restores a model saved by `save_model` (or converted), each parameter read straight into its sharding
    on `mesh` (None: the first device), in the dtype it was stored in."""
    reader = ParamReader(directory)
    config, stored = reader.config, reader.shapes
    abstract = nnx.eval_shape(lambda: Llama4ForCausalLM(config, rngs=nnx.Rngs(0), **(model_kwargs or {})))
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
        _nest_into(target, p, jax.ShapeDtypeStruct(v.shape, stored[p][1], sharding=shardings[p]))
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


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds an Orbax checkpoint. (`ocp.is_orbax_checkpoint` also says yes to a
    safetensors directory, which Orbax can read, so look for the file every Orbax save writes.)"""
    return (Path(directory) / "_CHECKPOINT_METADATA").is_file()
