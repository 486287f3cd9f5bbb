"""The pure training step: parameters and optimizer state in, updated ones out (buffers donated).

Parameters are float32 master weights (configurable); the model computes in `compute_dtype` by casting each
weight where it is used. The loss is the hard-label cross entropy normalised by the global count of valid
tokens, plus the optional MoE auxiliary losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama4_jax.config import Llama4Config
from llama4_jax.model import Llama4ForCausalLM
from llama4_jax.sharding import TRAIN_RULES, Rules, logical_to_spec, state_shardings
from llama4_jax.train.losses import cross_entropy
from llama4_jax.train.optim import make_optimizer

BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")


def model_factory(config: Llama4Config, train, *, seed: int = 0) -> Callable[[], Llama4ForCausalLM]:
    """A zero-argument constructor of the student with the run's dtypes, remat and MoE options (a
    Llama4MultimodalConfig gives Llama4ForConditionalGeneration)."""
    from llama4_jax.model.multimodal import Llama4ForConditionalGeneration
    from llama4_jax.multimodal_config import Llama4MultimodalConfig

    model_class = Llama4ForConditionalGeneration if isinstance(config, Llama4MultimodalConfig) else Llama4ForCausalLM
    return lambda: model_class(
        config, rngs=nnx.Rngs(seed), param_dtype=jnp.dtype(train.param_dtype), dtype=jnp.dtype(train.compute_dtype),
        remat=train.remat, capacity_factor=train.capacity_factor)


@dataclasses.dataclass(frozen=True)
class StepShardings:
    params: Any
    opt_state: Any
    batch: dict[str, NamedSharding]


def step_shardings(abstract_params, tx: optax.GradientTransformation, mesh: Mesh, batch_keys=BATCH_KEYS,
                   rules: Rules = TRAIN_RULES) -> StepShardings:
    """Shardings of parameters (from their logical axes), optimizer state (like its parameter) and batch."""
    params = state_shardings(abstract_params, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = optax.tree_utils.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_opt, params,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, nnx.Variable))
    token = NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))
    return StepShardings(params=params, opt_state=opt_state, batch={k: token for k in batch_keys})


def loss_fn(params, graphdef, batch: dict[str, jax.Array], train) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed objective over the batch's valid tokens (divided by the global token count by the step, so
    micro-batches accumulate exactly), and summed metrics."""
    model = nnx.merge(graphdef, params)
    hidden, aux = model.model(batch["inputs"], positions=batch.get("positions"),
                              segment_ids=batch.get("segment_ids"), return_aux=True)
    ce = cross_entropy(model.logits, hidden, batch["targets"], batch["weights"])
    return add_moe_losses(ce["loss_sum"], dict(ce), aux, train)


def add_moe_losses(objective: jax.Array, metrics: dict[str, jax.Array], aux: dict[str, jax.Array], train):
    """The optional MoE auxiliary losses added to a summed objective, and the router metrics."""
    if aux:
        metrics["expert_load"] = aux["expert_load"]
        metrics["dropped_tokens"] = aux["dropped_tokens"].sum()
        # Auxiliary losses are per-token averages: weight them by this batch's tokens like the cross entropy.
        if train.load_balance_coef:
            objective = objective + train.load_balance_coef * aux["load_balance_loss"].mean() * metrics["tokens"]
        if train.router_z_coef:
            objective = objective + train.router_z_coef * aux["router_z_loss"].mean() * metrics["tokens"]
    return objective, metrics


def _micro_batches(batch: dict[str, jax.Array], count: int) -> dict[str, jax.Array]:
    """(B, T) -> (count, B / count, T), micro-batch j taking rows j, j + count, ...: every device keeps its own
    contiguous block of rows, so splitting moves no data."""
    def split(x):
        if x.shape[0] % count:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by train.grad_accum ({count})")
        return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)

    return {k: split(v) for k, v in batch.items()}


def make_train_step(graphdef, tx: optax.GradientTransformation, train, loss: Callable = loss_fn):
    """step(params, opt_state, batch, *loss_args) -> (params, opt_state, metrics); pure, ready for jax.jit.

    `loss(params, graphdef, batch, train, *loss_args)` returns (summed objective, summed metrics) with
    "loss_sum", "correct" and "tokens" among them; `loss_args` are passed through untouched (a distillation
    step passes the frozen teacher's parameters there). Gradients of `train.grad_accum` micro-batches are
    summed, then divided by the global count of valid tokens: the same update as one batch `grad_accum` times
    larger, in a fraction of the memory. Every other "<name>_sum" metric is reported as "<name>" per token.
    """
    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def accumulate(params, batch, loss_args):
        if train.grad_accum == 1:
            (objective, metrics), grads = grad_fn(params, graphdef, batch, train, *loss_args)
            return objective, metrics, grads

        def body(carry, micro):
            (objective, metrics), grads = grad_fn(params, graphdef, micro, train, *loss_args)
            return jax.tree.map(jnp.add, carry, (objective, metrics, grads)), None

        micro = _micro_batches(batch, train.grad_accum)
        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(jnp.zeros_like,
                             jax.eval_shape(lambda: grad_fn(params, graphdef, first, train, *loss_args)))
        (objective, metrics), grads = zeros
        return jax.lax.scan(body, (objective, metrics, grads), micro)[0]

    def step(params, opt_state, batch, *loss_args):
        objective, metrics, grads = accumulate(params, batch, loss_args)
        tokens = jnp.maximum(metrics["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / tokens, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        per_token = {k.removesuffix("_sum"): v / tokens for k, v in metrics.items()
                     if k.endswith("_sum") and k != "loss_sum"}
        metrics = {**metrics, **per_token, "loss": metrics["loss_sum"] / tokens,
                   "accuracy": metrics["correct"] / tokens, "objective": objective / tokens,
                   "grad_norm": optax.tree.norm(grads), "skipped_steps": opt_state.total_notfinite,
                   "consecutive_skipped": opt_state.notfinite_count}
        return params, opt_state, metrics

    return step


def make_eval_step(graphdef, train, loss: Callable = loss_fn):
    """eval(params, batch) -> summed loss, correct and token counts (divide after summing batches)."""

    def evaluate(params, batch):
        _, metrics = loss(params, graphdef, batch, train)
        return {k: metrics[k] for k in ("loss_sum", "correct", "tokens")}

    return evaluate


def abstract_train_state(experiment):
    """(graphdef, abstract params, optimizer) of an experiment's student, built with no memory."""
    abstract = nnx.eval_shape(model_factory(experiment.model_config, experiment.train, seed=experiment.train.seed))
    graphdef, params = nnx.split(abstract, nnx.Param)
    return graphdef, params, make_optimizer(experiment.optim, experiment.train.steps)
