"""Routed experts under a mesh: tokens travel to the devices that own their experts and back.

Runs inside `jax.shard_map` over the whole mesh, with specs from the sharding rules. With the training rules,
per device:
  x (T_l, D) local tokens (batch is split over data, fsdp and expert), their chosen experts and scores;
  gate_up (E_l, D/fsdp, 2, F/tensor), down (E_l, F/tensor, D/fsdp) local expert weights.
1. FSDP: all-gather the expert weights over "fsdp" (their gradients reduce-scatter back).
2. Assignments (token, expert) are sorted by expert and packed into a send buffer (P, C, D) with one slot
   range per destination rank of the "expert" axis (P ranks; rank j owns experts j*E_l .. (j+1)*E_l - 1).
3. all_to_all over "expert"; received rows are grouped by local expert and run through `grouped_matmul`
   on this rank's F slice; all_to_all back; per-token sum over the k choices; psum over "tensor"
   (each tensor rank computed a partial sum over its F slice).
Capacity C: dropless by default (C = all local assignments, the worst case of every token choosing this
rank), or ceil(capacity_factor * A / P) with overflow dropped and counted.

Legend: T tokens, D model, E experts, F expert width, A assignments (T*k), P expert-parallel ranks, C capacity.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from llama4_jax.model.grouped_matmul import grouped_matmul
from llama4_jax.sharding import Rules, as_tuple, logical_to_spec

GATE_UP_AXES = ("exp", "expert_embed", None, "mlp")
DOWN_AXES = ("exp", "mlp", "expert_embed")


def _capacity(assignments: int, ranks: int, capacity_factor: float | None) -> int:
    if capacity_factor is None:
        return assignments
    return max(1, min(assignments, math.ceil(capacity_factor * assignments / ranks)))


def _pack(x, top_experts, scores, experts_per_rank, ranks, capacity):
    """Send buffer (P, C, D) of score-scaled rows, their local expert ids (P, C) (-1 = empty slot), and each
    assignment's (rank, slot) with a kept flag so results can be brought back."""
    t, k = top_experts.shape
    flat = top_experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sorted_experts = flat[order]
    dest = sorted_experts // experts_per_rank
    counts = jnp.bincount(dest, length=ranks)
    starts = jnp.cumsum(counts) - counts
    slot = jnp.arange(t * k) - starts[dest]
    kept = slot < capacity
    rows = x[order // k] * scores.reshape(-1)[order][:, None]  # the score scales the expert INPUT
    safe_slot = jnp.where(kept, slot, capacity)  # dropped rows land in an overflow slot that is cut off
    buffer = jnp.zeros((ranks, capacity + 1, x.shape[1]), x.dtype).at[dest, safe_slot].set(rows)
    ids = jnp.full((ranks, capacity + 1), -1, jnp.int32).at[dest, safe_slot].set(
        (sorted_experts % experts_per_rank).astype(jnp.int32))
    return buffer[:, :capacity], ids[:, :capacity], (order, dest, safe_slot, kept)


def _local_experts(rows, ids, gate_up, down, backend):
    """Run received rows (R, D) through their local experts; ids (R,) in [0, E_l) or -1 for empty slots."""
    num_local = gate_up.shape[0]
    key = jnp.where(ids < 0, num_local, ids)  # empty slots sort last and fall outside every group
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
    e, d, _, f = gate_up.shape
    h = grouped_matmul(rows[order], gate_up.reshape(e, d, 2 * f), group_sizes, backend=backend)
    y = grouped_matmul(h[:, f:] * jax.nn.silu(h[:, :f]), down, group_sizes, backend=backend)
    return jnp.zeros_like(y).at[order].set(y, unique_indices=True)


@dataclasses.dataclass(frozen=True)
class MoEAxes:
    """Mesh axes the routed experts use, read from the sharding rules (so shard_map specs match the table)."""

    expert: str | None  # rule for "exp"
    fsdp: tuple[str, ...]  # rule for "expert_embed": expert weights are gathered over these
    tensor: tuple[str, ...]  # rule for "mlp": partial sums over the F slices
    tokens: tuple[str, ...]  # rule for "batch"

    @classmethod
    def from_rules(cls, rules: Rules) -> MoEAxes:
        table = dict(rules)
        expert = as_tuple(table.get("exp"))
        if len(expert) > 1:
            raise ValueError(f"the 'exp' sharding rule must name at most one mesh axis, got {expert}")
        return cls(expert=expert[0] if expert else None, fsdp=as_tuple(table.get("expert_embed")),
                   tensor=as_tuple(table.get("mlp")), tokens=as_tuple(table.get("batch")))


def _shard_body(x, top_experts, scores, gate_up, down, *, axes: MoEAxes, capacity_factor, backend):
    ranks = jax.lax.axis_size(axes.expert) if axes.expert else 1
    # Cast before gathering: the gathered copy (and its gradient before the reduce-scatter) is then in the
    # compute dtype, half the bytes of float32 master weights.
    gate_up, down = gate_up.astype(x.dtype), down.astype(x.dtype)
    if axes.fsdp:
        gate_up = jax.lax.all_gather(gate_up, axes.fsdp, axis=1, tiled=True)
        down = jax.lax.all_gather(down, axes.fsdp, axis=2, tiled=True)
    t, k = top_experts.shape
    capacity = _capacity(t * k, ranks, capacity_factor)
    send, ids, (order, dest, slot, kept) = _pack(x, top_experts, scores, gate_up.shape[0], ranks, capacity)
    exchange = (lambda a: jax.lax.all_to_all(a, axes.expert, 0, 0, tiled=True)) if axes.expert else (lambda a: a)
    recv, recv_ids = exchange(send), exchange(ids)
    out = _local_experts(recv.reshape(-1, x.shape[1]), recv_ids.reshape(-1), gate_up, down, backend)
    back = exchange(out.reshape(ranks, capacity, -1))
    per_assignment = jnp.where(kept[:, None], back[dest, jnp.minimum(slot, capacity - 1)], 0)
    y = jnp.zeros((t * k, x.shape[1]), x.dtype).at[order].set(per_assignment, unique_indices=True)
    y = y.reshape(t, k, -1).sum(axis=1)
    if axes.tensor:
        y = jax.lax.psum(y, axes.tensor)
    dropped = jnp.sum(~kept)
    if axes.tokens:
        dropped = jax.lax.psum(dropped, axes.tokens)
    return y, dropped


def expert_parallel_moe(x, top_experts, scores, gate_up, down, *, mesh: Mesh, rules: Rules,
                        capacity_factor: float | None, backend: str | None):
    """Routed-expert output (T, D) and the number of dropped assignments (0 when dropless).

    x: (T, D) tokens sharded by the "batch" rule; top_experts, scores: (T, k); gate_up: (E, D, 2, F);
    down: (E, F, D), sharded by their parameters' logical axes.
    """
    axes = MoEAxes.from_rules(rules)
    if axes.expert and gate_up.shape[0] % mesh.shape[axes.expert]:
        raise ValueError(f"num_local_experts ({gate_up.shape[0]}) must be divisible by the mesh "
                         f"'{axes.expert}' axis ({mesh.shape[axes.expert]}); change the mesh")
    tokens = logical_to_spec(("batch", None), rules)
    body = functools.partial(_shard_body, axes=axes, capacity_factor=capacity_factor, backend=backend)
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(tokens, tokens, tokens, logical_to_spec(GATE_UP_AXES, rules), logical_to_spec(DOWN_AXES, rules)),
        out_specs=(tokens, PartitionSpec()),
        check_vma=False,
    )(x, top_experts, scores, gate_up, down)
