"""Scout (17B active, 16 experts) co-distilled from a frozen Behemoth-shaped teacher (288B active, ~2T total,
bf16, sharded by the inference rules) at 8192 tokens, one sequence per chip; the teacher runs online inside
the student's step.

    llama4-jax plan experiments/scout_distill.py --topology v5p-256 --set train.batch_size=128
    llama4-jax plan experiments/scout_distill.py --topology v5p-128 --set train.batch_size=64 \
        --set distill.teacher=maverick

(see experiments/README.md for the recorded plans). Training needs distill.teacher_checkpoint set."""

import dataclasses
import pathlib

from llama4_jax.config import BEHEMOTH
from llama4_jax.distill import DistillConfig
from llama4_jax.experiment import load_module
from llama4_jax.sharding import MeshConfig
from llama4_jax.train.losses import DistillLossConfig

EXPERIMENT = dataclasses.replace(
    load_module(pathlib.Path(__file__).with_name("scout_train.py")).EXPERIMENT,
    name="scout_distill",
    # Experts over an expert axis of 16: Behemoth's MoE layer is 16 x 16384 x 24576 x 3 bf16 = 38.7 GB, which an
    # fsdp-only mesh would all-gather on every chip for every layer (planned: 105.6 GiB temp on v5p-256).
    mesh=MeshConfig(fsdp=-1, expert=16),
    # Pre-training distillation: forward KL at tau 1; the soft weight decays from 0.9 to 0.5 so the hard labels
    # lead at the end (a dynamic soft/hard weighting through training, as Meta describes for Maverick).
    distill=DistillConfig(teacher=BEHEMOTH, teacher_param_dtype="bfloat16",
                          loss=DistillLossConfig(alpha_schedule="cosine", alpha=0.9, alpha_end=0.5)),
)
