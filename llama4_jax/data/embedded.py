"""The embedded corpus: text every Python installation already has, so demos and tests download nothing.

Documents are the standard library's documentation topics (`pydoc_data.topics.topics`, the text of
`help("TOPIC")`) followed by a fixed selection of its `*.py` sources. No third-party text is committed to the
repository. The corpus differs between Python versions, so the BPE cache is keyed on a hash of its text.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llama4_jax.data.config import heldout_mask
from llama4_jax.data.tokenizer import HFTokenizer

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
# Test suites, vendored packages and GUI demos are skipped: repetitive or not ordinary library code.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                        "__pycache__", "ensurepip"})
_SOURCE_BUDGET = 6_000_000  # bytes of *.py source: ~3M tokens at vocab 512, BPE training in ~2 s on 2 cores


@functools.lru_cache(maxsize=1)
def embedded_documents() -> tuple[tuple[str, str], ...]:
    """((name, text), ...) in a fixed order: doc topics sorted by name, then stdlib sources sorted by path."""
    from pydoc_data.topics import topics

    docs = [(f"pydoc:{name}", topics[name]) for name in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    # A budget over a hash order of the paths samples the whole library rather than its first letters.
    files.sort(key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).digest())
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size <= _SOURCE_BUDGET:
            chosen.append(path)
            total += size
    for path in sorted(chosen, key=lambda p: p.relative_to(root).as_posix()):
        docs.append((f"stdlib:{path.relative_to(root).as_posix()}", path.read_text(encoding="utf-8", errors="replace")))
    return tuple(docs)


def embedded_split(split: str, eval_fraction: float) -> list[str]:
    """Texts of the "train", "eval" or "all" documents of the embedded corpus, in corpus order."""
    texts = [text for _, text in embedded_documents()]
    if split == "all":
        return texts
    held = heldout_mask(len(texts), eval_fraction)
    return [t for t, h in zip(texts, held) if h == (split == "eval")]


def cache_dir() -> Path:
    """$LLAMA4_JAX_CACHE, else ~/.cache/llama4_jax."""
    return Path(os.environ.get("LLAMA4_JAX_CACHE") or Path.home() / ".cache" / "llama4_jax")


def train_bpe(texts: Sequence[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2 pre-tokenization, every byte in the base alphabet, so any text encodes) with
    ids 0, 1, 2 = bos, eos, pad. Deterministic for the same texts."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def embedded_bpe(vocab_size: int = 512, *, eval_fraction: float = 0.05) -> HFTokenizer:
    """The BPE trained on the embedded corpus's train split, cached as tokenizer.json under `cache_dir()`."""
    texts = embedded_split("train", eval_fraction)
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
    path = cache_dir() / f"bpe-embedded-v{vocab_size}-{digest}.json"
    if not path.is_file():
        tokenizer = train_bpe(texts, vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Several processes of one host may train at once; each writes a private file and renames it into place.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        tokenizer.save(tmp)
        os.replace(tmp, path)
    return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), bos=BOS, eos=EOS, pad=PAD,
                       name=f"bpe:embedded({vocab_size})")
