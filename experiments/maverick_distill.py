"""Maverick (17B active, 128 experts, 400B total) co-distilled from a frozen Behemoth-shaped teacher (bf16,
sharded by the inference rules) at 8192 tokens, one sequence per chip, experts over an expert axis of 8.

    llama4-jax plan experiments/maverick_distill.py --topology v5p-512 --set train.batch_size=256
    llama4-jax plan experiments/maverick_distill.py --topology v5p-256 --set distill.teacher=maverick

(see experiments/README.md for the recorded plans). Training needs distill.teacher_checkpoint set."""

import dataclasses
import pathlib

from llama4_jax.config import BEHEMOTH
from llama4_jax.distill import DistillConfig
from llama4_jax.experiment import load_module
from llama4_jax.sharding import MeshConfig
from llama4_jax.train.losses import DistillLossConfig

EXPERIMENT = dataclasses.replace(
    load_module(pathlib.Path(__file__).with_name("maverick_train.py")).EXPERIMENT,
    name="maverick_distill",
    mesh=MeshConfig(fsdp=-1, expert=16),  # 8 of Maverick's and 1 of Behemoth's 16 experts per expert rank
    distill=DistillConfig(teacher=BEHEMOTH, teacher_param_dtype="bfloat16",
                          loss=DistillLossConfig(alpha_schedule="cosine", alpha=0.9, alpha_end=0.5)),
)
