"""The training loop: sharded-from-birth state, a jitted donated step, Orbax checkpoints with exact resume,
preemption handling, metrics and evaluation."""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import time

import jax
import numpy as np
from flax import nnx

from llama4_jax import distributed
from llama4_jax.counting import training_flops_per_token
from llama4_jax.sharding import make_mesh, use_sharding
from llama4_jax.train import multimodal
from llama4_jax.train.checkpointing import TrainCheckpoints, abstract_like, experiment_json
from llama4_jax.train.metrics import MetricsWriter, peak_flops
from llama4_jax.train.optim import learning_rate_schedule
from llama4_jax.train.step import (
    abstract_train_state,
    make_eval_step,
    make_train_step,
    model_factory,
    step_shardings,
)


@dataclasses.dataclass
class TrainResult:
    workdir: pathlib.Path
    step: int  # optimizer steps completed
    losses: list[float]  # training loss of every step run by this call
    preempted: bool = False
    plot: pathlib.Path | None = None

    @property
    def checkpoints(self) -> pathlib.Path:
        return self.workdir / "checkpoints"

    @property
    def metrics(self) -> pathlib.Path:
        return self.workdir / "metrics.jsonl"


class _Preemption:
    """SIGTERM (how TPU VMs and schedulers announce preemption) sets a flag the loop checks every step."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


def _tokenizer(experiment):
    from llama4_jax.data import check_vocab, load_tokenizer

    tokenizer = load_tokenizer(experiment.data)
    check_vocab(tokenizer, experiment.model.vocab_size)
    return tokenizer


def _data(experiment, split: str):
    from llama4_jax.data import make_iterator

    tokenizer = _tokenizer(experiment)
    train = experiment.train
    if experiment.vision is not None:  # image+text records (data/image_text.py)
        from llama4_jax.data.image_text import make_image_text_iterator

        return make_image_text_iterator(
            experiment.data, experiment.vision, split=split, seq_len=train.seq_len, batch_size=train.batch_size,
            process_index=jax.process_index(), process_count=jax.process_count(), tokenizer=tokenizer,
            image_token_index=experiment.image_token_index, vocab_size=experiment.model.vocab_size)
    return make_iterator(experiment.data, split=split, seq_len=train.seq_len, batch_size=train.batch_size,
                         process_index=jax.process_index(), process_count=jax.process_count(), tokenizer=tokenizer)


class Trainer:
    """Builds everything a run needs (raising on bad input before any work), then `run()`s it."""

    def __init__(self, experiment, workdir: str | pathlib.Path):
        distributed.initialize()
        self.experiment, self.train = experiment, experiment.train
        self.workdir = pathlib.Path(workdir)
        self.mesh = make_mesh(experiment.mesh)
        self.train_iter = _data(experiment, "train")
        self.graphdef, abstract_params, self.tx = abstract_train_state(experiment)
        self.shardings = step_shardings(abstract_params, self.tx, self.mesh) if experiment.vision is None else \
            multimodal.multimodal_step_shardings(abstract_params, self.tx, self.mesh, self.train)
        self.meta = {"experiment": experiment_json(experiment)}
        self.checkpoints = TrainCheckpoints(self.workdir / "checkpoints", keep=self.train.keep_checkpoints)
        self.distiller = self._distiller()
        self.params, self.opt_state, self.step = self._initial_state()
        step = make_train_step(self.graphdef, self.tx, self.train) if self.distiller is None else self.distiller.step_fn
        if experiment.vision is not None:  # vision and distill exclude each other (ExperimentConfig)
            step = multimodal.make_multimodal_train_step(self.graphdef, self.tx, self.train)
        outs = (self.shardings.params, self.shardings.opt_state, None)
        self.step_fn = jax.jit(step, out_shardings=outs, donate_argnums=(0, 1))
        self.on_policy_fn = None  # on-policy distillation: the student's own samples, scored by the teacher
        if self.distiller is not None and self.distiller.on_policy_step_fn is not None:
            self.on_policy_fn = jax.jit(self.distiller.on_policy_step_fn, out_shardings=outs, donate_argnums=(0, 1))
        self.eval_fn = jax.jit(make_eval_step(self.graphdef, self.train) if experiment.vision is None else
                               multimodal.make_multimodal_eval_step(self.graphdef, self.train))
        self.writer = MetricsWriter(self.workdir, enabled=jax.process_index() == 0)
        self.schedule = learning_rate_schedule(experiment.optim, self.train.steps)

    def _distiller(self):
        """The teacher or target cache, checked against this run before any step (None without distillation)."""
        if self.experiment.distill is None:
            return None
        from llama4_jax.distill.runner import Distiller

        first = next(_data(self.experiment, "train")) if self.experiment.distill.targets == "cache" else None
        return Distiller(self.experiment, self.mesh, self.graphdef, self.tx, _tokenizer(self.experiment),
                         first_batch=first)

    def _initial_state(self):
        """The latest checkpoint restored onto this mesh; else pretrained weights (train.init_checkpoint); else
        fresh parameters sharded from birth. No path builds a parameter it then throws away."""
        factory = model_factory(self.experiment.model_config, self.train, seed=self.train.seed)
        init = self.tx.init if self.experiment.vision is None else \
            (lambda p: multimodal.init_opt_state(self.tx, p, self.train))  # the trainable part only
        latest = self.checkpoints.latest_step()
        with jax.set_mesh(self.mesh):
            if latest is None and self.train.init_checkpoint:  # a fresh run from pretrained weights
                if self.experiment.vision is not None:
                    raise ValueError("train.init_checkpoint is not supported with a vision tower yet")
                from llama4_jax.distill.teacher import load_pretrained

                params = load_pretrained(self.experiment, self.train.init_checkpoint, self.mesh)
                return params, jax.jit(init, out_shardings=self.shardings.opt_state)(params), 0
            if latest is None:
                params = jax.jit(lambda: nnx.state(factory(), nnx.Param), out_shardings=self.shardings.params)()
                return params, jax.jit(init, out_shardings=self.shardings.opt_state)(params), 0
        params = nnx.state(nnx.eval_shape(factory), nnx.Param)
        opt_state = jax.eval_shape(init, params)
        self.checkpoints.check_compatible(latest, self.meta)
        restored = self.checkpoints.restore(latest, abstract_like(params, self.shardings.params),
                                            abstract_like(opt_state, self.shardings.opt_state), self.train_iter)
        if self.distiller is not None:
            self.distiller.load_state(restored["meta"].get("distill_state"))
        return restored["params"], restored["opt_state"], latest

    def _save(self, *, force: bool = False) -> None:
        if self.checkpoints.latest_step() == self.step:  # e.g. preempted right after a scheduled save
            return
        meta = {**self.meta, "step": self.step}
        if self.distiller is not None:
            meta["distill_state"] = self.distiller.state()
        self.checkpoints.save(self.step, self.params, self.opt_state, self.train_iter, meta, force=force)

    def evaluate(self) -> dict[str, float]:
        """Held-out loss and accuracy over `eval_batches` batches (the same ones every time)."""
        totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
        iterator = _data(self.experiment, "eval")
        for _ in range(self.train.eval_batches):
            batch = distributed.global_batch(next(iterator), self.mesh, self.train.batch_size)
            with use_sharding(self.mesh):
                out = self.eval_fn(self.params, batch)
            for k in totals:
                totals[k] += float(out[k])
        tokens = max(totals["tokens"], 1.0)
        return {"eval/loss": totals["loss_sum"] / tokens, "eval/accuracy": totals["correct"] / tokens}

    def _log(self, metrics, seconds: float, steps: int, window_losses: list[float]) -> dict[str, float]:
        tokens = self.train.batch_size * self.train.seq_len * steps
        scalars = {
            # Mean over the steps since the last log: a single step's loss is too noisy to read.
            # On-policy distillation steps (NaN here) train on the student's own samples, not on the data.
            "train/loss": float(np.nanmean(window_losses)) if not np.all(np.isnan(window_losses)) else float("nan"),
            "train/objective": metrics["objective"], "train/accuracy": metrics["accuracy"],
            "train/grad_norm": metrics["grad_norm"], "train/lr": float(self.schedule(self.step - 1)),
            "train/skipped_steps": metrics["skipped_steps"], "perf/tokens_per_second": tokens / seconds,
        }
        peak = peak_flops(jax.devices()[0].device_kind)
        if peak:
            flops = training_flops_per_token(self.experiment.model, self.train.seq_len) * tokens / seconds
            scalars["perf/mfu"] = flops / (peak * jax.device_count())
        for name in ("soft", "kl", "teacher_ce", "alpha", "disagree"):
            if name in metrics:  # distillation: per-token means of the step
                scalars[f"distill/{name}"] = float(metrics[name])
        if "expert_load" in metrics:
            load = np.asarray(metrics["expert_load"])  # (moe layers, experts)
            scalars["moe/max_load_over_mean"] = float((load.max(-1) / load.mean(-1)).mean())
            scalars["moe/dropped_tokens"] = float(metrics["dropped_tokens"])
        self.writer.write(self.step, scalars)
        return scalars

    def run(self, *, progress: bool = True) -> TrainResult:
        from tqdm import tqdm

        losses, preemption = [], _Preemption()
        bar = tqdm(total=self.train.steps, initial=self.step, disable=not progress or jax.process_index() != 0,
                   desc="train", unit="step")
        last_log, last_step = time.perf_counter(), self.step
        try:
            while self.step < self.train.steps:
                local = next(self.train_iter)
                step_fn, extra = self.step_fn, ()
                if self.distiller is not None:
                    local, extra = self.distiller.attach_targets(local), self.distiller.step_args(self.step)
                    if self.distiller.on_policy(self.step):
                        step_fn, extra = self.on_policy_fn, (*extra, self.distiller.rollout_key(self.step))
                batch = distributed.global_batch(local, self.mesh, self.train.batch_size)
                with use_sharding(self.mesh):
                    self.params, self.opt_state, metrics = step_fn(self.params, self.opt_state, batch, *extra)
                metrics = jax.device_get(metrics)
                if self.distiller is not None:
                    on_policy = step_fn is self.on_policy_fn
                    self.distiller.after_step(metrics, self.step, on_policy=on_policy)
                    if on_policy:  # logged apart: their loss is on the student's own samples
                        self.writer.write(self.step + 1, {f"distill/on_policy/{k}": float(metrics[k])
                                                          for k in ("kl", "soft", "tokens")})
                        metrics = {**metrics, "loss": float("nan")}
                self.step += 1
                losses.append(float(metrics["loss"]))
                bar.update(1)
                if int(metrics["consecutive_skipped"]) >= self.experiment.optim.max_consecutive_nonfinite:
                    raise FloatingPointError(f"step {self.step}: {int(metrics['consecutive_skipped'])} consecutive "
                                             "steps with NaN/Inf gradients; stopping (the last checkpoint is intact)")
                if self.step % self.train.log_every == 0 or self.step == self.train.steps:
                    now = time.perf_counter()
                    scalars = self._log(metrics, now - last_log, self.step - last_step,
                                        losses[-(self.step - last_step):])
                    bar.set_postfix(loss=f"{scalars['train/loss']:.3f}")
                    last_log, last_step = now, self.step
                if self.step % self.train.eval_every == 0 or self.step == self.train.steps:
                    self.writer.write(self.step, self.evaluate())
                if self.step % self.train.checkpoint_every == 0 or self.step == self.train.steps:
                    self._save()
                if preemption.requested:
                    self._save(force=True)
                    return TrainResult(self.workdir, self.step, losses, preempted=True)
            return TrainResult(self.workdir, self.step, losses, plot=self.writer.plot(self.workdir / "loss.png"))
        finally:
            preemption.restore()
            bar.close()
            self.checkpoints.close()
            self.writer.close()


def train(experiment, workdir: str | pathlib.Path, *, progress: bool = True) -> TrainResult:
    return Trainer(experiment, workdir).run(progress=progress)
