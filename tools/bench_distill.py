"""What distillation costs: the step time with an online teacher, and with cached targets, over the student-only
step time, measured side by side in one run, beside the FLOPs prediction.

Prediction for the online teacher: 1 + F_T / F_S, where F_T is the teacher's forward FLOPs per token (a third of
its training FLOPs: 2 N_T + attention) and F_S the student's training FLOPs per token (6 N_S + attention);
that is 1 + N_T / (3 N_S) up to attention. Cached top-k targets should cost at most 1.1x the student alone.

    python tools/bench_distill.py [--batch 4 --seq 512 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import mid_config
from flax import nnx

from llama4_jax.counting import count_params, training_flops_per_token
from llama4_jax.distill import DistillConfig
from llama4_jax.distill.step import make_distill_step
from llama4_jax.distill.teacher import init_teacher
from llama4_jax.experiment import ExperimentConfig, TrainConfig
from llama4_jax.sharding import MeshConfig, make_mesh
from llama4_jax.train.losses import DistillLossConfig
from llama4_jax.train.step import abstract_train_state, make_train_step, model_factory


def _experiment(student, teacher, batch: int, seq: int) -> ExperimentConfig:
    train = TrainConfig(batch_size=batch, seq_len=seq, steps=100, param_dtype="float32", compute_dtype="float32",
                        remat="none")
    distill = DistillConfig(teacher=teacher, teacher_param_dtype="float32", loss=DistillLossConfig(alpha=0.5))
    return ExperimentConfig(name="bench_distill", model=student, train=train, distill=distill,
                            mesh=MeshConfig(fsdp=1, data=1))


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per function, the functions called in turn each round (after one warm-up call each),
    so a change in machine load hits all of them alike and their ratios stay fair."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(student, teacher, *, batch: int, seq: int, repeats: int, k: int = 64) -> dict[str, float]:
    exp = _experiment(student, teacher, batch, seq)
    mesh = make_mesh(exp.mesh, jax.devices()[:1])
    graphdef, _, tx = abstract_train_state(exp)
    params = nnx.state(model_factory(exp.model, exp.train)(), nnx.Param)
    opt_state = tx.init(params)
    teacher_state = init_teacher(exp.distill, exp.train, mesh, seed=1)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, student.vocab_size, (batch, seq + 1)), jnp.int32)
    data = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": jnp.ones((batch, seq), jnp.float32)}
    cached = {**data, "target_ids": jnp.asarray(rng.integers(0, student.vocab_size, (batch, seq, k)), jnp.int32),
              # k log-probabilities of 1/(2k) each, then the log tail mass (1/2), as the cache stores them.
              "target_values": jnp.full((batch, seq, k + 1), -np.log(2 * k), jnp.float32).at[..., -1].set(-np.log(2))}
    # No donation: the same inputs are reused for every timed call.
    plain = jax.jit(make_train_step(graphdef, tx, exp.train))
    online = jax.jit(make_distill_step(graphdef, tx, exp.train, exp.distill, teacher_state.graphdef))
    from_cache = jax.jit(make_distill_step(graphdef, tx, exp.train, exp.distill, None, "topk"))
    @jax.jit
    def teacher_forward(teacher_params, inputs):  # what the online step adds, alone: hidden + every logit
        model = teacher_state.model(teacher_params)
        hidden = model.model(inputs)
        return jax.lax.map(lambda h: jax.nn.logsumexp(model.logits(h[None]).astype(jnp.float32)), hidden)

    run = {
        "teacher_fwd": lambda: jax.block_until_ready(teacher_forward(teacher_state.params, data["inputs"])),
        "student": lambda: jax.block_until_ready(plain(params, opt_state, data)),
        "online": lambda: jax.block_until_ready(online(params, opt_state, data, teacher_state.params, 0, 0.0)),
        "cache": lambda: jax.block_until_ready(from_cache(params, opt_state, cached, None, 0, 0.0)),
    }
    times = interleaved_medians(run, repeats)
    f_s = training_flops_per_token(student, seq)
    f_t = training_flops_per_token(teacher, seq) / 3
    return {**times, "predicted": 1 + f_t / f_s, "n_t_over_n_s": count_params(teacher).active / count_params(
        student).active}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    student = mid_config()
    teachers = {
        "same size": student,
        "2x wider": student.replace(hidden_size=1024, intermediate_size=2048, intermediate_size_mlp=4096,
                                    num_attention_heads=16, num_key_value_heads=4),
    }
    print(f"student: D={student.hidden_size}, {student.num_hidden_layers} layers, {student.num_local_experts} "
          f"experts, vocab {student.vocab_size}; batch {args.batch} x {args.seq} tokens, float32, "
          f"{jax.devices()[0].platform}, median of {args.repeats}")
    header = (f"{'teacher':<10} {'N_T/N_S':>8} {'student s':>10} {'online s':>9} {'online/student':>15} "
              f"{'predicted':>10} {'off by':>7} {'1+fwd/student':>14} {'cache/student':>14}")
    print(header)
    print("-" * len(header))
    for name, teacher in teachers.items():
        r = measure(student, teacher, batch=args.batch, seq=args.seq, repeats=args.repeats)
        ratio = r["online"] / r["student"]
        print(f"{name:<10} {r['n_t_over_n_s']:>8.2f} {r['student']:>10.3f} {r['online']:>9.3f} {ratio:>15.3f} "
              f"{r['predicted']:>10.3f} {ratio / r['predicted'] - 1:>+7.1%} "
              f"{1 + r['teacher_fwd'] / r['student']:>14.3f} {r['cache'] / r['student']:>14.3f}")
    print("1+fwd/student: the teacher's forward timed alone, added to the student's step (what the online step "
          "would cost with no overlap and no overhead of its own).")


if __name__ == "__main__":
    main()
