"""The frozen teacher: its own dtype and sharding rules, loaded from any checkpoint we know, never trained.

A teacher is a (graphdef, params) pair. Its params are inputs of the student's jitted step, never donated and
never differentiated (the step wraps them in `stop_gradient`), and no optimizer state is ever built for them.
They are sharded by `INFERENCE_RULES`: with no gradients or optimizer state to place, every dense weight is
split over all data-like axes (data included), so a Behemoth-sized teacher costs each chip 1/devices of it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from llama4_jax.config import Llama4Config
from llama4_jax.model import Llama4ForCausalLM
from llama4_jax.sharding import TRAIN_RULES, Rules, state_shardings

# Training rules with the weights' "embed" dims also split over "data": inference keeps no replicas to update.
INFERENCE_RULES: Rules = tuple(
    (name, {"embed": ("data", "fsdp", "expert"), "expert_embed": ("data", "fsdp")}.get(name, axes))
    for name, axes in TRAIN_RULES)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """graphdef + params (an nnx.State of its nnx.Param leaves); `config` is the teacher's model config."""

    config: Llama4Config
    graphdef: Any
    params: Any

    def model(self, params=None) -> Llama4ForCausalLM:
        """The module with `params` (inside a jitted step: the traced ones) or the loaded ones."""
        return nnx.merge(self.graphdef, self.params if params is None else params)


def teacher_factory(config: Llama4Config, *, param_dtype: str, compute_dtype: str,
                    capacity_factor: float | None = None, seed: int = 0):
    """Zero-argument constructor of the teacher module (no remat: it never runs a backward pass)."""
    return lambda: Llama4ForCausalLM(config, rngs=nnx.Rngs(seed), param_dtype=jnp.dtype(param_dtype),
                                     dtype=jnp.dtype(compute_dtype), capacity_factor=capacity_factor)


def abstract_teacher(distill, train) -> tuple[Any, Any]:
    """(graphdef, abstract params) of the teacher, built with no memory."""
    factory = teacher_factory(distill.teacher, param_dtype=distill.teacher_param_dtype,
                              compute_dtype=train.compute_dtype, capacity_factor=train.capacity_factor)
    return nnx.split(nnx.eval_shape(factory), nnx.Param)


def teacher_shardings(abstract_params, mesh: Mesh, rules: Rules = INFERENCE_RULES):
    return state_shardings(abstract_params, mesh, rules)


def init_teacher(distill, train, mesh: Mesh, *, seed: int = 0) -> Teacher:
    """A randomly initialised teacher sharded from birth (plans, benchmarks and tests)."""
    factory = teacher_factory(distill.teacher, param_dtype=distill.teacher_param_dtype,
                              compute_dtype=train.compute_dtype, capacity_factor=train.capacity_factor, seed=seed)
    graphdef, abstract = nnx.split(nnx.eval_shape(factory), nnx.Param)
    shardings = teacher_shardings(abstract, mesh)
    with jax.set_mesh(mesh):
        params = jax.jit(lambda: nnx.state(factory(), nnx.Param), out_shardings=shardings)()
    return Teacher(distill.teacher, graphdef, params)


def config_differences(found: Llama4Config, expected: Llama4Config) -> list[str]:
    """Fields where a checkpoint's model config differs from the experiment's teacher config."""
    got, want = found.to_hf(), expected.to_hf()
    return [f"{k}: checkpoint {got.get(k)!r}, distill.teacher {v!r}" for k, v in want.items()
            if json.dumps(got.get(k), sort_keys=True) != json.dumps(v, sort_keys=True)]


def _check_config(path, found: Llama4Config, expected: Llama4Config) -> None:
    diffs = config_differences(found, expected)
    if diffs:
        raise ValueError(f"teacher checkpoint {path} does not match distill.teacher:\n  " + "\n  ".join(diffs))


