"""Meshes on 8 fake CPU devices: sharded logits and gradients equal single-device ones; parameter and
activation shardings follow the rules; expert parallelism equals the dense reference; bad configs raise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llama4_jax import TINY_MAVERICK, TINY_SCOUT, Llama4ForCausalLM
from llama4_jax.model.moe import MoE
from llama4_jax.sharding import (
    TRAIN_RULES,
    MeshConfig,
    init_sharded,
    logical_to_spec,
    make_mesh,
    state_shardings,
    use_sharding,
)

# float32. Logits: max |diff| relative to max |ref|. Gradients: ||diff||_2 / ||ref||_2 — elementwise maxima of
# float32 gradients through 8 layers carry ~1e-5 of reduction-order noise on a few elements: against a
# float64 run, the single-device and the sharded float32 gradients are each off by 5e-6..1e-5 (max-relative),
# so their max-relative difference is not a property of the sharding.
RTOL = 1e-5
MESHES = {
    "fsdp8": MeshConfig(fsdp=8),
    "data2_fsdp2_tensor2": MeshConfig(data=2, fsdp=2, tensor=2),
    "expert4_fsdp2": MeshConfig(expert=4, fsdp=2),
    "expert8": MeshConfig(expert=8, fsdp=1),
}
CONFIG = TINY_SCOUT.replace(num_local_experts=8, num_hidden_layers=8, initializer_range=0.3)
TOKENS = (8, 16)  # batch divides every mesh's data-like axes


def _close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=RTOL * float(np.abs(b).max()))


def _loss_and_grads(model, ids):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(ids)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("config", [CONFIG, TINY_MAVERICK.replace(num_local_experts=8, initializer_range=0.3)],
                         ids=["scout", "maverick"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_logits_and_grads_equal_single_device(mesh_name, config):
    model = Llama4ForCausalLM(config, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, TOKENS), jnp.int32)
    (ref_loss, ref_logits), ref_grads = jax.jit(_loss_and_grads)(model, ids)

    mesh = make_mesh(MESHES[mesh_name])
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh))
    sharded = nnx.merge(graphdef, state)
    batch = NamedSharding(mesh, logical_to_spec(("batch", "length"), TRAIN_RULES))
    with use_sharding(mesh):
        (loss, logits), grads = jax.jit(_loss_and_grads)(sharded, jax.device_put(ids, batch))

    _close(loss, ref_loss)
    _close(logits, ref_logits)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        assert np.linalg.norm(g - r) <= RTOL * np.linalg.norm(r)
    # Activations follow the rules: logits are (batch, length, vocab) over (data+fsdp+expert, -, tensor).
    expected = NamedSharding(mesh, P(("data", "fsdp", "expert"), None, "tensor"))
    assert logits.sharding.is_equivalent_to(expected, 3)


def test_parameters_sharded_from_birth_follow_the_rules():
    mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2, fsdp=1))
    model = init_sharded(lambda: Llama4ForCausalLM(CONFIG, rngs=nnx.Rngs(0)), mesh)
    layer = model.model.blocks.layers[0]
    expected = {
        "embed": (model.model.embed_tokens, P("tensor", ("fsdp", "expert"))),
        "gate_up": (layer.feed_forward.experts.gate_up_proj, P(None, "expert", "fsdp", None, "tensor")),
        "down": (layer.feed_forward.experts.down_proj, P(None, "expert", "tensor", "fsdp")),
        "q": (layer.self_attn.q_proj, P(None, ("fsdp", "expert"), "tensor", None)),
        "o": (layer.self_attn.o_proj, P(None, "tensor", None, ("fsdp", "expert"))),
        "router": (layer.feed_forward.router, P(None, ("fsdp", "expert"), None)),
        "norm": (layer.input_layernorm.weight, P(None, None)),
        "lm_head": (model.lm_head, P(("fsdp", "expert"), "tensor")),
    }
    for name, (variable, spec) in expected.items():
        assert variable[...].sharding.spec == spec, name
    eager = Llama4ForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(eager))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _expected_drops(top_experts, shards, ranks, experts_per_rank, capacity):
    """Keep-mask of assignments: within each (token shard, destination rank), the first `capacity` in
    expert order survive (the dispatch sorts stably by expert)."""
    t, k = top_experts.shape
    keep = np.ones(t * k, bool)
    per_shard = t // shards
    for s in range(shards):
        flat = top_experts[s * per_shard:(s + 1) * per_shard].reshape(-1)
        order = np.argsort(flat, kind="stable")
        for rank in range(ranks):
            chosen = [i for i in order if flat[i] // experts_per_rank == rank]
            for i in chosen[capacity:]:
                keep[s * per_shard * k + i] = False
    return keep.reshape(t, k)


@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
@pytest.mark.parametrize("top_k", [1, 2])
def test_expert_parallel_moe_equals_dense_reference(capacity_factor, top_k):
    config = CONFIG.replace(num_experts_per_tok=top_k)
    moe = MoE(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (8, 12, config.hidden_size))
    mesh = make_mesh(MeshConfig(expert=4, fsdp=2))
    graphdef, state = nnx.split(moe)
    sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    with use_sharding(mesh):
        y, stats = jax.jit(lambda m, x: m(x, capacity_factor=capacity_factor))(sharded, x)

    from llama4_jax.model.moe import route

    flat = x.reshape(-1, config.hidden_size)
    _, top_experts, scores = route(flat, moe.router[...], top_k)
    assignments_per_shard = flat.shape[0] // 8 * top_k
    capacity = assignments_per_shard if capacity_factor is None else int(
        np.ceil(capacity_factor * assignments_per_shard / 4))
    keep = _expected_drops(np.asarray(top_experts), 8, 4, config.num_local_experts // 4, capacity)
    ref = moe.experts.dense(flat, top_experts, jnp.where(keep, scores, 0)) + moe.shared_expert(flat)
    _close(y.reshape(-1, config.hidden_size), ref)
    assert int(stats["dropped_tokens"]) == int((~keep).sum())
    if capacity_factor == 0.5:
        assert int(stats["dropped_tokens"]) > 0  # the case must actually drop something


def test_dropped_tokens_reach_the_model_aux_output():
    mesh = make_mesh(MeshConfig(expert=8, fsdp=1))
    config = CONFIG
    model = Llama4ForCausalLM(config, rngs=nnx.Rngs(0), capacity_factor=0.5)
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    ids = jnp.zeros(TOKENS, jnp.int32).at[:, ::2].set(7)
    with use_sharding(mesh):
        _, aux = jax.jit(lambda m, x: m(x, return_aux=True))(model, ids)
    assert aux["dropped_tokens"].shape == (config.num_hidden_layers,)
    assert aux["expert_load"].shape == (config.num_hidden_layers, config.num_local_experts)
    assert int(aux["dropped_tokens"].sum()) > 0
    np.testing.assert_array_equal(aux["expert_load"].sum(-1), np.prod(TOKENS) * config.num_experts_per_tok)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: make_mesh(MeshConfig(data=3, fsdp=1)), "devices"),
        (lambda: make_mesh(MeshConfig(data=2, fsdp=-1, tensor=-1)), "at most one"),
        (lambda: logical_to_spec(("embed", "nope"), TRAIN_RULES), "nope"),
        (lambda: logical_to_spec(("embed", "mlp"), (("embed", "fsdp"), ("mlp", "fsdp"))), "both map"),
        (lambda: use_sharding(None, (("embed", "fsdp_typo"),)).__enter__(), "fsdp_typo"),
        (lambda: init_sharded(lambda: Llama4ForCausalLM(TINY_SCOUT, rngs=nnx.Rngs(0)),
                              make_mesh(MeshConfig(expert=8, fsdp=1))), "divisible"),
        (lambda: init_sharded(lambda: Llama4ForCausalLM(TINY_SCOUT, rngs=nnx.Rngs(0)),
                              make_mesh(MeshConfig(tensor=8, fsdp=1))), "divisible"),
    ],
    ids=["size", "two_fills", "unknown_logical", "collision", "unknown_mesh_axis", "experts", "heads"],
)
def test_bad_mesh_configs_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()
