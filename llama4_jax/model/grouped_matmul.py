"""Grouped matmul for MoE: rows sorted by expert, each group multiplied by its own weight matrix.

    y[rows of group g] = x[rows of group g] @ w[g]        x: (M, K), w: (G, K, N), group_sizes: (G,)

One entry point, `grouped_matmul`, with a backend chosen per platform:

* "megablox" (TPU default): the Pallas grouped-matmul kernels that ship with JAX (`gmm`, and `tgmm` for the
  weight gradient). Only the useful FLOPs, forward and backward.
* "ragged_dot": `jax.lax.ragged_dot`. Its forward lowers to a grouped kernel on TPU, but its weight gradient
  (a ragged contraction) is dense-expanded there: compiled for v5p, forward+backward costs 17x the useful
  FLOPs with 16 groups. On CPU and GPU (jax 0.10) even the forward is a dense masked matmul (G x).
* "blocked": rows are processed in fixed-size blocks inside while loops whose trip counts are the (dynamic)
  group sizes, so only ceil(size / block) blocks per group run: the useful FLOPs plus at most one partial
  block per group. The backward pass is written by hand (dx is another grouped matmul with w transposed;
  dw is a per-group x^T @ dy), because autodiff cannot differentiate a while loop with a dynamic trip count.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from llama4_jax import sharding

BACKENDS = ("megablox", "ragged_dot", "blocked")


def default_backend() -> str:
    """By the platform the program is built for: the active mesh's devices (a TPU plan compiled on a CPU
    host is a TPU program), else JAX's default backend."""
    ctx = sharding.current()
    platform = ctx[0].devices.flat[0].platform if ctx is not None else jax.default_backend()
    return "megablox" if platform == "tpu" else "blocked"


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, backend: str | None = None) -> jax.Array:
    """(M, K) rows sorted by group, (G, K, N) weights, (G,) int32 sizes summing to at most M -> (M, N).

    Rows past sum(group_sizes) come back as zeros.
    """
    backend = backend or default_backend()
    group_sizes = group_sizes.astype(jnp.int32)
    if backend == "megablox":
        return _megablox_gmm(x, w, group_sizes)
    if backend == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes)
    if backend == "blocked":
        return _blocked_gmm(x, w, group_sizes)
    raise ValueError(f"grouped matmul backend must be one of {BACKENDS}, got {backend!r}")


