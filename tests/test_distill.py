"""Distillation: the frozen teacher, the distillation step (single device and sharded), the target cache, and
every refusal of bad input before a step runs. The loss identities themselves are in test_losses.py."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from llama4_jax.distill.cache import CacheWriter, TargetCache, sparse_targets, write_metadata
from llama4_jax.distill.cache_build import build_cache, make_target_fn
from llama4_jax.distill.step import make_distill_step, make_on_policy_step
from llama4_jax.distill.teacher import INFERENCE_RULES, init_teacher, load_teacher
from llama4_jax.experiment import ExperimentConfig, load_experiment
from llama4_jax.sharding import MeshConfig, make_mesh, state_shardings, use_sharding
from llama4_jax.train.loop import Trainer, train
from llama4_jax.train.losses import DistillLossConfig, TopKTargets, distill_loss
from llama4_jax.train.step import abstract_train_state, model_factory

ROOT = pathlib.Path(__file__).parent.parent
DEMO = load_experiment(ROOT / "experiments" / "distill_demo.py")
SHARDED_RTOL = 1e-5  # float32 reduction order under sharding (see test_sharding.py for why norm-wise)


def experiment(steps=3, **distill_changes) -> ExperimentConfig:
    """The demo's student and teacher, shrunk: 8 rows of 32 tokens, float32 everywhere."""
    teacher = DEMO.distill.teacher.replace(hidden_size=96, intermediate_size=64, intermediate_size_mlp=128,
                                           attention_chunk_size=8, floor_scale=4)
    model = DEMO.model.replace(attention_chunk_size=8, floor_scale=4)
    distill = DEMO.distill.replace(**{"teacher": teacher, "teacher_param_dtype": "float32", "chunk": 16,
                                      **distill_changes})
    train_config = dataclasses.replace(DEMO.train, batch_size=8, seq_len=32, steps=steps, log_every=1,
                                       eval_every=steps, eval_batches=1, checkpoint_every=steps)
    return dataclasses.replace(DEMO, model=model, train=train_config, distill=distill,
                               mesh=MeshConfig(fsdp=-1, data=1), data=DEMO.data.replace(eval_fraction=0.05))


def batch(vocab: int, seed: int = 0, shape=(8, 32)):
    ids = jax.random.randint(jax.random.key(seed), (shape[0], shape[1] + 1), 0, vocab, dtype=jnp.int32)
    weights = jnp.ones(shape, jnp.float32).at[0, -5:].set(0.0)  # some padding
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": weights}


def student_state(exp, mesh=None):
    graphdef, _, tx = abstract_train_state(exp)
    params = nnx.state(model_factory(exp.model, exp.train, seed=exp.train.seed)(), nnx.Param)
    if mesh is not None:
        params = jax.device_put(params, state_shardings(params, mesh))
    return graphdef, params, tx, tx.init(params)


def _norm_close(a, b, rtol):
    a, b = [np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)]) for t in (a, b)]
    assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(b), np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def online():
    """One student, one bf16 teacher (never float32: its cast is part of what is tested), one compiled step."""
    exp = experiment(teacher_param_dtype="bfloat16",
                     loss=DistillLossConfig(alpha=0.7, alpha_end=0.7, temperature=2.0))
    mesh = make_mesh(MeshConfig(fsdp=1, data=1), jax.devices()[:1])
    graphdef, params, tx, opt_state = student_state(exp)
    teacher = init_teacher(exp.distill, exp.train, mesh, seed=1)
    step = make_distill_step(graphdef, tx, exp.train, exp.distill, teacher.graphdef)
    return dict(exp=exp, graphdef=graphdef, params=params, tx=tx, opt_state=opt_state, teacher=teacher, step=step,
                jitted=jax.jit(step), data=batch(exp.model.vocab_size))


def test_teacher_stays_bitwise_frozen_and_has_no_optimizer_state(online):
    teacher, params, opt_state = online["teacher"], online["params"], online["opt_state"]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(teacher.params))
    before = jax.tree.map(np.array, teacher.params)
    for i in range(3):
        params, opt_state, metrics = online["jitted"](params, opt_state, batch(online["exp"].model.vocab_size, i),
                                                      teacher.params, i, 0.0)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, teacher.params), before)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(online["params"]), jax.tree.leaves(params)))
    student_elems = sum(x.size for x in jax.tree.leaves(params))
    optimizer_elems = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert optimizer_elems == 2 * student_elems  # AdamW's two moments of the student, nothing of the teacher
    assert float(metrics["kl"]) > 0 and np.isfinite(float(metrics["objective"]))
    np.testing.assert_allclose(float(metrics["alpha"]), 0.7, rtol=1e-6)
    assert float(metrics["teacher_ce"]) > 0 and 0 <= float(metrics["disagree"]) <= 1


