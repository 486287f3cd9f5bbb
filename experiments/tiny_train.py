"""A tiny Scout-shaped MoE trained on the embedded corpus (Python's own docs and sources): the default run.

`llama4-jax train experiments/tiny_train.py` — a few minutes on 2 CPU cores."""

from llama4_jax.config import TINY_SCOUT
from llama4_jax.data.config import DataConfig
from llama4_jax.experiment import ExperimentConfig, TrainConfig
from llama4_jax.sharding import MeshConfig
from llama4_jax.train.optim import OptimConfig

EXPERIMENT = ExperimentConfig(
    name="tiny_train",
    model=TINY_SCOUT.replace(vocab_size=512, hidden_size=128, intermediate_size=128, intermediate_size_mlp=256,
                             num_hidden_layers=4, num_local_experts=4, attention_chunk_size=64, floor_scale=64),
    data=DataConfig(source="embedded", tokenizer="bpe:embedded", bpe_vocab_size=512),
    train=TrainConfig(batch_size=16, seq_len=128, steps=300, param_dtype="float32", compute_dtype="float32",
                      remat="none", log_every=10, eval_every=50, eval_batches=4, checkpoint_every=100),
    optim=OptimConfig(lr=1e-3, warmup_steps=30, schedule="cosine", weight_decay=0.01),
    mesh=MeshConfig(fsdp=-1),
)
