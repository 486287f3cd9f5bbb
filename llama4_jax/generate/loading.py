"""Load a model for inference from any checkpoint we write or read: a Hugging Face directory, an Orbax model
checkpoint (`save_model`, `llama4-jax convert`), or a training run (workdir, its checkpoints/ directory or one
step of it), together with the tokenizer that belongs to it when one is known.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax.config import Llama4Config, RopeScaling


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model: object  # Llama4ForCausalLM
    tokenizer: str | None  # a DataConfig.tokenizer spec ("bpe:embedded", "llama4", a tokenizer.json path) or None
    kind: str  # "hf", "orbax" or "train"


def load_model(path: str | pathlib.Path, *, dtype: str | None = None) -> LoadedModel:
    """The model at `path` on the first device; `dtype` ("float32", "bfloat16") casts the parameters (the
    compute dtype follows them)."""
    from llama4_jax.checkpoint import is_checkpoint, restore_model
    from llama4_jax.convert.load import load_hf

    path = pathlib.Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is not a directory (expected a Hugging Face directory, an Orbax "
                         f"model checkpoint or a training workdir)")
    tokenizer = str(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
    if (path / "config.json").is_file():
        kwargs = {} if dtype is None else {"dtype": jnp.dtype(dtype)}
        model = load_hf(path, dtype=dtype, model_kwargs=kwargs)
        return LoadedModel(model, tokenizer, "hf")
    if is_checkpoint(path):
        model = restore_model(path)
        return LoadedModel(_cast(model, dtype), tokenizer, "orbax")
    step_dir = _train_step_dir(path)
    if step_dir is None:
        raise ValueError(f"{str(path)!r} holds no config.json (Hugging Face), no Orbax model checkpoint and no "
                         f"training checkpoint (checkpoints/<step>/params)")
    return _load_train_checkpoint(step_dir, dtype)


def _cast(model, dtype: str | None):
    if dtype is None:
        return model
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    model = nnx.merge(graphdef, state)
    model.model.dtype = jnp.dtype(dtype)
    return model


def _train_step_dir(path: pathlib.Path) -> pathlib.Path | None:
    """The step directory (holding params/ and meta/) of a workdir, its checkpoints/ or a step; the latest."""
    if (path / "params").is_dir() and (path / "meta").is_dir():
        return path
    for root in (path / "checkpoints", path):
        steps = [d for d in root.iterdir() if d.is_dir() and d.name.isdigit() and (d / "params").is_dir()] \
            if root.is_dir() else []
        if steps:
            return max(steps, key=lambda d: int(d.name))
    return None


def config_from_json(fields: dict) -> Llama4Config:
    """Llama4Config from its JSON form in a training checkpoint's metadata (lists back to tuples)."""
    known = {f.name for f in dataclasses.fields(Llama4Config)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known}
    if isinstance(values.get("rope_scaling"), dict):
        values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
    return Llama4Config(**values)


def _load_train_checkpoint(step_dir: pathlib.Path, dtype: str | None) -> LoadedModel:
    import orbax.checkpoint as ocp

    from llama4_jax.model import Llama4ForCausalLM

    step_dir = step_dir.absolute()
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")
    experiment = meta["experiment"]
    config = config_from_json(experiment["model"])
    param_dtype = jnp.dtype(experiment.get("train", {}).get("param_dtype", "float32"))
    abstract = nnx.eval_shape(lambda: Llama4ForCausalLM(config, rngs=nnx.Rngs(0), param_dtype=param_dtype))
    graphdef, params = nnx.split(abstract, nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), params)
    try:
        params = ocp.StandardCheckpointer().restore(step_dir / "params", target)
    except Exception as error:  # Orbax raises many types for corrupt or mismatched files
        raise ValueError(f"training checkpoint {str(step_dir)!r} cannot be restored as its recorded model "
                         f"({type(error).__name__}: {error})") from error
    model = _cast(nnx.merge(graphdef, params), dtype)
    return LoadedModel(model, experiment.get("data", {}).get("tokenizer"), "train")
