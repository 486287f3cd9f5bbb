"""Training checkpoints with Orbax's CheckpointManager: async saves, keep-N, restore of the latest onto any
mesh (the target's shardings decide where each shard goes).

A checkpoint holds: params, opt_state (sharded arrays), the data iterator's state (per process), and
metadata (step, the resolved experiment config). Orbax writes each step into a temporary directory and renames it
when complete, so a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    return value


def experiment_json(experiment) -> dict[str, Any]:
    return _to_json(experiment)


class TrainCheckpoints:
    """Orbax CheckpointManager over {params, opt_state, data, meta}."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_iterator, meta: dict, *, force: bool = False) -> bool:
        """Async save. The data iterator's state is written by grain's handler: one file per process, since
        every host reads its own shard."""
        from llama4_jax.data import iterator_checkpoint_args

        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data=iterator_checkpoint_args(data_iterator), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_params, abstract_opt_state, data_iterator=None) -> dict[str, Any]:
        """Restore onto the shardings carried by the abstract targets (ShapeDtypeStruct with .sharding); the
        data iterator, when given, is set to its saved position."""
        from llama4_jax.data import iterator_checkpoint_args

        items = dict(params=ocp.args.StandardRestore(abstract_params),
                     opt_state=ocp.args.StandardRestore(abstract_opt_state), meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = iterator_checkpoint_args(data_iterator, restore=True)
        args = ocp.args.Composite(**items)
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as error:  # Orbax/tensorstore raise many types for corrupt or mismatched files
            raise ValueError(f"checkpoint {self.directory}/{step} cannot be restored for this experiment "
                             f"(corrupt, or written for another model/optimizer); it is left as it is. "
                             f"{type(error).__name__}: {error}") from error
        return {name: restored[name] for name in ("params", "opt_state", "meta")}

    def check_compatible(self, step: int, experiment_meta: dict) -> None:
        """Refuse to resume a checkpoint written for another model: list every differing model field."""
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as error:
            raise ValueError(f"checkpoint {self.directory}/{step} has unreadable metadata (corrupt?); it is left "
                             f"as it is. {type(error).__name__}: {error}") from error
        saved, wanted = meta.get("experiment", {}).get("model", {}), experiment_meta["experiment"]["model"]
        diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, experiment {v!r}" for k, v in wanted.items()
                 if json.dumps(saved.get(k)) != json.dumps(v)]
        if diffs:
            raise ValueError(f"checkpoint {self.directory}/{step} was written for a different model:\n  "
                             + "\n  ".join(diffs))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
