"""The distillation training step: the student's step with the teacher's targets in the loss.

step(params, opt_state, batch, teacher_params, step, taid_t) -> (params, opt_state, metrics)

Online targets: the teacher's forward runs inside the same jitted program on its own (stop_gradient) params;
its final hidden states are computed once and its logits chunk by chunk inside the loss, beside the student's
(`distill_loss`), so float32 (B, T, V) logits never exist for either model. Cached targets arrive in the batch
("target_ids" and "target_values": (B, T, K) top-k log-probabilities or sampled counts).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llama4_jax.distill.cache import CACHE_FORMATS
from llama4_jax.generate import SamplingConfig, sample_continuations
from llama4_jax.train.losses import OnlineTargets, SampledTargets, TopKTargets, distill_loss
from llama4_jax.train.step import add_moe_losses, make_train_step

TARGET_KEYS = ("target_ids", "target_values")


def distill_loss_fn(params, graphdef, batch, train, teacher_params, step, taid_t, *, teacher_graphdef, loss_config,
                    cache_format: str | None, chunk: int):
    """Summed distillation objective and metrics of one (micro-)batch. "loss_sum" stays the student's hard
    cross entropy (comparable with a student-only run); the objective mixes soft and hard terms by alpha."""
    student = nnx.merge(graphdef, params)
    hidden, aux = student.model(batch["inputs"], positions=batch.get("positions"),
                                segment_ids=batch.get("segment_ids"), return_aux=True)
    if cache_format is None:
        teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
        with jax.named_scope("teacher"):
            teacher_hidden = teacher.model(batch["inputs"], positions=batch.get("positions"),
                                           segment_ids=batch.get("segment_ids"))
        targets = OnlineTargets(logits_fn=teacher.logits, hidden=jax.lax.stop_gradient(teacher_hidden))
    elif cache_format == "topk":  # values: K log-probabilities, then the log tail mass
        values = batch["target_values"]
        if values.shape[-1] != batch["target_ids"].shape[-1] + 1:
            raise ValueError(f"top-k targets: target_values must hold k + 1 columns (k log-probabilities, then the "
                             f"log tail mass), got {values.shape[-1]} for k = {batch['target_ids'].shape[-1]}")
        targets = TopKTargets(batch["target_ids"], values[..., :-1], values[..., -1])
    else:
        targets = SampledTargets(batch["target_ids"], batch["target_values"])
    sums = distill_loss(student.logits, hidden, targets, batch["targets"], batch["weights"], config=loss_config,
                        step=step, taid_t=taid_t, chunk=chunk)
    metrics = {**sums, "loss_sum": sums["hard_sum"]}
    metrics.pop("hard_sum")
    return add_moe_losses(sums["loss_sum"], metrics, aux, train)


def on_policy_loss_config(loss_config):
    """GKD's on-policy loss: the divergence alone, on the teacher's own distribution (no labels, no schedule)."""
    return dataclasses.replace(loss_config, alpha=1.0, alpha_end=1.0, alpha_schedule="constant", burn_in_steps=0,
                               warmup_steps=0, decay_steps=0, confidence="none", target="teacher")


def make_on_policy_step(graphdef, tx: optax.GradientTransformation, train, distill, teacher_graphdef):
    """step(params, opt_state, batch, teacher_params, step, taid_t, key): the student samples continuations of
    each row's first `distill.prompt_len` tokens (with its current, stop_gradient params), the teacher scores
    them inside the same program, and the on-policy divergence trains the student on its sampled tokens only."""
    prompt_len = distill.prompt_len(train.seq_len)
    loss = functools.partial(distill_loss_fn, teacher_graphdef=teacher_graphdef,
                             loss_config=on_policy_loss_config(distill.loss_config(train.steps)),
                             cache_format=None, chunk=distill.chunk)
    inner = make_train_step(graphdef, tx, train, loss=loss)
    sampling = SamplingConfig(temperature=distill.on_policy_temperature)

    def step(params, opt_state, batch, teacher_params, step_index, taid_t, key):
        student = nnx.merge(graphdef, jax.lax.stop_gradient(params))
        with jax.named_scope("rollout"):
            tokens, sampled = sample_continuations(
                student, batch["inputs"][:, :prompt_len], key, num_new_tokens=train.seq_len - prompt_len + 1,
                sampling=sampling, stop_tokens=distill.on_policy_stop_tokens)
        # Row = prompt + samples; the loss covers positions whose next token was sampled, in rows whose prompt is
        # all real tokens (a packed row's padding is at its end: such a prompt would not be a valid context).
        whole_prompt = jnp.all(batch["weights"][:, :prompt_len] > 0, axis=1, keepdims=True)
        weights = (sampled[:, 1:] & whole_prompt).astype(jnp.float32)
        rollout = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
        return inner(params, opt_state, rollout, teacher_params, jnp.asarray(step_index, jnp.int32),
                     jnp.asarray(taid_t, jnp.float32))

    return step


def make_distill_step(graphdef, tx: optax.GradientTransformation, train, distill, teacher_graphdef,
                      cache_format: str | None = None):
    """The student's train step (gradient accumulation, clipping, NaN guard) with the distillation loss.

    cache_format: None for online targets, "topk" or "sampled" for targets read from a cache into the batch.
    The teacher's params are an input: pass them undonated; nothing of them is returned or updated.
    """
    if cache_format not in (None, *CACHE_FORMATS):
        raise ValueError(f"cache format must be one of {CACHE_FORMATS}, got {cache_format!r}")
    loss = functools.partial(distill_loss_fn, teacher_graphdef=teacher_graphdef,
                             loss_config=distill.loss_config(train.steps), cache_format=cache_format,
                             chunk=distill.chunk)
    inner = make_train_step(graphdef, tx, train, loss=loss)

    def step(params, opt_state, batch, teacher_params, step_index, taid_t):
        return inner(params, opt_state, batch, teacher_params, jnp.asarray(step_index, jnp.int32),
                     jnp.asarray(taid_t, jnp.float32))

    return step
