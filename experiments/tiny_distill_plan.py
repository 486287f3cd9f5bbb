"""A tiny_plan-sized student taught by a frozen teacher twice as wide and deep, on v5p-8: `llama4-jax plan` of a
distillation step in the test suite."""

from llama4_jax.config import TINY_SCOUT
from llama4_jax.distill import DistillConfig
from llama4_jax.experiment import ExperimentConfig, TrainConfig
from llama4_jax.sharding import MeshConfig

STUDENT = TINY_SCOUT.replace(hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024, num_hidden_layers=4,
                             num_local_experts=8, attention_chunk_size=128)

EXPERIMENT = ExperimentConfig(
    name="tiny_distill_plan",
    model=STUDENT,
    train=TrainConfig(batch_size=8, seq_len=512, steps=1000, remat="full", capacity_factor=1.0),
    mesh=MeshConfig(fsdp=-1, expert=2),
    distill=DistillConfig(teacher=STUDENT.replace(hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048,
                                                  num_hidden_layers=8)),
)