def load_teacher(distill, train, mesh: Mesh, *, rules: Rules = INFERENCE_RULES) -> Teacher:
    """The teacher of `distill` from its checkpoint, each parameter read straight into its sharding under
    `rules` (inference by default) and cast to `distill.teacher_param_dtype`. Raises ValueError naming the path
    and every mismatching field when the checkpoint's config is not `distill.teacher`, or when the path holds
    no checkpoint we know. (Also loads pretrained students: see `load_pretrained`.)"""
    path = distill.teacher_checkpoint
    if path is None:
        raise ValueError("distill.teacher_checkpoint is not set: a distillation run needs a trained teacher "
                         "(a training workdir, a converted model checkpoint, or a Hugging Face directory)")
    path = pathlib.Path(path)
    kind = checkpoint_kind(path)
    kwargs = dict(dtype=jnp.dtype(train.compute_dtype), capacity_factor=train.capacity_factor)
    dtype = jnp.dtype(distill.teacher_param_dtype)
    if kind == "hf":
        from llama4_jax.convert.load import load_hf, open_hf

        _check_config(path, open_hf(path).config, distill.teacher)
        model = load_hf(path, mesh=mesh, dtype=dtype, rules=rules, model_kwargs=kwargs)
    elif kind == "model":
        from llama4_jax.checkpoint import ParamReader, restore_model

        _check_config(path, ParamReader(path).config, distill.teacher)
        model = restore_model(path, mesh=mesh, rules=rules, dtype=dtype, model_kwargs=kwargs)
    else:
        return _restore_from_run(path, distill, train, mesh, rules)
    graphdef, params = nnx.split(model, nnx.Param)
    return Teacher(distill.teacher, graphdef, params)


def checkpoint_kind(path: pathlib.Path) -> str:
    """"hf" (config.json + safetensors), "model" (an Orbax model checkpoint) or "run" (training checkpoints)."""
    from llama4_jax.checkpoint import is_checkpoint

    if not path.is_dir():
        raise ValueError(f"teacher checkpoint {path} is not a directory")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    if is_checkpoint(path):
        return "model"
    if _run_directory(path) is not None:
        return "run"
    raise ValueError(f"teacher checkpoint {path} is neither a Hugging Face directory (config.json + *.safetensors), "
                     "a model checkpoint (llama4-jax convert), nor a training run (workdir/checkpoints/<step>)")


def _run_directory(path: pathlib.Path) -> pathlib.Path | None:
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir() and any(p.name.isdigit() and (p / "params").is_dir() for p in candidate.iterdir()):
            return candidate
    return None


def _restore_from_run(path: pathlib.Path, distill, train, mesh: Mesh, rules: Rules) -> Teacher:
    """The latest training checkpoint's params only (no optimizer state is read), cast and resharded."""
    from llama4_jax.train.checkpointing import experiment_json

    directory = _run_directory(path).absolute()
    step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "params").is_dir())
    graphdef, abstract = abstract_teacher(distill, train)
    shardings = teacher_shardings(abstract, mesh, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    manager = ocp.CheckpointManager(directory, item_names=("params", "meta"))
    where = directory / str(step)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved, wanted = meta.get("experiment", {}).get("model", {}), experiment_json(distill.teacher)
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, distill.teacher {v!r}" for k, v in wanted.items()
                 if json.dumps(saved.get(k), sort_keys=True) != json.dumps(v, sort_keys=True)]
        if diffs:
            raise ValueError(f"teacher checkpoint {where} does not match distill.teacher:\n  " + "\n  ".join(diffs))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        except Exception as error:  # Orbax raises many types for mismatched trees
            raise ValueError(f"teacher checkpoint {where} cannot be restored as distill.teacher: "
                             f"{type(error).__name__}: {error}") from error
    finally:
        manager.close()
    return Teacher(distill.teacher, graphdef, restored["params"])


def load_pretrained(experiment, path: str, mesh: Mesh):
    """The experiment's model params from a checkpoint (run, model checkpoint or HF directory), in the training
    sharding and `train.param_dtype`: the start of a fine-tuning or distillation run (`train.init_checkpoint`).
    The checkpoint's config must be `experiment.model` (checked field by field, as for a teacher)."""
    from llama4_jax.distill.config import DistillConfig

    spec = DistillConfig(teacher=experiment.model, teacher_checkpoint=path,
                         teacher_param_dtype=experiment.train.param_dtype)
    return load_teacher(spec, experiment.train, mesh, rules=TRAIN_RULES).params
