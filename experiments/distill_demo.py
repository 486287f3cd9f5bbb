"""Distillation on the embedded corpus: the default run behind `make demo`.

1. A teacher (4-layer MoE, hidden 128) is trained on the embedded corpus (Python's own docs and sources).
2. The same smaller student (hidden 64) is trained twice for equal steps from the same initialisation: on hard
   labels only, and distilled from the frozen teacher (forward KL, alpha 0.5, the teacher run online inside
   the student's jitted step).
3. Held-out loss of both is printed as a table and their eval curves are plotted to distill_demo.png.

    python experiments/distill_demo.py [--workdir runs/distill_demo]       (or: make demo)
    llama4-jax train experiments/distill_demo.py --set distill.teacher_checkpoint=runs/distill_demo/teacher

`EXPERIMENT` is the distilled student; `TEACHER` and `HARD` are the two other runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from llama4_jax.config import TINY_SCOUT
from llama4_jax.data.config import DataConfig
from llama4_jax.distill import DistillConfig
from llama4_jax.experiment import ExperimentConfig, TrainConfig
from llama4_jax.sharding import MeshConfig
from llama4_jax.train.losses import DistillLossConfig
from llama4_jax.train.optim import OptimConfig

WORKDIR = pathlib.Path("runs/distill_demo")
SEED = 0
_DATA = DataConfig(source="embedded", tokenizer="bpe:embedded", bpe_vocab_size=512)
_SHAPE = dict(vocab_size=512, num_hidden_layers=4, num_local_experts=4, attention_chunk_size=64, floor_scale=64)
_TRAIN = dict(batch_size=16, seq_len=128, param_dtype="float32", compute_dtype="float32", remat="none",
              log_every=10, eval_every=25, eval_batches=8, seed=SEED)

TEACHER = ExperimentConfig(
    name="distill_demo_teacher",
    model=TINY_SCOUT.replace(**_SHAPE, hidden_size=128, intermediate_size=128, intermediate_size_mlp=256),
    data=_DATA,
    train=TrainConfig(**_TRAIN, steps=400, checkpoint_every=400),
    optim=OptimConfig(lr=1e-3, warmup_steps=30, schedule="cosine", weight_decay=0.01),
    mesh=MeshConfig(fsdp=-1),
)

HARD = ExperimentConfig(
    name="distill_demo_hard",
    model=TINY_SCOUT.replace(**_SHAPE, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128),
    data=_DATA,
    train=TrainConfig(**_TRAIN, steps=200, checkpoint_every=200),
    optim=OptimConfig(lr=2e-3, warmup_steps=20, schedule="cosine", weight_decay=0.01),
    mesh=MeshConfig(fsdp=-1),
)

EXPERIMENT = dataclasses.replace(
    HARD, name="distill_demo",
    distill=DistillConfig(teacher=TEACHER.model, teacher_checkpoint=str(WORKDIR / "teacher"),
                          teacher_param_dtype="float32",
                          loss=DistillLossConfig(divergence="forward_kl", alpha=0.5, alpha_end=0.5)))


def eval_curve(workdir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}


def plot(curves: dict[str, dict[int, float]], path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), marker="o", markersize=3, label=label)
    ax.set_xlabel("student step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Same student, equal steps: hard labels vs distilled")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(workdir: str | pathlib.Path = WORKDIR, *, teacher_steps: int | None = None, student_steps: int | None = None,
         progress: bool = True) -> dict[str, float]:
    """Runs the three trainings (a finished run is reused) and returns the final held-out losses."""
    from llama4_jax.train.loop import train

    workdir = pathlib.Path(workdir)
    teacher = TEACHER if teacher_steps is None else _with_steps(TEACHER, teacher_steps)
    hard = HARD if student_steps is None else _with_steps(HARD, student_steps)
    distilled = dataclasses.replace(
        _with_steps(EXPERIMENT, hard.train.steps),
        distill=EXPERIMENT.distill.replace(teacher_checkpoint=str(workdir / "teacher")))
    runs = {"teacher": teacher, "hard labels": hard, "distilled": distilled}
    for label, experiment in runs.items():
        print(f"\n== {label}: {experiment.name}, hidden {experiment.model.hidden_size}, {experiment.train.steps} steps")
        train(experiment, workdir / _dirname(label), progress=progress)
    curves = {label: eval_curve(workdir / _dirname(label)) for label in runs}
    final = {label: curve[max(curve)] for label, curve in curves.items()}
    print(f"\nHeld-out loss after {hard.train.steps} student steps (seed {SEED}, "
          f"{hard.train.eval_batches} eval batches of {hard.train.batch_size}x{hard.train.seq_len} tokens):")
    print(f"  {'run':<14} {'params':>8} {'held-out loss':>14}")
    for label, experiment in runs.items():
        from llama4_jax.counting import count_params

        print(f"  {label:<14} {count_params(experiment.model).total / 1e6:>7.2f}M {final[label]:>14.4f}")
    gain = final["hard labels"] - final["distilled"]
    print(f"  distillation gain: {gain:+.4f} nats/token ({'lower' if gain > 0 else 'NOT lower'} with the teacher)")
    path = plot({k: v for k, v in curves.items() if k != "teacher"}, workdir / "distill_demo.png")
    print(f"  curves: {path}")
    return final


def _dirname(label: str) -> str:
    return {"teacher": "teacher", "hard labels": "student_hard", "distilled": "student_distilled"}[label]


def _with_steps(experiment: ExperimentConfig, steps: int) -> ExperimentConfig:
    train = dataclasses.replace(experiment.train, steps=steps, eval_every=min(experiment.train.eval_every, steps),
                                checkpoint_every=steps)
    return dataclasses.replace(experiment, train=train)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(WORKDIR))
    parser.add_argument("--teacher-steps", type=int, default=None)
    parser.add_argument("--student-steps", type=int, default=None)
    args = parser.parse_args()
    main(args.workdir, teacher_steps=args.teacher_steps, student_steps=args.student_steps)
