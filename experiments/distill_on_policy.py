"""On-policy (GKD) against off-policy distillation at equal steps, on the demo's teacher and student.

    python experiments/distill_on_policy.py [--workdir runs/distill_demo] [--steps 200]

Both students start from the same initialisation and see the same batches; the on-policy one trains on its own
samples (second half of each row, temperature 1, scored by the teacher) on a fraction lambda = 0.5 of the steps
and on the data otherwise (forward KL + hard labels, alpha 0.5, as the off-policy one on every step). Reported:
held-out loss on real text, and the teacher-student forward KL on the student's own continuations of held-out
prompts (the mismatch on-policy training targets: what the student will see when it generates).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import jax
import jax.numpy as jnp

_DEMO_PATH = pathlib.Path(__file__).with_name("distill_demo.py")
FRACTION = 0.5


def _demo():
    from llama4_jax.experiment import load_module

    return load_module(_DEMO_PATH)


def on_policy_kl(experiment, student_dir: pathlib.Path, batches: int = 4, seed: int = 1) -> float:
    """Mean KL(p_T || p_S) over the student's sampled continuations of held-out prompts (first half of rows)."""
    from llama4_jax.distill.teacher import load_teacher
    from llama4_jax.generate import SamplingConfig, sample_continuations
    from llama4_jax.sharding import make_mesh
    from llama4_jax.train.loop import _data
    from llama4_jax.train.losses import DistillLossConfig, OnlineTargets, distill_loss

    mesh = make_mesh(experiment.mesh)
    distill, train = experiment.distill, experiment.train
    teacher = load_teacher(distill, train, mesh)
    student = load_teacher(distill.replace(teacher=experiment.model, teacher_checkpoint=str(student_dir),
                                           teacher_param_dtype=train.param_dtype), train, mesh)
    prompt_len = train.seq_len // 2
    config = DistillLossConfig(alpha=1.0, alpha_end=1.0)

    @jax.jit
    def kl_sums(student_params, teacher_params, inputs, key):
        s_model, t_model = student.model(student_params), teacher.model(teacher_params)
        tokens, sampled = sample_continuations(s_model, inputs[:, :prompt_len], key,
                                               num_new_tokens=train.seq_len - prompt_len + 1,
                                               sampling=SamplingConfig(temperature=1.0), stop_tokens=())
        x, w = tokens[:, :-1], sampled[:, 1:].astype(jnp.float32)
        out = distill_loss(s_model.logits, s_model.model(x), OnlineTargets(t_model.logits, t_model.model(x)),
                           tokens[:, 1:], w, config=config, step=0)
        return out["kl_sum"], out["tokens"]

    iterator = _data(experiment, "eval")
    total = count = 0.0
    for i in range(batches):
        kl, n = kl_sums(student.params, teacher.params, jnp.asarray(next(iterator)["inputs"]),
                        jax.random.key(seed + i))
        total, count = total + float(kl), count + float(n)
    return total / count


def main(workdir: str | pathlib.Path, steps: int) -> dict[str, dict[str, float]]:
    from llama4_jax.train.loop import train

    demo = _demo()
    workdir = pathlib.Path(workdir)
    if not (workdir / "teacher").exists():
        train(demo.TEACHER, workdir / "teacher")
    off = demo._with_steps(demo.EXPERIMENT, steps)
    off = dataclasses.replace(off, distill=off.distill.replace(teacher_checkpoint=str(workdir / "teacher")))
    on = dataclasses.replace(off, name="distill_on_policy", distill=off.distill.replace(on_policy_fraction=FRACTION))
    results = {}
    for label, experiment in {"off-policy (data only)": off, f"on-policy lambda={FRACTION}": on}.items():
        run = workdir / "on_policy" / ("off" if experiment is off else "on")
        print(f"\n== {label}")
        train(experiment, run)
        curve = demo.eval_curve(run)
        results[label] = {"held-out loss": curve[max(curve)],
                          "KL on own samples": on_policy_kl(experiment, run)}
    print(f"\n| student ({steps} steps, seed {demo.SEED}) | held-out loss | KL(teacher || student) on its own "
          "samples |\n|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['held-out loss']:.4f} | {r['KL on own samples']:.4f} |")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/distill_demo")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    main(args.workdir, args.steps)
