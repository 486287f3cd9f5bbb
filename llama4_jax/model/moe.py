"""Llama 4 mixture of experts: top-k on raw router logits, sigmoid scores scaling the expert INPUT, a shared
expert always added.

Legend: T tokens (batch and sequence flattened), D model, E experts, F expert width, A = T * top_k assignments.

Two implementations of the routed part:
* `dispatch` (default): assignments sorted by expert and run through `grouped_matmul`, so only the chosen
  experts are computed; under a mesh, expert-parallel (`expert_parallel.py`).
* `dense`: every expert on every token with score 0 for the unchosen ones, exactly as HF computes it. It is
  the reference the tests compare against (memory O(E * T * D)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax import sharding
from llama4_jax.config import Llama4Config
from llama4_jax.model.expert_parallel import expert_parallel_moe
from llama4_jax.model.grouped_matmul import grouped_matmul
from llama4_jax.model.layers import MLP, param

MOE_IMPLS = ("dispatch", "dense")


def route(x: jax.Array, router: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits (T, E), chosen experts (T, k) and their scores (T, k).

    Top-k is taken on the raw logits; the score is sigmoid(logit) in float32, cast back to x.dtype
    (no softmax, no renormalisation).
    """
    logits = x @ router.astype(x.dtype)
    top_logits, top_experts = jax.lax.top_k(logits, top_k)
    scores = jax.nn.sigmoid(top_logits.astype(jnp.float32)).astype(x.dtype)
    return logits, top_experts, scores


class Experts(nnx.Module):
    """Routed expert weights. gate_up_proj is HF's fused (E, D, 2F) viewed as (E, D, 2, F): gate first, then
    up, so tensor parallelism can shard F without splitting a gate from its up."""

    def __init__(self, config: Llama4Config, *, rngs: nnx.Rngs, param_dtype: jnp.dtype):
        e, d, f = config.num_local_experts, config.hidden_size, config.intermediate_size
        std = config.initializer_range
        # "expert_embed", not "embed": the rules shard other weights' embed dim over the expert axis too, and
        # expert weights already use that axis for their expert dim.
        self.gate_up_proj = param(rngs, (e, d, 2, f), ("exp", "expert_embed", None, "mlp"), std=std,
                                  dtype=param_dtype)
        self.down_proj = param(rngs, (e, f, d), ("exp", "mlp", "expert_embed"), std=std, dtype=param_dtype)

    def dispatched(self, x: jax.Array, top_experts: jax.Array, scores: jax.Array, backend: str | None) -> jax.Array:
        """Sum over the chosen experts of expert_e(score_e * x), computing only chosen (token, expert) pairs."""
        t, d = x.shape
        k = top_experts.shape[1]
        num_experts = self.gate_up_proj.shape[0]
        flat_experts = top_experts.reshape(-1)  # (A,) assignment a = token * k + slot
        order = jnp.argsort(flat_experts, stable=True)
        group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
        sorted_x = x[order // k] * scores.reshape(-1)[order][:, None]  # the score scales the expert INPUT
        y = self._swiglu(sorted_x, group_sizes, backend)
        unsorted = jnp.zeros((t * k, d), y.dtype).at[order].set(y, unique_indices=True)
        return unsorted.reshape(t, k, d).sum(axis=1)

    def _swiglu(self, sorted_x: jax.Array, group_sizes: jax.Array, backend: str | None) -> jax.Array:
        dtype = sorted_x.dtype
        e, d, _, f = self.gate_up_proj.shape
        gate_up = self.gate_up_proj[...].astype(dtype).reshape(e, d, 2 * f)
        h = grouped_matmul(sorted_x, gate_up, group_sizes, backend=backend)
        gate, up = h[:, :f], h[:, f:]
        return grouped_matmul(up * jax.nn.silu(gate), self.down_proj[...].astype(dtype), group_sizes,
                              backend=backend)

    def dense(self, x: jax.Array, top_experts: jax.Array, scores: jax.Array) -> jax.Array:
        """Reference: all experts on all tokens, unchosen ones with input scaled by 0 (HF's computation)."""
        num_experts = self.gate_up_proj.shape[0]
        dtype = x.dtype
        full_scores = jnp.zeros((x.shape[0], num_experts), dtype)
        full_scores = full_scores.at[jnp.arange(x.shape[0])[:, None], top_experts].set(scores)
        xe = jnp.einsum("TD,TE->ETD", x, full_scores)
        h = jnp.einsum("ETD,EDCF->ETCF", xe, self.gate_up_proj[...].astype(dtype))
        act = h[:, :, 1] * jax.nn.silu(h[:, :, 0])
        return jnp.einsum("ETF,EFD->TD", act, self.down_proj[...].astype(dtype))


def router_stats(logits: jax.Array, top_experts: jax.Array) -> dict[str, jax.Array]:
    """Per-layer router metrics, and the auxiliary losses the trainer may weight (off by default, so the
    forward stays exactly Llama 4): Switch-style load balance E * sum_e f_e * p_e, and router z-loss."""
    num_experts = logits.shape[-1]
    load = jnp.zeros((num_experts,), jnp.float32).at[top_experts.reshape(-1)].add(1.0)
    logits32 = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits32, axis=-1).mean(axis=0)
    fraction = load / top_experts.size
    return {
        "expert_load": load,
        "load_balance_loss": num_experts * jnp.sum(fraction * probs),
        "router_z_loss": jnp.mean(jax.nn.logsumexp(logits32, axis=-1) ** 2),
    }


class MoE(nnx.Module):
    """Routed experts + shared expert (width intermediate_size, unscaled input, always on)."""

    def __init__(self, config: Llama4Config, *, rngs: nnx.Rngs, param_dtype: jnp.dtype):
        self.top_k = config.num_experts_per_tok
        self.router = param(rngs, (config.hidden_size, config.num_local_experts), ("embed", None),
                            std=config.initializer_range, dtype=param_dtype)
        self.experts = Experts(config, rngs=rngs, param_dtype=param_dtype)
        self.shared_expert = MLP(config.hidden_size, config.intermediate_size, rngs=rngs,
                                 std=config.initializer_range, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, *, impl: str = "dispatch", backend: str | None = None,
                 capacity_factor: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: (B, T, D) -> (B, T, D) and router stats (expert_load (E,), dropped_tokens, aux losses).

        Under a sharding context (`llama4_jax.sharding.use_sharding`) the routed experts run expert-parallel;
        `capacity_factor` (None = dropless) applies there.
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        with jax.named_scope("moe"):
            logits, top_experts, scores = route(x, self.router[...], self.top_k)
            dropped = jnp.zeros((), jnp.int32)
            if impl == "dense":
                routed = self.experts.dense(x, top_experts, scores)
            elif impl != "dispatch":
                raise ValueError(f"moe impl must be one of {MOE_IMPLS}, got {impl!r}")
            elif sharding.current() is not None:
                mesh, rules = sharding.current()
                routed, dropped = expert_parallel_moe(
                    x, top_experts, scores, self.experts.gate_up_proj[...], self.experts.down_proj[...],
                    mesh=mesh, rules=rules, capacity_factor=capacity_factor, backend=backend)
            else:
                routed = self.experts.dispatched(x, top_experts, scores, backend)
            stats = {**router_stats(logits, top_experts), "dropped_tokens": dropped}
            return (self.shared_expert(x) + routed).reshape(shape), stats
