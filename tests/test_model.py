"""Model behaviour beyond parity: scan == loop, packed documents, hidden-state output, depth-flat programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama4_jax import TINY_MAVERICK, TINY_SCOUT, Llama4ForCausalLM
from llama4_jax.counting import abstract_model
from llama4_jax.model.transformer import document_positions


def _ids(config, batch, length, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length)), jnp.int32)


def _model(config, **kwargs):
    return Llama4ForCausalLM(config.replace(initializer_range=0.3), rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("config", [TINY_SCOUT, TINY_MAVERICK], ids=["scout", "maverick"])
def test_scanned_and_unscanned_stacks_give_identical_logits(config):
    config = config.replace(num_hidden_layers=12)  # 3 scanned blocks
    scanned = _model(config)
    unscanned = _model(config, scan_layers=False)
    ids = _ids(config, 2, 24)
    a, b = jax.jit(lambda m, x: m(x))(scanned, ids), jax.jit(lambda m, x: m(x))(unscanned, ids)
    assert float(jnp.abs(a).max()) > 1.0
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:  # GPU kernels fuse the loop body and the unrolled layers differently (seen on an H200: ~1e-7)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.abs(b).max()))


def test_document_positions_restart():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 3], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(document_positions(seg),
                                  [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize("config", [TINY_SCOUT, TINY_MAVERICK], ids=["scout", "maverick"])
def test_packed_documents_equal_separate_runs(config):
    """Attention never crosses a document; positions, chunks and temperature restart per document."""
    model = _model(config)
    lengths = [13, 4, 19]  # each crosses chunk boundaries of 8 differently
    docs = [_ids(config, 1, n, seed=i) for i, n in enumerate(lengths)]
    packed = jnp.concatenate(docs, axis=1)
    segment_ids = jnp.concatenate([jnp.full((1, n), i + 1) for i, n in enumerate(lengths)], axis=1)
    packed_logits = model(packed, segment_ids=segment_ids)
    start = 0
    for doc, n in zip(docs, lengths):
        alone = model(doc)
        np.testing.assert_allclose(packed_logits[:, start:start + n], alone, rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(alone).max()))
        start += n


def test_hidden_states_then_logits_equal_logits():
    model = _model(TINY_MAVERICK)
    ids = _ids(TINY_MAVERICK, 2, 16)
    hidden = model(ids, return_hidden_states=True)
    assert hidden.shape == (2, 16, TINY_MAVERICK.hidden_size)
    np.testing.assert_array_equal(np.asarray(model.logits(hidden)), np.asarray(model(ids)))


def test_bfloat16_compute_is_close_to_float32():
    ids = _ids(TINY_SCOUT, 2, 24)
    f32 = _model(TINY_SCOUT)(ids)
    bf16 = _model(TINY_SCOUT, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)(ids)
    assert bf16.dtype == jnp.bfloat16
    assert float(jnp.abs(bf16.astype(jnp.float32) - f32).max()) < 0.1 * float(jnp.abs(f32).max())


def test_public_api_shapes():
    model = Llama4ForCausalLM(TINY_SCOUT, rngs=nnx.Rngs(0))
    logits = model(jnp.zeros((3, 5), jnp.int32))
    assert logits.shape == (3, 5, TINY_SCOUT.vocab_size) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="exactly one"):
        model.model()


def _lowered_op_count(num_layers: int) -> int:
    config = TINY_SCOUT.replace(num_hidden_layers=num_layers)
    model = abstract_model(config, jnp.float32)
    graphdef, state = nnx.split(model)

    def loss(state, ids):
        return jnp.mean(nnx.merge(graphdef, state)(ids))

    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    text = jax.jit(jax.grad(loss)).lower(state, ids).as_text()
    return sum(1 for line in text.splitlines() if "=" in line)


def test_program_size_is_flat_in_depth():
    """The scanned stack lowers to one loop body: 48 layers give (almost) the same program as 4.
    Compile times are measured by tools/bench_model.py."""
    shallow, deep = _lowered_op_count(4), _lowered_op_count(48)
    assert deep <= 1.05 * shallow, (shallow, deep)


@pytest.mark.parametrize("chunk_size", [None, 96])
def test_query_blocked_attention_equals_full_attention(chunk_size):
    """Sequences over two query blocks run blockwise (with remat); values and gradients are unchanged."""
    from llama4_jax.model import attention

    b, t, n, k, h = 1, 3 * attention._QUERY_BLOCK, 4, 2, 8
    q, kk, v = (jax.random.normal(jax.random.key(i), (b, t, heads, h)) for i, heads in enumerate((n, k, k)))
    segment_ids = jnp.zeros((b, t), jnp.int32).at[:, 700:].set(1)
    positions = jnp.where(segment_ids == 0, jnp.arange(t), jnp.arange(t) - 700)
    inputs = attention.AttentionInputs(positions=positions, segment_ids=segment_ids, cos=None, sin=None,
                                       temperature=None)

    def full(q, kk, v):
        mask = attention.attention_masks(positions, segment_ids, chunk_size)[chunk_size is not None]
        return attention._attend(q.reshape(b, t, k, n // k, h), kk, v, mask).reshape(b, t, n, h)

    blocked = lambda q, kk, v: attention.dot_product_attention(q, kk, v, inputs, chunk_size)
    np.testing.assert_allclose(blocked(q, kk, v), full(q, kk, v), rtol=1e-5, atol=1e-6)
    grad = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, kk, v)
    for a, r in zip(grad(blocked), grad(full)):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_gradients(remat):
    ids = _ids(TINY_SCOUT, 2, 16)

    def grads(model):
        graphdef, params = nnx.split(model, nnx.Param)
        return jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(ids) ** 2)))(params)

    plain, rematerialised = grads(_model(TINY_SCOUT)), grads(_model(TINY_SCOUT, remat=remat))
    # Norm-relative, as for sharded gradients (tests/test_sharding.py): on an H200 a few elements of the
    # rematerialised float32 gradient differ by 1.7e-5 of their value (reduction order), none on CPU.
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematerialised)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
