"""Training Llama4ForConditionalGeneration on image+text batches, the vision tower frozen by default.

The model's parameters are split in two by an nnx filter: the trainable ones (text model and projector,
plus the vision tower when `freeze_vision=False`) are differentiated and updated by the optimizer; the
frozen ones ride along unchanged, and the tower's output is under stop_gradient so no backward pass runs
through it. A batch is the text batch of `train.step` ("inputs", "targets", "weights", optional "positions"
and "segment_ids") plus "pixel_values" (I, 3, S, S): the tiles of every image in the batch, in the order
their `<|patch|>` blocks appear row-major in "inputs".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llama4_jax.train.losses import cross_entropy

VISION_PARAMS = nnx.All(nnx.Param, nnx.PathContains("vision_model"))


def trainable_params(freeze_vision: bool = True) -> nnx.filterlib.Filter:
    """The nnx filter of what the optimizer updates (use it as `nnx.Optimizer(..., wrt=...)` too)."""
    return nnx.All(nnx.Param, nnx.Not(VISION_PARAMS)) if freeze_vision else nnx.Param


def split_model(model, freeze_vision: bool = True):
    """(graphdef, trainable state, frozen state); `nnx.merge(graphdef, trainable, frozen)` rebuilds the model."""
    return nnx.split(model, trainable_params(freeze_vision), ...)


def multimodal_loss(trainable, frozen, graphdef, batch: dict[str, jax.Array], *,
                    freeze_vision: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed cross entropy over the batch's valid tokens (the step divides by the token count) and metrics."""
    model = nnx.merge(graphdef, trainable, frozen)
    features = model.get_image_features(batch["pixel_values"])
    if freeze_vision:
        features = jax.lax.stop_gradient(features)
    embeds = model.embed(batch["inputs"], image_features=features)
    lm = model.language_model
    hidden = lm.model(inputs_embeds=embeds, positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
    ce = cross_entropy(lm.logits, hidden, batch["targets"], batch["weights"])
    return ce["loss_sum"], dict(ce)


def make_multimodal_train_step(graphdef, tx: optax.GradientTransformation, *, freeze_vision: bool = True):
    """step(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics); pure, ready for jax.jit
    (donate trainable and opt_state). `tx` and `opt_state = tx.init(trainable)` cover the trainable part only."""
    grad_fn = jax.value_and_grad(multimodal_loss, has_aux=True)

    def step(trainable, frozen, opt_state, batch):
        (_, metrics), grads = grad_fn(trainable, frozen, graphdef, batch, freeze_vision=freeze_vision)
        tokens = jnp.maximum(metrics["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / tokens, grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {**metrics, "loss": metrics["loss_sum"] / tokens, "accuracy": metrics["correct"] / tokens,
                   "grad_norm": optax.tree.norm(grads)}
        return trainable, opt_state, metrics

    return step
