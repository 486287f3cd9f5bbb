"""A small Scout-shaped model on v5p-8, for `llama4-jax plan` in the test suite."""

from llama4_jax.config import TINY_SCOUT
from llama4_jax.experiment import ExperimentConfig, TrainConfig
from llama4_jax.sharding import MeshConfig

EXPERIMENT = ExperimentConfig(
    name="tiny_plan",
    model=TINY_SCOUT.replace(hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024,
                             num_hidden_layers=4, num_local_experts=8, attention_chunk_size=128),
    train=TrainConfig(batch_size=8, seq_len=512, steps=1000, remat="full", capacity_factor=1.0),
    mesh=MeshConfig(fsdp=-1, expert=2),
)
