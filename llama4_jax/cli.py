"""`llama4-jax` command line."""

from __future__ import annotations

import argparse
import sys
import time

from llama4_jax.convert.cli import add_convert_parser
from llama4_jax.generate.cli import add_generate_parsers


def _demo(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from llama4_jax import PRESETS, Llama4ForCausalLM
    from llama4_jax.counting import count_params, training_flops_per_token

    print(f"Llama 4 presets (abstract shapes via jax.eval_shape; training FLOPs at {args.seq_len} tokens)\n")
    header = (f"{'preset':<10} {'layers':>6} {'experts':>7} {'total params':>14} {'active/token':>13} "
              f"{'GFLOP/token':>12}")
    print(header)
    print("-" * len(header))
    for name in ("scout", "maverick", "behemoth"):
        config = PRESETS[name]
        counts = count_params(config)
        flops = training_flops_per_token(config, args.seq_len)
        print(f"{name:<10} {config.num_hidden_layers:>6} {config.num_local_experts:>7} "
              f"{counts.total / 1e9:>13.2f}B {counts.active / 1e9:>12.2f}B {flops / 1e9:>12.1f}")
    print("\nActive = parameters a token passes through, excluding the input embedding lookup.")
    print("Behemoth is shaped from Meta's published totals (16 experts, 288B active, ~2T); its dims are assumed.\n")

    config = PRESETS["tiny-scout"]
    model = Llama4ForCausalLM(config, rngs=nnx.Rngs(args.seed))
    ids = jax.random.randint(jax.random.key(args.seed), (2, 32), 0, config.vocab_size, dtype=jnp.int32)
    forward = nnx.jit(lambda m, x: m(x))
    start = time.perf_counter()
    logits = jax.block_until_ready(forward(model, ids))
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    logits = jax.block_until_ready(forward(model, ids))
    run = time.perf_counter() - start
    counts = count_params(config)
    print(f"Forward pass of a random tiny-scout model ({counts.total:,} params, {config.num_hidden_layers} layers, "
          f"{config.num_local_experts} experts, chunk {config.attention_chunk_size}) on {jax.devices()[0].platform}:")
    print(f"  input ids {tuple(ids.shape)} -> logits {tuple(logits.shape)} {logits.dtype}")
    print(f"  logits mean {float(logits.mean()):+.4f}, std {float(logits.std()):.4f}, finite: "
          f"{bool(jnp.isfinite(logits).all())}")
    print(f"  greedy next tokens of row 0: {np.asarray(logits[0, -8:].argmax(-1)).tolist()}")
    print(f"  first call (compile + run) {compile_and_run:.2f}s, second call {run * 1e3:.1f} ms")
    if args.no_train:
        return 0
    return _demo_train(args)


def _demo_train(args: argparse.Namespace) -> int:
    """experiments/distill_demo.py: a teacher, then the same student on hard labels and distilled, compared."""
    import pathlib

    from llama4_jax.experiment import load_module

    module = load_module(pathlib.Path(__file__).resolve().parent.parent / "experiments" / "distill_demo.py")
    print(f"\n{module.__doc__.strip().splitlines()[0]}")
    module.main(args.workdir, teacher_steps=args.teacher_steps, student_steps=args.student_steps)
    return 0


def _plan(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the TPU slice; run nothing on a device here
    from llama4_jax.experiment import load_experiment
    from llama4_jax.plan import format_report, param_count_line, plan

    experiment = load_experiment(args.experiment, args.overrides)
    print(param_count_line(experiment))
    report = plan(experiment, args.topology, count_flops=not args.no_flops)
    print(format_report(report))
    return 0 if report.fits else 1


def _train(args: argparse.Namespace) -> int:
    from llama4_jax.experiment import load_experiment
    from llama4_jax.train.loop import train

    experiment = load_experiment(args.experiment, args.overrides)
    workdir = args.workdir or f"runs/{experiment.name}"
    result = train(experiment, workdir, progress=not args.no_progress)
    state = "preempted (SIGTERM): saved" if result.preempted else "finished"
    print(f"{state} at step {result.step}")
    print(f"  checkpoints: {result.checkpoints}")
    print(f"  metrics:     {result.metrics} and {result.workdir / 'tensorboard'}")
    if result.plot:
        print(f"  loss plot:   {result.plot}")
    return 0


def _add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train an experiment (resumes from the latest checkpoint in --workdir)")
    train.add_argument("experiment", help="experiments/NAME.py")
    train.add_argument("--workdir", help="checkpoints, metrics and plots (default runs/NAME)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. optim.lr=3e-4 (repeatable)")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_train)


def _add_plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="compile an experiment's training step for a TPU slice; exit 0 if it fits")
    plan.add_argument("experiment", help="experiments/NAME.py")
    plan.add_argument("--topology", required=True, help="TPU slice, e.g. v5p-8, v5p-256, v5e-16, v6e-64")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. train.batch_size=64 (repeatable)")
    plan.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting compiles (memory only)")
    plan.set_defaults(func=_plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama4-jax", description="Llama 4 in JAX / Flax NNX")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="preset sizes and FLOPs, a tiny forward pass, then the distillation demo")
    demo.add_argument("--seq-len", type=int, default=8192, help="sequence length for the FLOPs column")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-train", action="store_true", help="skip the distillation runs")
    demo.add_argument("--workdir", default="runs/distill_demo", help="where the three runs write")
    demo.add_argument("--teacher-steps", type=int, default=None, help="default: experiments/distill_demo.py's")
    demo.add_argument("--student-steps", type=int, default=None, help="default: experiments/distill_demo.py's")
    demo.set_defaults(func=_demo)
    add_convert_parser(sub)
    add_generate_parsers(sub)
    _add_plan_parser(sub)
    _add_train_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
