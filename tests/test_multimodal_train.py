"""Training Llama4ForConditionalGeneration through the Trainer on image+text jsonl records, and the convert CLI
on multimodal checkpoints. One text and one vision layer: these check the wiring, and compile in seconds."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama4_jax.cli
from llama4_jax.data import load_tokenizer
from llama4_jax.data.image_text import make_image_text_iterator, write_synthetic_dataset
from llama4_jax.experiment import apply_overrides, load_experiment
from llama4_jax.model.multimodal import merge_image_features
from llama4_jax.train.loop import Trainer, train

BASE = load_experiment("experiments/tiny_multimodal.py")


def _experiment(source, **train):
    e = apply_overrides(BASE, [f"data.source={source}", "data.eval_fraction=0.1"])
    return dataclasses.replace(
        e, model=e.model.replace(num_hidden_layers=1), vision=dataclasses.replace(e.vision, num_hidden_layers=1),
        train=dataclasses.replace(e.train, batch_size=8, seq_len=48, steps=3, eval_every=100, eval_batches=1,
                                  checkpoint_every=100, log_every=1, **train))


def _flat(params) -> dict:
    return {p: np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(params)}


def _changed(before: dict, after: dict) -> set:
    return {p[0] for p in before if not np.array_equal(before[p], after[p])}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("shapes"), 24, seed=1)


def test_frozen_tower_trains_and_resumes(dataset, tmp_path):
    experiment = _experiment(dataset)
    trainer = Trainer(experiment, tmp_path)
    before = _flat(trainer.params)
    result = trainer.run(progress=False)
    after = _flat(trainer.params)
    assert result.step == 3 and all(np.isfinite(result.losses))
    assert _changed(before, after) == {"language_model", "multi_modal_projector"}  # tower bitwise unchanged
    rows = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    assert any("eval/loss" in r for r in rows) and any("train/loss" in r for r in rows)

    # Resume: the checkpoint of step 3 (whole model, trainable-part optimizer state, data position) continues.
    longer = dataclasses.replace(experiment, train=dataclasses.replace(experiment.train, steps=4))
    resumed = Trainer(longer, tmp_path)
    assert resumed.step == 3 and resumed.train_iter.get_state() == trainer.train_iter.get_state()
    restored = _flat(resumed.params)
    assert all(np.array_equal(after[p], restored[p]) for p in after)


def test_trained_tower_changes_with_grad_accum(tmp_path):
    dataset = write_synthetic_dataset(tmp_path / "npy", 12, seed=2, npy=True)  # .npy images
    experiment = _experiment(dataset, train_vision_tower=True, grad_accum=2)
    trainer = Trainer(experiment, tmp_path / "run")
    before = _flat(trainer.params)
    result = trainer.run(progress=False)
    assert all(np.isfinite(result.losses))
    assert _changed(before, _flat(trainer.params)) == {"language_model", "multi_modal_projector", "vision_model"}


def _iterator(source, **data):
    e = apply_overrides(_experiment(source), [f"data.{k}={v}" for k, v in data.items()])
    return make_image_text_iterator(e.data, e.vision, split="train", seq_len=48, batch_size=1, process_index=0,
                                    process_count=1, tokenizer=load_tokenizer(e.data), image_token_index=517,
                                    vocab_size=520)


def test_bad_records_name_the_record_and_file(tmp_path):
    np.save(tmp_path / "rgba.npy", np.zeros((30, 30, 4), np.uint8))
    cases = {"missing": ({"image": "nope.png", "text": "x"}, r"bad\.jsonl:1: image file .*nope\.png does not exist"),
             "channels": ({"image": "rgba.npy", "text": "x"}, r"bad\.jsonl:1: image .*rgba\.npy: expected an RGB"),
             "field": ({"picture": "rgba.npy", "text": "x"}, r"bad\.jsonl:1: expected an object with 'image'")}
    for name, (record, message) in cases.items():
        path = tmp_path / name / "bad.jsonl"
        path.parent.mkdir()
        path.write_text(json.dumps(record).replace("rgba.npy", str(tmp_path / "rgba.npy")) + "\n")
        with pytest.raises(ValueError, match=message):
            next(_iterator(path, eval_fraction=0.0))
    with pytest.raises(ValueError, match="image_token_index"):
        train(dataclasses.replace(_experiment(tmp_path / "missing" / "bad.jsonl"), image_token_index=516),
              tmp_path / "run")


def test_rows_layout_weights_and_tile_slots(dataset):
    batch = next(_iterator(dataset))
    ids, weights = batch["inputs"][0], batch["weights"][0]
    patches = int((ids == 517).sum())
    assert patches % 4 == 0 and 0 < patches <= 5 * 4  # 4 <|patch|> per tile, at most 5 tile slots
    used = np.abs(batch["pixel_values"][0].astype(np.float32)).reshape(5, -1).sum(-1) > 0
    assert used.sum() == patches // 4 and not used[patches // 4:].any()  # padding tiles last, zeros
    targets, real_target = batch["targets"][0], np.append(batch["segment_ids"][0][1:], 0) > 0  # short texts
    assert not weights[targets >= 512].any() and not weights[~real_target].any()
    assert weights[(targets < 512) & real_target].all()


def test_per_example_fusion_ignores_padding_slots():
    embeds = jnp.zeros((2, 5, 1))
    ids = jnp.asarray([[7, 9, 7, 9, 9], [9, 7, 9, 9, 9]])
    features = jnp.arange(1, 7, dtype=jnp.float32).reshape(2, 3, 1)  # 3 slots per example
    out = merge_image_features(embeds, ids, features, 7)[..., 0]
    np.testing.assert_array_equal(out, [[1, 0, 2, 0, 0], [0, 4, 0, 0, 0]])


def test_cli_converts_a_multimodal_checkpoint_both_ways(tmp_path, capsys):
    from llama4_jax import load_hf, save_hf
    from llama4_jax.checkpoint import restore_model
    from llama4_jax.model.multimodal import Llama4ForConditionalGeneration

    config = BASE.model_config
    factory = lambda: Llama4ForConditionalGeneration(config, rngs=nnx.Rngs(3))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(factory))
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(factory()))())
    # Nonzero biases, as in real checkpoints: an all-zero block written by checkpoint.ParamWriter.write_part is
    # not stored and cannot be read back (a pre-existing writer problem, reported, not fixed here).
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "bias" in str(path[-1]):
            variable.set_value(variable.get_value() + 0.5)
    save_hf(model, tmp_path / "hf")
    main = llama4_jax.cli.main
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--multimodal", "--no-progress"]) == 0
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "back"), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("tensors,") == 2
    original = _flat(nnx.state(model, nnx.Param))
    for restored in (restore_model(tmp_path / "ckpt"), load_hf(tmp_path / "back", multimodal=True)):
        assert restored.config == config
        got = _flat(nnx.state(restored, nnx.Param))
        assert got.keys() == original.keys() and all(np.array_equal(original[p], got[p]) for p in original)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == [
        "Llama4ForConditionalGeneration"]
