"""Training Llama4ForConditionalGeneration on image+text batches, the vision tower frozen by default.

The step takes the whole model's parameters and splits them by an nnx filter: the trainable ones (text model
and projector, plus the vision tower with `train.train_vision_tower`) go through `train.step.make_train_step`
(gradient accumulation, MoE auxiliary losses, NaN guard, the optimizer, whose state covers them only); the
frozen ones are passed as an extra argument, never differentiated, and come back unchanged. The tower's output
is also under stop_gradient when frozen, so no backward pass runs through it; the projector after it trains.

A batch is the text batch of `train.step` ("inputs", "targets", "weights", optional "positions" and
"segment_ids") plus "pixel_values" (B, I, 3, S, S): I tile slots per example, filled in the order the example's
`<|patch|>` blocks appear, unused slots padding (see data/image_text.py).
"""

from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from llama4_jax.sharding import TRAIN_RULES, Rules, state_shardings
from llama4_jax.train.losses import cross_entropy
from llama4_jax.train.step import StepShardings, add_moe_losses, make_eval_step, make_train_step, step_shardings

VISION_PARAMS = nnx.All(nnx.Param, nnx.PathContains("vision_model"))


def trainable_params(freeze_vision: bool = True) -> nnx.filterlib.Filter:
    """The nnx filter of what the optimizer updates (use it as `nnx.Optimizer(..., wrt=...)` too)."""
    return nnx.All(nnx.Param, nnx.Not(VISION_PARAMS)) if freeze_vision else nnx.Param


def split_model(model, freeze_vision: bool = True):
    """(graphdef, trainable state, frozen state); `nnx.merge(graphdef, trainable, frozen)` rebuilds the model."""
    return nnx.split(model, trainable_params(freeze_vision), ...)


def split_params(params: nnx.State, train) -> tuple[nnx.State, nnx.State]:
    """The whole model's Param state -> (trainable, frozen) by `train.train_vision_tower`."""
    return nnx.split_state(params, trainable_params(not train.train_vision_tower), ...)


def multimodal_loss(params, graphdef, batch: dict[str, jax.Array], train,
                    frozen: nnx.State | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed cross entropy over the batch's valid tokens plus the optional MoE losses (the step divides by the
    token count), and summed metrics; `make_train_step`'s loss with the frozen parameters as its extra."""
    model = nnx.merge(graphdef, params, *([] if frozen is None else [frozen]))
    pixels = batch["pixel_values"]  # (B, I, C, S, S)
    vision = model.vision_model(pixels.reshape(-1, *pixels.shape[2:]))  # (B * I, R, O)
    if not train.train_vision_tower:
        vision = jax.lax.stop_gradient(vision)
    features = model.multi_modal_projector(vision.reshape(pixels.shape[0], -1, vision.shape[-1]))  # (B, I*R, E)
    embeds = model.embed(batch["inputs"], image_features=features)  # each example reads its own tile slots
    lm = model.language_model
    hidden, aux = lm.model(inputs_embeds=embeds, positions=batch.get("positions"),
                           segment_ids=batch.get("segment_ids"), return_aux=True)
    ce = cross_entropy(lm.logits, hidden, batch["targets"], batch["weights"])
    return add_moe_losses(ce["loss_sum"], dict(ce), aux, train)


def make_multimodal_train_step(graphdef, tx: optax.GradientTransformation, train):
    """step(params, opt_state, batch) -> (params, opt_state, metrics); pure, ready for jax.jit (donate params
    and opt_state). `params` is the whole model's Param state; `opt_state = tx.init(split_params(params,
    train)[0])` covers the trainable part only."""
    inner = make_train_step(graphdef, tx, train, loss=multimodal_loss)

    def step(params, opt_state, batch):
        trainable, frozen = split_params(params, train)
        trainable, opt_state, metrics = inner(trainable, opt_state, batch, frozen)
        return nnx.merge_state(trainable, frozen), opt_state, metrics

    return step


def make_multimodal_eval_step(graphdef, train):
    """eval(params, batch) -> summed loss, correct and token counts of image+text batches."""
    return make_eval_step(graphdef, train, loss=multimodal_loss)


def multimodal_step_shardings(abstract_params, tx: optax.GradientTransformation, mesh: Mesh, train,
                              rules: Rules = TRAIN_RULES) -> StepShardings:
    """Shardings of the whole model's parameters (logical axes), of the optimizer state of its trainable part,
    and of the batch (pixel_values by their leading batch axis)."""
    from llama4_jax.data.image_text import BATCH_KEYS

    trainable, _ = split_params(abstract_params, train)
    text = step_shardings(trainable, tx, mesh, BATCH_KEYS, rules)
    return StepShardings(params=state_shardings(abstract_params, mesh, rules), opt_state=text.opt_state,
                         batch=text.batch)


def init_opt_state(tx: optax.GradientTransformation, params, train):
    """The optimizer state of the trainable part of the whole model's `params`."""
    return tx.init(split_params(params, train)[0])
