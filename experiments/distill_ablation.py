"""Ablation of target formats and soft/hard weightings on the demo's teacher and student (run once; the table
is recorded in experiments/README.md).

    python experiments/distill_ablation.py [--workdir runs/distill_demo] [--steps 200]

Every run is the demo's student, same seed, data and steps; only the distillation targets or alpha differ.
Cached formats are written once by the cache tool's library (k = 16 of a 512-token vocabulary: the same
truncation ratio problem as k = 64 of 202k only much milder, so the differences here are a lower bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

from llama4_jax.train.losses import DistillLossConfig

_DEMO_PATH = pathlib.Path(__file__).with_name("distill_demo.py")
K = 16


def _demo():
    from llama4_jax.experiment import load_module

    return load_module(_DEMO_PATH)


def variants() -> dict[str, dict]:
    """name -> distill changes (targets / cache format / loss)."""
    base = DistillLossConfig(alpha=0.5, alpha_end=0.5)
    loss = lambda **kw: dataclasses.replace(base, **kw)
    return {
        "hard labels only (alpha 0)": dict(loss=loss(alpha=0.0, alpha_end=0.0)),
        "dense, alpha 0.5": dict(loss=base),
        f"top-{K} without tail, alpha 0.5": dict(cache="topk", loss=loss(topk_tail=False)),
        f"top-{K} + tail, alpha 0.5": dict(cache="topk", loss=base),
        f"sampled {K} draws, alpha 0.5": dict(cache="sampled", loss=base),
        "dense, alpha 1 (soft only)": dict(loss=loss(alpha=1.0, alpha_end=1.0)),
        "dense, alpha cosine 0.9 -> 0.3": dict(loss=loss(alpha_schedule="cosine", alpha=0.9, alpha_end=0.3)),
        "dense, alpha 1 x p_T(label) per token": dict(loss=loss(alpha=1.0, alpha_end=1.0, confidence="label_prob")),
        "dense, teacher-corrected (MFT), alpha 0.5": dict(loss=loss(target="corrected")),
        "dense, TAID, alpha 1": dict(loss=loss(alpha=1.0, alpha_end=1.0, target="taid")),
    }


def main(workdir: str | pathlib.Path, steps: int) -> list[tuple[str, float]]:
    from llama4_jax.distill.cache_build import build_cache
    from llama4_jax.train.loop import train

    demo = _demo()
    workdir = pathlib.Path(workdir)
    if not (workdir / "teacher").exists():
        train(demo.TEACHER, workdir / "teacher")
    student = demo._with_steps(demo.EXPERIMENT, steps)
    student = dataclasses.replace(student, distill=student.distill.replace(teacher_checkpoint=str(workdir / "teacher")))
    caches = {}
    for fmt in ("topk", "sampled"):
        caches[fmt] = workdir / "ablation" / f"cache-{fmt}"
        if not caches[fmt].exists():
            build_cache(student, caches[fmt], fmt=fmt, k=K)
    rows = []
    for i, (name, change) in enumerate(variants().items()):
        distill = student.distill.replace(loss=change["loss"])
        if "cache" in change:
            distill = distill.replace(targets="cache", cache_dir=str(caches[change["cache"]]))
        run = workdir / "ablation" / f"run{i:02d}"
        print(f"\n== {name}")
        train(dataclasses.replace(student, distill=distill), run)
        curve = demo.eval_curve(run)
        rows.append((name, curve[max(curve)]))
    print(f"\n| variant ({steps} student steps, seed {demo.SEED}) | held-out loss |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.4f} |")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/distill_demo")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    main(args.workdir, args.steps)
