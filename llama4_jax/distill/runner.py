"""What a training run needs to distil: the teacher or the cache, the step, and TAID's state between steps.

`Distiller(experiment, mesh, graphdef, tx, tokenizer)` does every check (teacher checkpoint against its config,
cache against tokenizer, sequence length, vocabulary and the first batch) when it is built, before any step.
"""

from __future__ import annotations

import jax
import numpy as np

from llama4_jax.distill.cache import TargetCache, tokenizer_fingerprint
from llama4_jax.distill.step import TARGET_KEYS, make_distill_step, make_on_policy_step
from llama4_jax.distill.teacher import load_teacher
from llama4_jax.train.checkpointing import experiment_json
from llama4_jax.train.losses import SampledTargets, TaidState, TopKTargets, check_targets, taid_update


class Distiller:
    def __init__(self, experiment, mesh, graphdef, tx, tokenizer, *, first_batch=None):
        self.distill, self.train = experiment.distill, experiment.train
        self.loss_config = self.distill.loss_config(self.train.steps)
        self.teacher, self.cache, self.fingerprint = None, None, None
        if self.distill.targets == "online":
            self.teacher = load_teacher(self.distill, self.train, mesh)
            cache_format, teacher_graphdef = None, self.teacher.graphdef
        else:
            self.cache = TargetCache(self.distill.cache_dir)
            self.fingerprint = tokenizer_fingerprint(tokenizer)
            self.cache.check(fingerprint=self.fingerprint, seq_len=self.train.seq_len,
                             vocab_size=experiment.model.vocab_size, data=experiment_json(experiment.data),
                             rows=self.train.steps * self.train.batch_size)
            # The loss must accept this target format (sampled: forward KL at tau 1, no confidence).
            fake = (TopKTargets if self.cache.format == "topk" else SampledTargets)(None, None)
            check_targets(self.loss_config, fake)
            if first_batch is not None:  # the data must be the data the cache was made from
                self.attach_targets(first_batch)
            cache_format, teacher_graphdef = self.cache.format, None
        self.step_fn = make_distill_step(graphdef, tx, self.train, self.distill, teacher_graphdef, cache_format)
        self.on_policy_step_fn = None
        if self.distill.on_policy_fraction > 0:
            self.on_policy_step_fn = make_on_policy_step(graphdef, tx, self.train, self.distill, teacher_graphdef)
        self.taid = TaidState.init(self.loss_config)

    @property
    def teacher_params(self):
        return None if self.teacher is None else self.teacher.params

    def step_args(self, step: int) -> tuple:
        """The arguments after (params, opt_state, batch) of the distillation step at optimizer step `step`."""
        return self.teacher_params, np.int32(step), np.float32(self.taid.t)

    def on_policy(self, step: int) -> bool:
        """Whether optimizer step `step` trains on the student's own samples: a draw with probability lambda,
        a pure function of (seed, step) so that a resumed run makes the same choices."""
        fraction = self.distill.on_policy_fraction
        if fraction == 0 or step < self.loss_config.burn_in_steps:  # burn-in: hard labels only, as documented
            return False
        return np.random.default_rng([self.train.seed, step]).random() < fraction

    def rollout_key(self, step: int) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.train.seed), step)

    def attach_targets(self, local_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This process's rows plus their cached targets (no-op for online targets)."""
        if self.cache is None:
            return local_batch
        ids, values = self.cache.lookup(local_batch["inputs"], local_batch["targets"], self.fingerprint)
        return {**local_batch, TARGET_KEYS[0]: ids, TARGET_KEYS[1]: values}

    def after_step(self, metrics: dict, step: int, *, on_policy: bool = False) -> None:
        """TAID moves t by the soft loss just measured (host-side: three scalars); on-policy steps measure another
        loss (the plain teacher on the student's samples) and leave it alone."""
        if self.loss_config.target == "taid" and not on_policy:
            self.taid = jax.device_get(taid_update(self.taid, metrics["soft"], step, self.loss_config))

    def state(self) -> dict[str, float]:
        """What a checkpoint must keep to resume exactly (JSON: Python floats hold float32 exactly)."""
        return {k: float(getattr(self.taid, k)) for k in ("t", "momentum", "prev_loss")}

    def load_state(self, state: dict[str, float] | None) -> None:
        if state:
            self.taid = TaidState(*(np.float32(state[k]) for k in ("t", "momentum", "prev_loss")))
