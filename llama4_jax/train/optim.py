"""AdamW through Optax: schedules, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import dataclasses

import jax
import optax

SCHEDULES = ("cosine", "wsd", "constant")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr / peak lr
    warmup_steps: int = 100
    schedule: str = "cosine"  # warmup + cosine, warmup-stable-decay, or warmup + constant
    decay_fraction: float = 0.2  # WSD: fraction of the run spent decaying
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    max_consecutive_nonfinite: int = 5  # skip updates with NaN/Inf gradients; the trainer stops after this many

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"optim.lr must be > 0 and optim.warmup_steps >= 0, got {self.lr}, {self.warmup_steps}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}")


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    final = config.lr * config.min_lr_ratio
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(total_steps, warmup + 1), final)
    if config.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), optax.constant_schedule(config.lr)],
                                    [warmup])
    decay = max(1, int(round(total_steps * config.decay_fraction)))
    stable = max(total_steps - warmup - decay, 0)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.lr, warmup), optax.constant_schedule(config.lr),
         optax.linear_schedule(config.lr, final, decay)],
        [warmup, warmup + stable],
    )


def decay_mask(params) -> object:
    """Weight decay on matrices only: not on norm weights or biases (1-D per layer, 2-D once stacked)."""

    def one(path, leaf):
        name = jax.tree_util.keystr(path)
        return not ("norm" in name or "bias" in name)

    return jax.tree.map_with_path(one, params)


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip -> AdamW, inside `optax.apply_if_finite`: a step whose gradients hold NaN/Inf changes nothing
    and is counted (state.notfinite_count, state.total_notfinite)."""
    chain = []
    if config.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(config.clip_norm))
    chain.append(optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                             eps=config.eps, weight_decay=config.weight_decay, mask=decay_mask))
    return optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=config.max_consecutive_nonfinite)
