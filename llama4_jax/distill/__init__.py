"""Distillation: a frozen, sharded teacher (online or through a target cache) teaching a student.

See docs/distillation.md (shared) and README "Distillation". The losses live in `llama4_jax.train.losses`.
"""

from llama4_jax.distill.config import DISTILL_TARGETS, TEACHER_DTYPES, DistillConfig

__all__ = ["DISTILL_TARGETS", "TEACHER_DTYPES", "DistillConfig"]
