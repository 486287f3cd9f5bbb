"""Keep the hard examples: score a dataset with teacher and/or student, drop what the teacher gets wrong, keep
the hardest fraction (llama4_jax.distill.prune).

    python tools/prune_data.py experiments/distill_demo.py --student runs/distill_demo/student_hard \\
        --out runs/pruned --score excess_loss --keep 0.5
    python tools/prune_data.py EXP --student CKPT --out runs/sft-hard --score ifd --keep 0.05 \\
        --set data.source=sft.jsonl --prompt-field instruction --answer-field output

The teacher is the experiment's distill section (--set distill.teacher_checkpoint=...); the student any
checkpoint: a training workdir, a model checkpoint or a Hugging Face directory. The output directory (kept.jsonl,
scores.jsonl, scores.png, summary.json) appears only when complete; train on it with
--set data.source=OUT/kept.jsonl.
"""

from __future__ import annotations

import argparse
import json

from llama4_jax.distill.prune import IFD_MODELS, PRUNE_SPLITS, SCORES, PruneConfig, prune_dataset
from llama4_jax.experiment import load_experiment


def _optional_float(raw: str) -> float | None:
    return None if raw.lower() in ("none", "off") else float(raw)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiment file: data, model (the student), distill (the teacher)")
    parser.add_argument("--out", required=True, help="output directory (appears only when complete)")
    parser.add_argument("--student", default=None, help="student checkpoint (workdir, model checkpoint or HF dir)")
    parser.add_argument("--score", default="excess_loss", choices=SCORES)
    parser.add_argument("--keep", type=float, default=0.5, help="fraction kept of the non-teacher-wrong examples")
    parser.add_argument("--teacher-wrong-quantile", type=_optional_float, default=0.95, metavar="Q|none",
                        help="drop examples whose teacher CE is above this quantile of all teacher CEs")
    parser.add_argument("--teacher-min-accuracy", type=_optional_float, default=None, metavar="A|none",
                        help="drop examples whose teacher top-1 accuracy is below this")
    parser.add_argument("--pairs", action="store_true", help="prompt/answer jsonl records (implied by --score ifd)")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--ifd-model", default="student", choices=IFD_MODELS)
    parser.add_argument("--split", default="train", choices=PRUNE_SPLITS)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward (default train.batch_size)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    parser.add_argument("--student-dtype", default=None, choices=("float32", "bfloat16"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an experiment field (repeatable)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = PruneConfig(score=args.score, keep_fraction=args.keep, teacher_wrong_quantile=args.teacher_wrong_quantile,
                         teacher_min_accuracy=args.teacher_min_accuracy, pairs=args.pairs,
                         prompt_field=args.prompt_field, answer_field=args.answer_field, ifd_model=args.ifd_model,
                         split=args.split, batch_size=args.batch_size, limit=args.limit,
                         student_param_dtype=args.student_dtype)
    experiment = load_experiment(args.experiment, args.overrides)
    summary = prune_dataset(experiment, args.out, config, student_checkpoint=args.student, overwrite=args.overwrite,
                            progress=not args.no_progress)
    print(json.dumps({"out": args.out, **summary}, indent=2))
    return summary


if __name__ == "__main__":
    main()
