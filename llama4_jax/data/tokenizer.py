"""Tokenizers behind one small interface: Hugging Face tokenizer.json files, Meta's Llama 4 tokenizer, and a
byte-level BPE trained on the embedded corpus.

Every tokenizer here encodes plain text without special tokens; packing adds bos/eos around each document.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import tokenizers

# Looked up in this order when a tokenizer.json has no tokenizer_config.json beside it naming its tokens.
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|bos|>")
_EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|eos|>", "<|eot_id|>")
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|finetune_right_pad|>", "<pad>", "<|pad|>", "[PAD]")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer. `encode` adds no special tokens."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A `tokenizers.Tokenizer` (tokenizer.json) with resolved bos/eos/pad ids. Picklable for grain workers."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos: str | None, eos: str, pad: str | None,
                 name: str = "tokenizer.json"):
        self.name = name
        self._tokenizer = tokenizer
        ids = {}
        for role, token in (("eos", eos), ("bos", bos), ("pad", pad)):
            ids[role] = None if token is None else tokenizer.token_to_id(token)
            if token is not None and ids[role] is None:
                raise ValueError(f"{name}: {role} token {token!r} is not in the vocabulary")
        self.eos_id = ids["eos"]
        # GPT-2-style vocabularies have a single <|endoftext|>; it then both opens and closes documents.
        self.bos_id = ids["eos"] if ids["bos"] is None else ids["bos"]
        # Padding is never trained on (weight 0), so any id works; eos keeps decoded samples readable.
        self.pad_id = ids["eos"] if ids["pad"] is None else ids["pad"]
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(len(vocab), max(vocab.values()) + 1)

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """Load tokenizer.json (or a directory holding it); special tokens from tokenizer_config.json if present."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"data.tokenizer: {str(path)!r} does not exist (expected a Hugging Face tokenizer.json)")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust error names only the JSON problem, not the file
            raise ValueError(f"data.tokenizer: {str(path)!r} is not a valid tokenizer.json: {e}") from e
        roles = _special_tokens(path.parent / "tokenizer_config.json")
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        for role, candidates in (("bos", _BOS_CANDIDATES), ("eos", _EOS_CANDIDATES), ("pad", _PAD_CANDIDATES)):
            if roles.get(role) is None:
                roles[role] = next((t for t in candidates if t in vocab), None)
        if roles["eos"] is None:
            raise ValueError(f"data.tokenizer: {str(path)!r} has no end-of-text token; add tokenizer_config.json with "
                             f"'eos_token', or use a vocabulary with one of {list(_EOS_CANDIDATES)}")
        return cls(tokenizer, bos=roles["bos"], eos=roles["eos"], pad=roles["pad"], name=str(path))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes several texts at once (in parallel in the Rust library)."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self._tokenizer.save(str(path))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _special_tokens(config_path: Path) -> dict[str, str | None]:
    if not config_path.is_file():
        return {}
    config = json.loads(config_path.read_text())
    out = {}
    for role in ("bos", "eos", "pad"):
        token = config.get(f"{role}_token")
        out[role] = token.get("content") if isinstance(token, dict) else token
    return out


class Llama4Tokenizer:
    """Meta's Llama 4 tokenizer (tiktoken, 202048 ids) from the `llama-models` package, whose wheel ships the
    tokenizer.model file. Pickles as a reference, so grain workers load their own copy."""

    def __init__(self):
        try:
            from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer
        except ImportError as e:
            raise ValueError("data.tokenizer 'llama4' needs Meta's llama-models package: "
                             "pip install 'llama4_jax[llama]'") from e
        self._tokenizer = MetaTokenizer.get_instance()
        self.name = "llama4"
        self.vocab_size = self._tokenizer.n_words
        self.bos_id = self._tokenizer.bos_id  # <|begin_of_text|> 200000
        self.eos_id = self._tokenizer.eos_id  # <|end_of_text|> 200001
        self.pad_id = self._tokenizer.pad_id  # <|finetune_right_pad|> 200018, HF's pad_token_id

    def encode(self, text: str) -> list[int]:
        # Special-token text in raw data is encoded as ordinary text (llama-models' default), never as control ids.
        return self._tokenizer.encode(text, bos=False, eos=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def __reduce__(self):
        return (Llama4Tokenizer, ())

    def __repr__(self) -> str:
        return f"Llama4Tokenizer(vocab_size={self.vocab_size})"


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """tokenizer.encode over texts, batched where the tokenizer supports it."""
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(t) for t in texts]


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """ValueError unless every id the tokenizer can produce fits the model's embedding table."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}; "
                         f"use a model with vocab_size >= {tokenizer.vocab_size} or a smaller tokenizer")


def load_tokenizer(config) -> Tokenizer:
    """The tokenizer a DataConfig names: "bpe:embedded", "llama4", or a tokenizer.json path (file or directory)."""
    spec = config.tokenizer
    if spec == "bpe:embedded":
        from llama4_jax.data.embedded import embedded_bpe  # embedded.py builds on this module

        return embedded_bpe(config.bpe_vocab_size, eval_fraction=config.eval_fraction)
    if spec == "llama4":
        return Llama4Tokenizer()
    if spec.startswith("bpe:"):
        raise ValueError(f"data.tokenizer {spec!r}: the only trained BPE is 'bpe:embedded'")
    return HFTokenizer.from_file(spec)
