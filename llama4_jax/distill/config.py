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
    # On-policy distillation (GKD, Agarwal et al. 2024): on this fraction of steps (lambda) the student samples
    # continuations of the batch's first `on_policy_prompt_len` tokens (0: half the row) at
    # `on_policy_temperature`, the teacher scores them online, and the divergence alone (alpha = 1: the labels
    # would be the student's own samples) is applied to the sampled tokens.
    on_policy_fraction: float = 0.0
    on_policy_prompt_len: int = 0
    on_policy_temperature: float = 1.0
    on_policy_stop_tokens: tuple[int, ...] = ()  # a row's samples end at its first stop token (kept)

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
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ValueError(f"distill.on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
        if self.targets == "cache" and self.loss.target != "teacher":
            raise ValueError(f"distill.loss.target={self.loss.target!r} needs the teacher's full logits: use "
                             "distill.targets='online', or loss.target='teacher' with a cache")
        if self.on_policy_fraction and self.targets != "online":
            raise ValueError("distill.on_policy_fraction > 0 needs distill.targets='online': the teacher must score "
                             "the student's own samples as they are drawn")
        if self.on_policy_temperature <= 0 or self.on_policy_prompt_len < 0:
            raise ValueError("distill.on_policy_temperature must be > 0 and on_policy_prompt_len >= 0, got "
                             f"{self.on_policy_temperature}, {self.on_policy_prompt_len}")

    def prompt_len(self, seq_len: int) -> int:
        """Tokens of each row used as the on-policy prompt; the rest of the row is sampled."""
        length = self.on_policy_prompt_len or seq_len // 2
        if not 1 <= length < seq_len:
            raise ValueError(f"distill.on_policy_prompt_len must be in [1, train.seq_len={seq_len}), got {length}")
        return length

    def loss_config(self, train_steps: int) -> DistillLossConfig:
        """The loss with its schedules spanning the run (raises if burn-in/warmup/decay do not fit in it)."""
        return dataclasses.replace(self.loss, total_steps=train_steps)

    def replace(self, **changes) -> DistillConfig:
        return dataclasses.replace(self, **changes)