def test_sharded_distillation_step_equals_single_device(online):
    """Student on data2 x fsdp2 x tensor2 with the training rules, teacher on the same mesh with the inference
    rules (its weights split over every data-like axis): the step equals the single-device one."""
    ref_params, _, ref = online["jitted"](online["params"], online["opt_state"], online["data"],
                                          online["teacher"].params, 0, 0.0)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    s_params = jax.device_put(online["params"], state_shardings(online["params"], mesh))
    t_params = jax.device_put(online["teacher"].params,
                              state_shardings(online["teacher"].params, mesh, INFERENCE_RULES))
    embed = t_params["model"]["embed_tokens"].get_value().sharding.spec
    assert embed == jax.sharding.PartitionSpec("tensor", ("data", "fsdp", "expert"))
    s_opt = jax.jit(online["tx"].init)(s_params)
    with use_sharding(mesh), jax.set_mesh(mesh):
        new_params, _, got = jax.jit(online["step"])(s_params, s_opt, online["data"], t_params, 0, 0.0)
    for name in ("loss", "kl", "soft", "objective", "teacher_ce"):
        np.testing.assert_allclose(float(got[name]), float(ref[name]), rtol=SHARDED_RTOL, err_msg=name)
    _norm_close(new_params, ref_params, SHARDED_RTOL)


def test_cached_topk_with_k_equal_vocab_is_the_online_step(online):
    exp, teacher, data = online["exp"], online["teacher"], online["data"]
    ids, values = jax.jit(make_target_fn(teacher, "topk", exp.model.vocab_size, chunk=16))(
        teacher.params, data, jax.random.key(0))
    expected = online["jitted"](online["params"], online["opt_state"], data, teacher.params, 0, 0.0)
    cached = jax.jit(make_distill_step(online["graphdef"], online["tx"], exp.train, exp.distill, None, "topk"))(
        online["params"], online["opt_state"], {**data, "target_ids": ids, "target_values": values}, None, 0, 0.0)
    for name in ("objective", "kl", "soft", "teacher_ce"):
        np.testing.assert_allclose(float(cached[2][name]), float(expected[2][name]), rtol=1e-5, err_msg=name)
    _norm_close(cached[0], expected[0], 1e-5)


def test_on_policy_step_trains_on_the_students_samples_only(online):
    """GKD: the student samples the second half of each row; the divergence covers exactly the sampled tokens;
    a student taught by itself gets zero divergence and zero gradient (its own samples, its own distribution)."""
    exp, params = online["exp"], online["params"]
    distill = exp.distill.replace(on_policy_fraction=1.0, on_policy_prompt_len=16)
    student_graphdef = online["graphdef"]
    step = jax.jit(make_on_policy_step(student_graphdef, online["tx"], exp.train, distill, student_graphdef))
    out = step(params, online["opt_state"], online["data"], params, 0, 0.0, jax.random.key(3))
    assert float(out[2]["tokens"]) == 8 * (32 - 16 + 1)  # every row: the sampled tokens, nothing of the prompt
    assert abs(float(out[2]["kl"])) < 1e-6 and float(out[2]["grad_norm"]) < 1e-6
    np.testing.assert_allclose(float(out[2]["alpha"]), 1.0)
    teacher = online["teacher"]
    taught = jax.jit(make_on_policy_step(student_graphdef, online["tx"], exp.train, distill, teacher.graphdef))
    first = taught(params, online["opt_state"], online["data"], teacher.params, 0, 0.0, jax.random.key(3))
    again = taught(params, online["opt_state"], online["data"], teacher.params, 0, 0.0, jax.random.key(3))
    assert float(first[2]["kl"]) > 0 and float(first[2]["grad_norm"]) > 0
    assert float(first[2]["objective"]) == float(again[2]["objective"])  # the key decides the samples


