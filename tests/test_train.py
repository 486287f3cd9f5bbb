"""Training: loss falls and follows a stored curve; resume after SIGKILL is bitwise exact; SIGTERM saves and
exits 0; checkpoints restore onto another mesh; gradient accumulation equals a larger batch; bad input is
refused before training starts."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama4_jax.experiment import apply_overrides, load_experiment
from llama4_jax.sharding import MeshConfig, make_mesh
from llama4_jax.train.checkpointing import TrainCheckpoints, abstract_like
from llama4_jax.train.loop import Trainer, train
from llama4_jax.train.step import abstract_train_state, make_train_step, step_shardings

ROOT = pathlib.Path(__file__).parent.parent
CURVE = pathlib.Path(__file__).parent / "data" / "tiny_train_loss_curve.json"
CURVE_RTOL = 1e-3  # float32 on CPU; a numerics change moves these losses by far more


def tiny(**train_changes):
    experiment = load_experiment(ROOT / "experiments" / "tiny_train.py")
    changes = dict(steps=12, log_every=1, eval_every=6, eval_batches=1, checkpoint_every=4)
    changes.update(train_changes)
    return dataclasses.replace(experiment, train=dataclasses.replace(experiment.train, **changes),
                               mesh=MeshConfig(fsdp=-1, data=1))


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_loss_falls_and_matches_stored_curve(tmp_path):
    result = train(tiny(steps=30, eval_every=30, checkpoint_every=30), tmp_path, progress=False)
    losses = result.losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    assert result.plot.exists() and (tmp_path / "tensorboard").is_dir()
    stored = json.loads(CURVE.read_text())
    np.testing.assert_allclose(losses[: len(stored)], stored, rtol=CURVE_RTOL)


# Runs tiny() in a subprocess and signals it: SIGKILL right after the step-`at` checkpoint is complete (a
# crash), or SIGTERM while step `at` runs (a preemption between checkpoints).
_SIGNAL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_train import tiny
from llama4_jax.train import loop
if {sig!r} == "SIGKILL":
    original = loop.Trainer._save
    def save_then_die(self, **kw):
        original(self, **kw)
        if self.step == {at}:
            self.checkpoints.wait()
            os.kill(os.getpid(), signal.SIGKILL)
    loop.Trainer._save = save_then_die
else:
    original, calls = loop.distributed.global_batch, []
    def batch_then_term(*args, **kw):
        calls.append(1)
        if len(calls) == {at}:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kw)
    loop.distributed.global_batch = batch_then_term
result = loop.train(tiny(), {workdir!r}, progress=False)
print("preempted" if result.preempted else "finished", result.step)
"""


def _run_and_signal(workdir, at, sig):
    script = _SIGNAL_SCRIPT.format(tests=str(pathlib.Path(__file__).parent), at=at, sig=sig, workdir=str(workdir))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    straight = train(tiny(), tmp_path / "straight", progress=False)
    killed = _run_and_signal(tmp_path / "resumed", at=8, sig="SIGKILL")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = train(tiny(), tmp_path / "resumed", progress=False)  # picks up the step-8 checkpoint
    assert resumed.step == straight.step == 12 and len(resumed.losses) == 4
    assert resumed.losses == straight.losses[8:]  # bitwise: data order, parameters and optimizer all restored
    a, b = _final_params(tmp_path / "straight"), _final_params(tmp_path / "resumed")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out = _run_and_signal(tmp_path, at=6, sig="SIGTERM")  # during step 6; scheduled checkpoints: 4, 8, 12
    assert out.returncode == 0 and "preempted 6" in out.stdout, out.stderr[-2000:]
    assert TrainCheckpoints(tmp_path / "checkpoints", keep=3).latest_step() == 6


def _final_params(workdir):
    experiment = tiny()
    graphdef, params, tx = abstract_train_state(experiment)
    mesh = make_mesh(experiment.mesh)
    shardings = step_shardings(params, tx, mesh)
    checkpoints = TrainCheckpoints(workdir / "checkpoints", keep=3)
    opt = jax.eval_shape(tx.init, params)
    step = checkpoints.latest_step()
    restored = checkpoints.restore(step, abstract_like(params, shardings.params),
                                   abstract_like(opt, shardings.opt_state))
    checkpoints.close()
    return restored["params"]


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    experiment = tiny(steps=2, checkpoint_every=2, eval_every=2)
    train(dataclasses.replace(experiment, mesh=MeshConfig(fsdp=8)), tmp_path, progress=False)
    graphdef, params, tx = abstract_train_state(experiment)
    values = {}
    for name, mesh_config in {"fsdp8": MeshConfig(fsdp=8), "data2_fsdp4": MeshConfig(data=2, fsdp=4)}.items():
        mesh = make_mesh(mesh_config)
        shardings = step_shardings(params, tx, mesh)
        checkpoints = TrainCheckpoints(tmp_path / "checkpoints", keep=3)
        restored = checkpoints.restore(2, abstract_like(params, shardings.params),
                                       abstract_like(jax.eval_shape(tx.init, params), shardings.opt_state))
        checkpoints.close()
        leaf = restored["params"]["model"]["embed_tokens"].get_value()
        assert leaf.sharding.spec == shardings.params["model"]["embed_tokens"].get_value().spec
        values[name] = jax.tree.map(np.asarray, restored["params"])
    for x, y in zip(jax.tree.leaves(values["fsdp8"]), jax.tree.leaves(values["data2_fsdp4"])):
        np.testing.assert_array_equal(x, y)


