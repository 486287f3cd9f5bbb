"""The `distill` section of an experiment: which teacher, where its targets come from, and the loss."""

from __future__ import annotations

import dataclasses

from llama4_jax.config import Llama4Config
from llama4_jax.train.distill_losses import DistillLossConfig

TEACHER_DTYPES = ("bfloat16", "float32")
DISTILL_TARGETS = ("online", "cache")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """A frozen teacher teaching the experiment's model.

    teacher_checkpoint: a training run (its workdir or workdir/checkpoints: the latest step's params), a model
      checkpoint written by `llama4-jax convert` / `save_model`, or a Hugging Face directory. None only for
      plans and benchmarks (a random teacher); training refuses it.
    targets: "online" runs the teacher inside the student's jitted step; "cache" reads sparse targets written
      once by tools/cache_teacher.py from `cache_dir` (top-k + tail, or sampled ids + counts).
    loss: the co-distillation loss; its `total_steps` is always the run's `train.steps` (schedules and TAID
      span the run), see `loss_config`.
    """

    teacher: Llama4Config
    teacher_checkpoint: str | None = None
    teacher_param_dtype: str = "bfloat16"
    targets: str = "online"
    cache_dir: str | None = None
    loss: DistillLossConfig = DistillLossConfig(alpha=0.5)
    chunk: int = 1024  # sequence chunk of the loss: one chunk of float32 logits per model is alive at a time

    def __post_init__(self):
        if self.teacher_param_dtype not in TEACHER_DTYPES:
            raise ValueError(f"distill.teacher_param_dtype must be one of {TEACHER_DTYPES}, "
                             f"got {self.teacher_param_dtype!r}")
        if self.targets not in DISTILL_TARGETS:
            raise ValueError(f"distill.targets must be one of {DISTILL_TARGETS}, got {self.targets!r}")
        if self.targets == "cache" and not self.cache_dir:
            raise ValueError("distill.targets='cache' needs distill.cache_dir (written by tools/cache_teacher.py)")
        if self.chunk < 1:
            raise ValueError(f"distill.chunk must be >= 1, got {self.chunk}")

    def loss_config(self, train_steps: int) -> DistillLossConfig:
        """The loss with its schedules spanning the run (raises if burn-in/warmup/decay do not fit in it)."""
        return dataclasses.replace(self.loss, total_steps=train_steps)

    def replace(self, **changes) -> DistillConfig:
        return dataclasses.replace(self, **changes)
