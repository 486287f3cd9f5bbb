"""Tokenize a data source into ArrayRecord shards for training (a thin wrapper over
`llama4_jax.data.prepare_shards`).

    python tools/prepare_data.py --source corpus.jsonl --tokenizer llama4 --out data/corpus-llama4 --num-shards 16
    python tools/prepare_data.py --source tfds:lm1b --tokenizer path/to/tokenizer.json --out data/lm1b

Train on the result with DataConfig(source="data/corpus-llama4", tokenizer=<the same tokenizer>).
"""

from __future__ import annotations

import argparse
import json

from llama4_jax.data import DataConfig, load_tokenizer, prepare_shards


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="embedded",
                        help="'embedded', 'tfds:NAME[:SPLIT]', or a .jsonl/.txt/.parquet/.array_record file or dir")
    parser.add_argument("--text-field", default="text", help="field holding the text (jsonl, parquet, tfds)")
    parser.add_argument("--tokenizer", default="bpe:embedded", help="'bpe:embedded', 'llama4' or a tokenizer.json")
    parser.add_argument("--bpe-vocab-size", type=int, default=512)
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir")
    parser.add_argument("--split", default="all", choices=("all", "train", "eval"),
                        help="documents to write; 'all' keeps the source's held-out documents identifiable")
    parser.add_argument("--out", required=True, help="output directory (created; must not hold other files)")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = DataConfig(source=args.source, text_field=args.text_field, tokenizer=args.tokenizer,
                        bpe_vocab_size=args.bpe_vocab_size, data_dir=args.data_dir)
    metadata = prepare_shards(config, args.out, tokenizer=load_tokenizer(config), num_shards=args.num_shards,
                              split=args.split, overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps(metadata, indent=2))
    return metadata


if __name__ == "__main__":
    main()