def test_sampled_targets_average_to_the_teacher():
    logits = jax.random.normal(jax.random.key(0), (1, 2, 16)) * 2
    n, reps = 64, 200
    counts = np.zeros((2, 16))
    for r in range(reps):
        ids, c = sparse_targets(logits, "sampled", n, jax.random.key(r))
        np.testing.assert_array_equal(np.asarray(c).sum(-1), n)
        for t in range(2):
            np.add.at(counts[t], np.asarray(ids[0, t]), np.asarray(c[0, t]))
    p = np.asarray(jax.nn.softmax(logits[0], axis=-1))
    estimate = counts / (n * reps)
    stderr = np.sqrt(p * (1 - p) / (n * reps))
    assert np.all(np.abs(estimate - p) <= 5 * stderr + 1e-9), np.abs(estimate - p) / stderr


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A teacher trained for 2 steps by the ordinary trainer: its workdir is a teacher checkpoint."""
    exp = experiment()
    teacher_exp = dataclasses.replace(exp, name="teacher", model=exp.distill.teacher, distill=None,
                                      train=dataclasses.replace(exp.train, steps=2, eval_every=2,
                                                                checkpoint_every=2))
    workdir = tmp_path_factory.mktemp("teacher")
    train(teacher_exp, workdir, progress=False)
    return workdir


def test_online_distillation_run_from_a_training_checkpoint(teacher_run, tmp_path):
    exp = experiment(teacher_checkpoint=str(teacher_run), on_policy_fraction=0.5)
    trainer = Trainer(exp, tmp_path)
    choices = [trainer.distiller.on_policy(s) for s in range(3)]
    assert choices == [trainer.distiller.on_policy(s) for s in range(3)] and len(set(choices)) == 2, choices
    result = trainer.run(progress=False)
    rows = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    assert result.step == 3 and any("distill/kl" in r for r in rows) and any("eval/loss" in r for r in rows)
    loaded = load_teacher(exp.distill, exp.train, make_mesh(exp.mesh))
    manager = ocp.CheckpointManager((teacher_run / "checkpoints").absolute(), item_names=("params",))
    saved = manager.restore(2, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    manager.close()
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_run_starts_from_pretrained_weights(teacher_run, tmp_path):
    """train.init_checkpoint: a fresh run (here of the teacher's shape) starts from the checkpoint's weights,
    in the training sharding; a checkpoint of another shape is refused before any step."""
    exp = experiment()
    pretrained = dataclasses.replace(exp, name="finetune", model=exp.distill.teacher, distill=None,
                                     train=dataclasses.replace(exp.train, init_checkpoint=str(teacher_run)))
    trainer = Trainer(pretrained, tmp_path / "finetune")
    manager = ocp.CheckpointManager((teacher_run / "checkpoints").absolute(), item_names=("params",))
    saved = manager.restore(2, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    manager.close()
    for a, b in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert trainer.step == 0
    trainer.checkpoints.close()
    wrong = dataclasses.replace(pretrained, model=exp.model)
    with pytest.raises(ValueError, match="hidden_size"):
        Trainer(wrong, tmp_path / "wrong")


def test_cache_is_written_read_and_refused_for_other_data(teacher_run, tmp_path):
    exp = experiment(teacher_checkpoint=str(teacher_run))
    cache = build_cache(exp, tmp_path / "cache", fmt="topk", k=8, num_batches=3, progress=False)
    meta = json.loads((cache / "metadata.json").read_text())
    assert meta["records"] == 24 and meta["k"] == 8
    student = dataclasses.replace(exp, distill=exp.distill.replace(targets="cache", cache_dir=str(cache)))
    result = train(student, tmp_path / "student", progress=False)
    assert result.step == 3 and np.isfinite(result.losses).all()

    other_data = dataclasses.replace(student, data=student.data.replace(seed=7))
    with pytest.raises(ValueError, match="data.seed: cache 0, this run 7"):
        Trainer(other_data, tmp_path / "other")
    # A cache whose metadata claims the right data but holds other rows: refused on the first batch.
    (cache / "metadata.json").write_text(json.dumps({**meta, "data": {**meta["data"], "seed": 7}}))
    with pytest.raises(ValueError, match="no targets for batch rows"):
        Trainer(other_data, tmp_path / "other")
    (cache / "metadata.json").write_text(json.dumps(meta))
    longer = dataclasses.replace(student, train=dataclasses.replace(student.train, steps=4))
    with pytest.raises(ValueError, match="coverage"):  # 3 cached batches cannot serve 4 steps
        Trainer(longer, tmp_path / "other")
    meta["tokenizer_fingerprint"] = "0" * 64
    (cache / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokenizer"):
        Trainer(student, tmp_path / "other")


def test_cache_records_and_exact_tail(tmp_path):
    """Records round-trip; a sequence in two shards is served by its first record; the stored tail mass is exact
    where 1 - sum p_K rounds to 0 in float32, so even reverse KL stays finite."""
    logits = jnp.zeros((1, 2, 64)).at[0, :, 0].set(40.0)  # p(0) ~ 1 - 2.7e-16: a float32 tail of exactly 0
    ids, values = sparse_targets(logits, "topk", 4)
    assert np.all(np.asarray(1 - jnp.exp(values[..., :4]).sum(-1)) == 0.0)
    np.testing.assert_allclose(np.asarray(values[0, :, 4]), np.log(60.0) - 40.0, rtol=1e-5)
    for shard, rows in ((0, [0, 1]), (1, [1])):
        writer = CacheWriter(tmp_path, process_index=shard)
        writer.add([bytes([r]) * 16 for r in rows], np.stack([ids[0]] * len(rows)) + np.array(rows)[:, None, None],
                   np.stack([values[0]] * len(rows)))
        writer.close()
    write_metadata(tmp_path, {"format": "topk", "k": 4, "seq_len": 2, "vocab_size": 64})
    cache = TargetCache(tmp_path)
    assert len(cache) == 2
    from llama4_jax.distill import cache as cache_module

    keys = [bytes([1]) * 16, bytes([0]) * 16]
    original = cache_module.sequence_keys
    cache_module.sequence_keys = lambda fingerprint, inputs, targets: keys
    try:
        got_ids, got_values = cache.lookup(np.zeros((2, 2)), np.zeros((2, 2)), "00")
    finally:
        cache_module.sequence_keys = original
    np.testing.assert_array_equal(got_ids, np.stack([ids[0] + 1, ids[0]]))
    np.testing.assert_array_equal(got_values, np.stack([values[0]] * 2))
    student = jax.random.normal(jax.random.key(0), (1, 2, 64))
    loss = distill_loss(lambda h: h, student, TopKTargets(ids, values[..., :4], values[..., 4]),
                        jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)), step=0,
                        config=DistillLossConfig(alpha=1.0, divergence="reverse_kl"))
    assert np.isfinite(float(loss["loss_sum"])) and np.isfinite(float(loss["teacher_ce_sum"]))
    with pytest.raises(ValueError, match="topk_tail"):
        DistillLossConfig(divergence="reverse_kl", topk_tail=False)


def test_teacher_checkpoints_that_do_not_match_their_config_are_refused(teacher_run, tmp_path):
    exp = experiment(teacher_checkpoint=str(teacher_run))
    wrong = dataclasses.replace(exp, distill=exp.distill.replace(teacher=exp.distill.teacher.replace(hidden_size=64)))
    with pytest.raises(ValueError, match="hidden_size"):
        Trainer(wrong, tmp_path / "wrong")
    from llama4_jax import save_hf
    from llama4_jax.checkpoint import save_model

    teacher = load_teacher(exp.distill, exp.train, make_mesh(exp.mesh)).model()
    save_hf(teacher, tmp_path / "hf")
    save_model(teacher, tmp_path / "model")
    for path in (tmp_path / "hf", tmp_path / "model"):
        loaded = load_teacher(exp.distill.replace(teacher_checkpoint=str(path), teacher_param_dtype="bfloat16"),
                              exp.train, make_mesh(exp.mesh))
        for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(nnx.state(teacher, nnx.Param))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16))
        with pytest.raises(ValueError, match="hidden_size"):
            load_teacher(wrong.distill.replace(teacher_checkpoint=str(path)), exp.train, make_mesh(exp.mesh))
    with pytest.raises(ValueError, match="vocab_size"):
        dataclasses.replace(exp, distill=exp.distill.replace(teacher=exp.distill.teacher.replace(vocab_size=1024)))
    with pytest.raises(ValueError, match="neither"):
        load_teacher(exp.distill.replace(teacher_checkpoint=str(tmp_path)), exp.train, make_mesh(exp.mesh))
