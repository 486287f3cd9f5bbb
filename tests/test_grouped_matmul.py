"""Grouped matmul backends and the dispatched MoE against plain references, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama4_jax import TINY_SCOUT
from llama4_jax.model.grouped_matmul import BACKENDS, block_rows, grouped_matmul
from llama4_jax.model.moe import MoE

RTOL = 1e-5  # float32, composite op


def reference_gmm(x, w, group_sizes):
    ends = np.cumsum(group_sizes)
    group_of_row = np.searchsorted(ends, np.arange(x.shape[0]), side="right")
    valid = np.arange(x.shape[0]) < ends[-1]
    w_rows = w[np.minimum(group_of_row, w.shape[0] - 1)]
    return jnp.where(valid[:, None], jnp.einsum("MK,MKN->MN", x, w_rows), 0.0)


# megablox is a TPU kernel (Mosaic); on TPU targets it is compiled by tests/test_plan.py.
LOCAL_BACKENDS = [b for b in BACKENDS if b != "megablox" or jax.default_backend() == "tpu"]


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("sizes", [[5, 0, 17, 3, 0, 39], [64, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 2]])
def test_grouped_matmul_forward_and_grads(backend, sizes):
    rng = np.random.default_rng(0)
    sizes = np.array(sizes, np.int32)
    m = int(sizes.sum())
    x = jnp.asarray(rng.normal(size=(m, 24)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), 24, 40)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(m, 40)), jnp.float32)

    def loss(fn, x, w):
        return jnp.sum(fn(x, w) * dy)

    ours = lambda x, w: grouped_matmul(x, w, jnp.asarray(sizes), backend=backend)
    ref = lambda x, w: reference_gmm(x, w, sizes)
    np.testing.assert_allclose(jax.jit(ours)(x, w), ref(x, w), rtol=RTOL, atol=RTOL)
    got = jax.jit(jax.grad(lambda x, w: loss(ours, x, w), argnums=(0, 1)))(x, w)
    want = jax.grad(lambda x, w: loss(ref, x, w), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=RTOL * float(jnp.abs(r).max()))


def test_block_rows_is_bounded():
    assert block_rows(2048, 16) == 32
    assert block_rows(5, 16) == 5  # never more rows than exist
    assert block_rows(10**6, 16) == 128


@pytest.mark.parametrize("top_k", [1, 2])
def test_dispatched_moe_equals_dense_reference_with_grads(top_k):
    config = TINY_SCOUT.replace(num_experts_per_tok=top_k, initializer_range=0.2)
    moe = MoE(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (2, 33, config.hidden_size))
    graphdef, params = nnx.split(moe)

    def loss(params, x, impl):
        y, _ = nnx.merge(graphdef, params)(x, impl=impl)
        return jnp.sum(y * jnp.sin(y)), y

    (l_d, y_d), g_d = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)(
        params, x, "dispatch")
    (l_r, y_r), g_r = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x, "dense")
    np.testing.assert_allclose(y_d, y_r, rtol=RTOL, atol=RTOL * float(jnp.abs(y_r).max()))
    for a, b in zip(jax.tree.leaves(g_d), jax.tree.leaves(g_r)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * float(jnp.abs(b).max()))
