"""`llama4-jax convert SRC DST`: Hugging Face directory <-> Orbax checkpoint, with progress and a summary."""

from __future__ import annotations

import argparse
import sys


def add_convert_parser(subparsers) -> None:
    """Registers the `convert` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "convert", help="convert between a Hugging Face directory and an Orbax checkpoint (either direction)",
        description="The direction follows SRC: a Hugging Face directory (config.json + *.safetensors) becomes "
                    "an Orbax checkpoint, an Orbax checkpoint becomes a Hugging Face directory.")
    parser.add_argument("src", help="Hugging Face directory or Orbax checkpoint directory")
    parser.add_argument("dst", help="output directory (created only when complete)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="dtype of the written weights (default: as stored)")
    parser.add_argument("--max-shard-size", default="5GB", help="per safetensors file, when writing HF (5GB)")
    parser.add_argument("--tokenizer", default=None, help="directory to copy tokenizer files from (to HF)")
    parser.add_argument("--multimodal", action="store_true",
                        help="HF -> Orbax: convert a multimodal (llama4) checkpoint whole, vision tower included "
                             "(default: its text model only); Orbax -> HF follows the checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import ml_dtypes

    from llama4_jax.convert.streaming import convert

    dtype = {"bfloat16": ml_dtypes.bfloat16}.get(args.dtype, args.dtype)
    try:
        stats = convert(args.src, args.dst, dtype=dtype, max_shard_size=args.max_shard_size,
                        tokenizer=args.tokenizer, overwrite=args.overwrite, progress=not args.no_progress,
                        multimodal=args.multimodal)
    except (ValueError, FileExistsError) as e:
        print(f"llama4-jax convert: error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.src} -> {args.dst}: {stats.summary()}")
    return 0
