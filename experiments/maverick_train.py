"""Maverick (17B active, 128 experts, 400B total) training at 8192 tokens, one sequence per chip, experts
spread over an expert-parallel axis of 8 (each rank holds 16 experts).

`llama4-jax plan experiments/maverick_train.py --topology v5p-256` (see experiments/README.md)."""

from llama4_jax.config import MAVERICK
from llama4_jax.experiment import ExperimentConfig, TrainConfig
from llama4_jax.sharding import MeshConfig
from llama4_jax.train.optim import OptimConfig

EXPERIMENT = ExperimentConfig(
    name="maverick_train",
    model=MAVERICK,
    train=TrainConfig(batch_size=128, seq_len=8192, steps=100_000, param_dtype="float32",
                      compute_dtype="bfloat16", remat="full"),
    optim=OptimConfig(lr=3e-4, warmup_steps=2000, schedule="wsd"),
    mesh=MeshConfig(fsdp=-1, expert=8),
)
