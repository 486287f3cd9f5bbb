"""Held-out loss and perplexity of a model over token batches, with the training step's own eval function
(`train.step.make_eval_step`: the same chunked cross entropy, so numbers compare with training logs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import jax
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross entropy per target token (nats)
    perplexity: float  # exp(loss)
    accuracy: float  # argmax == target
    tokens: int  # target tokens counted (weight > 0)
    batches: int


def evaluate(model, batches: Iterable[dict[str, np.ndarray]], *, max_batches: int | None = None) -> EvalResult:
    """Token-weighted loss over `batches` (dicts with inputs, targets, weights and optionally positions and
    segment_ids, (B, T) each, as `llama4_jax.data.make_iterator` yields), at most `max_batches` of them."""
    from llama4_jax.experiment import TrainConfig
    from llama4_jax.train.step import make_eval_step

    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches!r}")
    graphdef, params = nnx.split(model, nnx.Param)  # as the training step: the model holds only Params
    # Auxiliary MoE losses are off in TrainConfig's defaults: the plain cross entropy.
    step = make_eval_step(graphdef, TrainConfig())
    eval_fn = jax.jit(step)
    totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    count = 0
    for batch in batches:
        if max_batches is not None and count >= max_batches:
            break
        keys = ("inputs", "targets", "weights", "positions", "segment_ids")
        out = eval_fn(params, {k: np.asarray(batch[k]) for k in keys if k in batch})
        for k in totals:
            totals[k] += float(out[k])
        count += 1
    if totals["tokens"] == 0:
        raise ValueError(f"no target tokens to evaluate (read {count} batches)")
    loss = totals["loss_sum"] / totals["tokens"]
    return EvalResult(loss=loss, perplexity=math.exp(loss), accuracy=totals["correct"] / totals["tokens"],
                      tokens=int(totals["tokens"]), batches=count)
