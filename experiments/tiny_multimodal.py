"""A tiny Llama 4 with a vision tower trained on image+text records, the tower frozen (train.train_vision_tower).

Make the toy captioning data first (colored boxes, "a red box on blue."), then train:

    python -c "from llama4_jax.data.image_text import write_synthetic_dataset as w; w('data/shapes', 512)"
    llama4-jax train experiments/tiny_multimodal.py --workdir runs/tiny_multimodal

56-pixel tiles of 14-pixel patches give 4 <|patch|> tokens per tile; images of up to 4 tiles plus the global
tile fill the 5 tile slots of each row. The embedded BPE has no image tokens, so they are appended after its
512 ids (<|patch|> = 517) and the model's vocabulary holds 520."""

from llama4_jax.config import TINY_SCOUT
from llama4_jax.data.config import DataConfig
from llama4_jax.experiment import ExperimentConfig, TrainConfig
from llama4_jax.multimodal_config import Llama4VisionConfig
from llama4_jax.sharding import MeshConfig
from llama4_jax.train.optim import OptimConfig

EXPERIMENT = ExperimentConfig(
    name="tiny_multimodal",
    model=TINY_SCOUT.replace(vocab_size=520, num_hidden_layers=2),
    vision=Llama4VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              vision_output_dim=64, image_size=56, patch_size=14, projector_input_dim=64,
                              projector_output_dim=64),
    image_token_index=517,
    data=DataConfig(source="data/shapes/train.jsonl", tokenizer="bpe:embedded", bpe_vocab_size=512,
                    max_image_tiles=4, image_tiles_per_example=5, eval_fraction=0.05),
    train=TrainConfig(batch_size=8, seq_len=64, steps=200, param_dtype="float32", compute_dtype="float32",
                      remat="none", log_every=10, eval_every=50, eval_batches=2, checkpoint_every=100),
    optim=OptimConfig(lr=1e-3, warmup_steps=20, schedule="cosine", weight_decay=0.01),
    mesh=MeshConfig(fsdp=-1),
)
