"""Training data: documents from the embedded corpus, TFDS, ArrayRecord, jsonl, txt or parquet, tokenized and
packed into fixed-length rows by grain pipelines.

>>> config = DataConfig(source="embedded", tokenizer="bpe:embedded")
>>> tokenizer = load_tokenizer(config)
>>> check_vocab(tokenizer, model_config.vocab_size)
>>> it = make_iterator(config, split="train", seq_len=128, batch_size=8, process_index=0, process_count=1,
...                    tokenizer=tokenizer)
>>> batch = next(it)   # {"inputs", "targets", "weights", "positions", "segment_ids"}: (8, 128) each
>>> state = it.get_state(); it.set_state(state)
"""

from llama4_jax.data.config import DataConfig, heldout_mask
from llama4_jax.data.embedded import embedded_bpe, embedded_documents, train_bpe
from llama4_jax.data.pipeline import BATCH_KEYS, iterator_checkpoint_args, make_dataset, make_iterator
from llama4_jax.data.prepare import prepare_shards
from llama4_jax.data.sources import open_documents
from llama4_jax.data.tokenizer import HFTokenizer, Llama4Tokenizer, Tokenizer, check_vocab, load_tokenizer

__all__ = [
    "BATCH_KEYS", "DataConfig", "HFTokenizer", "Llama4Tokenizer", "Tokenizer", "check_vocab", "embedded_bpe",
    "embedded_documents", "heldout_mask", "iterator_checkpoint_args", "load_tokenizer", "make_dataset",
    "make_iterator", "open_documents", "prepare_shards", "train_bpe",
]
