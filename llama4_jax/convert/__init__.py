"""Checkpoint conversion between Hugging Face and llama4_jax."""