def test_gradient_accumulation_equals_larger_batch():
    experiment = tiny()
    graphdef, abstract, tx = abstract_train_state(experiment)
    from llama4_jax.train.step import model_factory

    params = nnx.state(model_factory(experiment.model, experiment.train)(), nnx.Param)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, experiment.model.vocab_size, (8, 33)).astype(np.int32)
    weights = (rng.random((8, 32)) > 0.2).astype(np.float32)  # uneven valid tokens per micro-batch
    batch = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]), "weights": jnp.asarray(weights)}
    results = []
    for accum in (1, 4):
        train_config = dataclasses.replace(experiment.train, grad_accum=accum)
        step = jax.jit(make_train_step(graphdef, tx, train_config))
        new_params, _, metrics = step(params, tx.init(params), batch)
        results.append((new_params, metrics))
    (p1, m1), (p4, m4) = results
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.linalg.norm(x - y) <= 1e-6 * np.linalg.norm(y)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1e-3"], "did you mean optim.lr|did you mean lr"),
        (["train.steps=many"], "expected int"),
        (["data.source=/no/such/corpus.jsonl"], "/no/such/corpus.jsonl"),
        (["data.bpe_vocab_size=1024"], "1024"),
    ],
    ids=["unknown_key", "wrong_type", "missing_dataset", "tokenizer_too_large"],
)
def test_bad_input_is_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        Trainer(apply_overrides(tiny(), overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_incompatible_checkpoint_lists_mismatches_and_is_kept(tmp_path):
    train(tiny(steps=2, checkpoint_every=2, eval_every=2), tmp_path, progress=False)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    wider = dataclasses.replace(tiny(), model=tiny().model.replace(hidden_size=64, num_local_experts=8))
    with pytest.raises(ValueError, match="hidden_size.*\n.*num_local_experts|num_local_experts"):
        Trainer(wider, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path):
    train(tiny(steps=2, checkpoint_every=2, eval_every=2), tmp_path, progress=False)
    arrays = [p for p in (tmp_path / "checkpoints" / "2" / "params").rglob("*") if p.is_file() and p.stat().st_size]
    victim = max(arrays, key=lambda p: p.stat().st_size)
    victim.write_bytes(b"\0" * 16)  # truncated: a disk that filled up, or a copy cut short
    with pytest.raises(ValueError, match="cannot be restored"):
        Trainer(tiny(), tmp_path)
    assert victim.read_bytes() == b"\0" * 16  # nothing deleted or overwritten


def _one_step(experiment, params, batch, **train_changes):
    graphdef, _, tx = abstract_train_state(experiment)
    step = jax.jit(make_train_step(graphdef, tx, dataclasses.replace(experiment.train, **train_changes)))
    return step(params, tx.init(params), batch)


def _params_and_batch(experiment):
    from llama4_jax.train.step import model_factory

    params = nnx.state(model_factory(experiment.model, experiment.train)(), nnx.Param)
    ids = np.random.default_rng(1).integers(0, experiment.model.vocab_size, (8, 33)).astype(np.int32)
    batch = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]), "weights": jnp.ones((8, 32))}
    return params, batch


def test_nonfinite_gradients_skip_the_update_and_are_counted():
    experiment = tiny()
    params, batch = _params_and_batch(experiment)
    params["model"]["norm"]["weight"].set_value(params["model"]["norm"]["weight"][...].at[0].set(jnp.inf))
    new_params, opt_state, metrics = _one_step(experiment, params, batch)
    assert int(metrics["skipped_steps"]) == 1 and int(metrics["consecutive_skipped"]) == 1
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_moe_auxiliary_losses_are_off_by_default_and_weighted_when_on():
    experiment = tiny()
    params, batch = _params_and_batch(experiment)
    _, _, plain = _one_step(experiment, params, batch)
    assert float(plain["objective"]) == float(plain["loss"])  # the default forward is exactly Llama 4
    _, _, weighted = _one_step(experiment, params, batch, load_balance_coef=0.1, router_z_coef=0.01)
    assert float(weighted["objective"]) > float(weighted["loss"]) + 0.1 * 0.9  # load balance >= 1 (E x sum f p)
