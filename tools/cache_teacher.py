"""Run an experiment's teacher once over its training data and write sparse targets for many students.

    python tools/cache_teacher.py experiments/distill_demo.py --out runs/cache-topk --format topk --k 64
    python tools/cache_teacher.py experiments/distill_demo.py --out runs/cache-sampled --format sampled --k 50 \\
        --set distill.teacher_checkpoint=runs/teacher

Then train students with --set distill.targets=cache --set distill.cache_dir=runs/cache-topk. The cache is keyed by
a hash of each token sequence and of the tokenizer: a student whose data or tokenizer differ is refused.
"""

from __future__ import annotations

import argparse
import json

from llama4_jax.distill.cache import CACHE_FORMATS
from llama4_jax.distill.cache_build import build_cache
from llama4_jax.experiment import load_experiment


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiment file with a distill section (teacher + teacher_checkpoint)")
    parser.add_argument("--out", required=True, help="cache directory (appears only when complete)")
    parser.add_argument("--format", default="topk", choices=CACHE_FORMATS)
    parser.add_argument("--k", type=int, default=64, help="top-k ids, or draws per token for 'sampled'")
    parser.add_argument("--batches", type=int, default=None, help="training batches to cover (default train.steps)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed ('sampled')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an experiment field (repeatable)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    experiment = load_experiment(args.experiment, args.overrides)
    out = build_cache(experiment, args.out, fmt=args.format, k=args.k, num_batches=args.batches, seed=args.seed,
                      overwrite=args.overwrite, progress=not args.no_progress)
    metadata = json.loads((out / "metadata.json").read_text())
    summary = {key: metadata[key] for key in ("format", "k", "records", "seq_len", "bytes_per_token", "seconds")}
    print(json.dumps({"cache": str(out), **summary}, indent=2))
    return summary


if __name__ == "__main__":
    main()