def _megablox_kernels():
    # The package re-exports a function named `gmm` over its module of the same name; we need the module
    # (its gmm and tgmm kernels, without the package's own VJP).
    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    return (min(512, m), min(1024, k), min(1024, n))


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    return jnp.pad(x, ((0, -(-x.shape[0] // multiple) * multiple - x.shape[0]), (0, 0)))


@jax.custom_vjp
def _megablox_gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return _megablox_fwd(x, w, group_sizes)[0]


def _megablox_fwd(x, w, group_sizes):
    kernels = _megablox_kernels()
    m = x.shape[0]
    tile_m = min(512, -(-m // 8) * 8)  # the kernel tiles rows; padding rows belong to no group
    with _bf16_precision(x.dtype):
        y = kernels.gmm(_pad_rows(x, tile_m), w, group_sizes, x.dtype, _megablox_tiling(tile_m, *w.shape[1:]))
    # Rows in no group are never written by the kernel: make them zero as the other backends do.
    return jnp.where((jnp.arange(m) < jnp.sum(group_sizes))[:, None], y[:m], 0), (x, w, group_sizes)


def _megablox_bwd(residuals, dy):
    """dx = dy @ w[g]^T per group (gmm), dw[g] = x[g]^T @ dy[g] (tgmm): only the useful FLOPs."""
    kernels = _megablox_kernels()
    x, w, group_sizes = residuals
    m = x.shape[0]
    tile_m = min(512, -(-m // 8) * 8)
    x_pad, dy_pad = _pad_rows(x, tile_m), _pad_rows(dy.astype(x.dtype), tile_m)
    with _bf16_precision(x.dtype):
        dx = kernels.gmm(dy_pad, w, group_sizes, x.dtype, _megablox_tiling(tile_m, w.shape[2], w.shape[1]),
                         transpose_rhs=True)[:m]
        dw = kernels.tgmm(x_pad.swapaxes(0, 1), dy_pad, group_sizes, w.dtype,
                          _megablox_tiling(tile_m, *w.shape[1:]), num_actual_groups=w.shape[0])
    dx = jnp.where((jnp.arange(m) < jnp.sum(group_sizes))[:, None], dx, 0)
    return dx, dw, None


_megablox_gmm.defvjp(_megablox_fwd, _megablox_bwd)


def _bf16_precision(dtype):
    """Mosaic rejects a float32-precision contraction of bfloat16 operands, which a process-wide "highest"
    matmul precision (as in parity tests) would request; bf16 x bf16 accumulates in float32 anyway."""
    return jax.default_matmul_precision("default" if dtype == jnp.bfloat16 else None)


def block_rows(num_rows: int, num_groups: int) -> int:
    """Rows per block: a power of two near a quarter of the mean group size, in [8, 128].

    Smaller blocks waste less on each group's last partial block; larger ones run the CPU matmul faster.
    """
    target = max(num_rows // (4 * num_groups), 1)
    return int(min(128, max(8, 1 << (target.bit_length() - 1)), max(num_rows, 1)))


def _group_bounds(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
    ends = jnp.cumsum(group_sizes)
    return ends - group_sizes, ends


def _block_window(start: jax.Array, end: jax.Array, i: jax.Array, block: int, num_rows: int):
    """Row window of block i of a group [start, end): a clipped start and the mask of rows that belong."""
    row0 = start + i * block
    first = jnp.clip(row0, 0, num_rows - block)  # the last block may slide back over the previous group
    rows = first + jnp.arange(block)
    return first, (rows >= row0) & (rows < end)


def _gmm_loop(x: jax.Array, w: jax.Array, group_sizes: jax.Array, transpose_w: bool) -> jax.Array:
    """y = x @ w[g] (or w[g]^T) per group; blocks of one group share one slice of w."""
    num_rows = x.shape[0]
    block = block_rows(num_rows, w.shape[0])
    out_dim = w.shape[1] if transpose_w else w.shape[2]
    starts, ends = _group_bounds(group_sizes)

    def group_body(g, y):
        w_g = w[g].T if transpose_w else w[g]

        def block_body(i, y):
            first, keep = _block_window(starts[g], ends[g], i, block, num_rows)
            x_blk = jax.lax.dynamic_slice_in_dim(x, first, block)
            y_blk = jnp.dot(x_blk, w_g, preferred_element_type=jnp.float32).astype(y.dtype)
            old = jax.lax.dynamic_slice_in_dim(y, first, block)
            return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(keep[:, None], y_blk, old), first, 0)

        return jax.lax.fori_loop(0, (group_sizes[g] + block - 1) // block, block_body, y)

    y = jnp.zeros((num_rows, out_dim), x.dtype)
    return jax.lax.fori_loop(0, w.shape[0], group_body, y)


def _tgmm_loop(x: jax.Array, dy: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """dw[g] = x[group g]^T @ dy[group g], (G, K, N); rows outside the group are zeroed, not skipped."""
    num_rows = x.shape[0]
    num_groups = group_sizes.shape[0]
    block = block_rows(num_rows, num_groups)
    starts, ends = _group_bounds(group_sizes)

    def group_body(g, dw):
        def block_body(i, acc):
            first, keep = _block_window(starts[g], ends[g], i, block, num_rows)
            x_blk = jnp.where(keep[:, None], jax.lax.dynamic_slice_in_dim(x, first, block), 0)
            dy_blk = jax.lax.dynamic_slice_in_dim(dy, first, block)
            return acc + jnp.dot(x_blk.T, dy_blk, preferred_element_type=jnp.float32)

        acc = jnp.zeros(dw.shape[1:], jnp.float32)
        acc = jax.lax.fori_loop(0, (group_sizes[g] + block - 1) // block, block_body, acc)
        return dw.at[g].set(acc.astype(dw.dtype))

    dw = jnp.zeros((num_groups, x.shape[1], dy.shape[1]), dy.dtype)
    return jax.lax.fori_loop(0, num_groups, group_body, dw)


@jax.custom_vjp
def _blocked_gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return _gmm_loop(x, w, group_sizes, transpose_w=False)


def _blocked_gmm_fwd(x, w, group_sizes):
    return _gmm_loop(x, w, group_sizes, transpose_w=False), (x, w, group_sizes)


def _blocked_gmm_bwd(residuals, dy):
    x, w, group_sizes = residuals
    dx = _gmm_loop(dy, w, group_sizes, transpose_w=True).astype(x.dtype)
    dw = _tgmm_loop(x, dy, group_sizes).astype(w.dtype)
    return dx, dw, None


_blocked_gmm.defvjp(_blocked_gmm_fwd, _blocked_gmm_bwd)
