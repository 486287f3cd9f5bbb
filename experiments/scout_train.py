"""Scout (17B active, 16 experts, 109B total) pre-training at 8192 tokens, one sequence per chip.

`llama4-jax plan experiments/scout_train.py --topology v5p-128` (see experiments/README.md)."""

from llama4_jax.config import SCOUT
from llama4_jax.experiment import ExperimentConfig, TrainConfig
from llama4_jax.sharding import MeshConfig
from llama4_jax.train.optim import OptimConfig

EXPERIMENT = ExperimentConfig(
    name="scout_train",
    model=SCOUT,
    train=TrainConfig(batch_size=64, seq_len=8192, steps=100_000, param_dtype="float32", compute_dtype="bfloat16",
                      remat="full"),
    optim=OptimConfig(lr=3e-4, warmup_steps=2000, schedule="wsd"),
    mesh=MeshConfig(fsdp=-1),
)
