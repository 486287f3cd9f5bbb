"""Experiment configs: frozen dataclasses composed from the model presets, loaded from experiments/*.py.

An experiment file defines `EXPERIMENT = ExperimentConfig(...)`. `--set section.field=value` overrides
are applied with the field's type; an unknown key is an error naming close matches.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import pathlib
import types
import typing
from typing import Any

from llama4_jax.config import PRESETS, Llama4Config
from llama4_jax.data.config import DataConfig
from llama4_jax.distill.config import DistillConfig
from llama4_jax.multimodal_config import PATCH_ID, Llama4MultimodalConfig, Llama4VisionConfig
from llama4_jax.sharding import MeshConfig
from llama4_jax.train.optim import OptimConfig

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    batch_size: int = 8  # global sequences per optimizer step
    seq_len: int = 256
    steps: int = 100
    param_dtype: str = "float32"  # master weights
    compute_dtype: str = "bfloat16"
    remat: str = "full"
    capacity_factor: float | None = None  # expert-parallel MoE; None = dropless
    load_balance_coef: float = 0.0  # off by default: the forward stays exactly Llama 4
    router_z_coef: float = 0.0
    grad_accum: int = 1  # micro-batches per optimizer step
    train_vision_tower: bool = False  # with `vision`: False keeps the vision tower frozen (projector still trains)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    # Start from these weights instead of random ones (fine-tuning, or a pretrained student): a training run,
    # a model checkpoint (llama4-jax convert) or a Hugging Face directory; its config must equal `model`.
    init_checkpoint: str | None = None

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"train.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        for name in ("batch_size", "seq_len", "steps", "grad_accum", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum "
                             f"({self.grad_accum})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    name: str
    model: Llama4Config
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    distill: DistillConfig | None = None  # a frozen teacher teaching `model` (same vocabulary)
    # A vision tower: the run trains Llama4ForConditionalGeneration (`model` is its text model) on image+text
    # records (data.image_field); `image_token_index` is the <|patch|> id, checked against the tokenizer's.
    vision: Llama4VisionConfig | None = None
    image_token_index: int = PATCH_ID

    def __post_init__(self):
        if self.vision is not None:
            self.model_config  # noqa: B018 -- validates image_token_index against the vocabulary
            if self.distill is not None:
                raise ValueError("distill with vision: distillation of multimodal models is not supported")
        if self.distill is not None:
            teacher = self.distill.teacher
            if teacher.vocab_size != self.model.vocab_size:
                raise ValueError(f"distill.teacher.vocab_size ({teacher.vocab_size}) must equal model.vocab_size "
                                 f"({self.model.vocab_size}): teacher and student share one vocabulary")
            self.distill.loss_config(self.train.steps)  # schedules must fit in the run: raises early

    @property
    def model_config(self) -> Llama4Config | Llama4MultimodalConfig:
        """The architecture the run trains: `model`, or with `vision` the multimodal model around it."""
        if self.vision is None:
            return self.model
        return Llama4MultimodalConfig(text_config=self.model, vision_config=self.vision,
                                      image_token_index=self.image_token_index)


def load_experiment(path: str | pathlib.Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Import an experiment file and apply `section.field=value` overrides."""
    path = pathlib.Path(path)
    if not path.is_file():
        names = sorted(p.name for p in path.parent.glob("*.py")) if path.parent.is_dir() else []
        raise ValueError(f"experiment file {path} does not exist" + (f"; found {names}" if names else ""))
    module = load_module(path)
    experiment = getattr(module, "EXPERIMENT", None)
    if not isinstance(experiment, ExperimentConfig):
        raise ValueError(f"{path} must define EXPERIMENT = ExperimentConfig(...)")
    return apply_overrides(experiment, overrides)


def load_module(path: str | pathlib.Path) -> types.ModuleType:
    """Import a Python file (an experiment; experiments/ is not a package) as a module of its own."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"llama4_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like section.field=value")
        config = _set(config, key.split("."), raw, key)
    return config


def _set(config: Any, keys: list[str], raw: str, full_key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(config)}
    name = keys[0]
    if name not in fields:
        close = difflib.get_close_matches(name, fields, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {sorted(fields)}"
        raise ValueError(f"unknown config key {full_key!r}{hint}")
    current = getattr(config, name)
    if len(keys) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"config key {full_key!r}: {name} is not a section")
        return dataclasses.replace(config, **{name: _set(current, keys[1:], raw, full_key)})
    hints = typing.get_type_hints(type(config))
    return dataclasses.replace(config, **{name: _parse(raw, hints[name], full_key)})


def _parse(raw: str, annotation: Any, key: str) -> Any:
    """Parse an override value for a field of type `annotation` (int, float, str, bool, None, presets)."""
    args = typing.get_args(annotation)
    is_optional = type(None) in args
    if is_optional and raw.lower() in ("none", "null"):
        return None
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        base = next(a for a in args if a is not type(None))
    if base is Llama4Config:
        if raw not in PRESETS:
            raise ValueError(f"{key}: unknown preset {raw!r}; presets: {sorted(PRESETS)}")
        return PRESETS[raw]
    try:
        if base is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if base is str:
            return raw
        value = ast.literal_eval(raw)
        if base is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, base) or isinstance(value, bool):
            raise ValueError(raw)
        return value
    except (ValueError, SyntaxError):
        raise ValueError(f"{key}: expected {getattr(base, '__name__', base)}, got {raw!r}") from None
