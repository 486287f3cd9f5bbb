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
    """A zero-argument constructor of the student with the run's dtypes, remat and MoE options."""
    return lambda: Llama4ForCausalLM(
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
    model = nnx.merge(graphdef, params)
    hidden, aux = model.model(batch["inputs"], positions=batch.get("positions"),
                              segment_ids=batch.get("segment_ids"), return_aux=True)
    ce = cross_entropy(model.logits, hidden, batch["targets"], batch["weights"])
    tokens = jnp.maximum(ce["tokens"], 1.0)
    loss = ce["loss_sum"] / tokens
    metrics = {"loss": loss, "accuracy": ce["correct"] / tokens, "tokens": ce["tokens"]}
    if aux:
        metrics["expert_load"] = aux["expert_load"]
        metrics["dropped_tokens"] = aux["dropped_tokens"].sum()
        if train.load_balance_coef:
            loss = loss + train.load_balance_coef * aux["load_balance_loss"].mean()
        if train.router_z_coef:
            loss = loss + train.router_z_coef * aux["router_z_loss"].mean()
    return loss, metrics


def make_train_step(graphdef, tx: optax.GradientTransformation, train):
    """step(params, opt_state, batch) -> (params, opt_state, metrics); pure, ready for jax.jit."""

    def step(params, opt_state, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, batch, train)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "objective": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def abstract_train_state(experiment):
    """(graphdef, abstract params, optimizer) of an experiment's student, built with no memory."""
    abstract = nnx.eval_shape(model_factory(experiment.model, experiment.train, seed=experiment.train.seed))
    graphdef, params = nnx.split(abstract, nnx.Param)
    return graphdef, params, make_optimizer(experiment.optim, experiment.train.steps)
