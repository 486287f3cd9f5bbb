"""Data pipeline: packing, determinism, resumption, process shards, sources, tokenizers and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from llama4_jax.data import (
    BATCH_KEYS,
    DataConfig,
    HFTokenizer,
    check_vocab,
    heldout_mask,
    iterator_checkpoint_args,
    load_tokenizer,
    make_iterator,
    open_documents,
    train_bpe,
)
from llama4_jax.data.embedded import embedded_documents

BOS, EOS, PAD = 1, 2, 0


class WordIds:
    """Test tokenizer: each whitespace-separated word is its integer id, so tokens name their document."""

    vocab_size, bos_id, eos_id, pad_id = 100_000, BOS, EOS, PAD

    def encode(self, text):
        return [int(w) for w in text.split()]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def doc_text(d, length):
    """Document d: tokens 1000 * (d + 1) + 0, 1, ...; doc_of(token) recovers d."""
    return " ".join(str(1000 * (d + 1) + i) for i in range(length))


def doc_of(token):
    return token // 1000 - 1


LENGTHS = [(d * 7) % 23 + 1 for d in range(60)]  # 1..23 tokens: short, long and split documents


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc_text(d, n), "id": d}) + "\n" for d, n in enumerate(LENGTHS)))
    return str(path)


@pytest.fixture(scope="module")
def bpe_cache(tmp_path_factory):
    """A private cache so the embedded BPE is trained once for the module and never touches ~/.cache."""
    return tmp_path_factory.mktemp("cache")


def batches(config, n=None, *, split="train", seq_len=16, batch_size=4, process_index=0, process_count=1,
            tokenizer=None, num_epochs=None):
    it = make_iterator(config, split=split, seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                       process_count=process_count, tokenizer=tokenizer or WordIds(), num_epochs=num_epochs)
    return [next(it) for _ in range(n)] if n is not None else list(it)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(x[key], y[key])


# --------------------------------------------------------------------------------------------------
# Packing


def test_packing_rows_rebuild_the_document_stream(jsonl):
    config = DataConfig(source=jsonl, shuffle=False)
    out = batches(config, split="train", num_epochs=1)
    docs = open_documents(config, "train")
    expected = np.concatenate([[BOS, *WordIds().encode(docs[i]), EOS] for i in range(len(docs))])
    rows = [np.append(b["inputs"][r], b["targets"][r, -1]) for b in out for r in range(4)]
    segs = [np.append(b["segment_ids"][r], 1) for b in out for r in range(4)]
    stream = np.concatenate([row[seg != 0] for row, seg in zip(rows, segs)])
    np.testing.assert_array_equal(stream[: len(expected)], expected)
    assert np.all(stream[len(expected):] == PAD)  # only the final row's padding remains


def test_packing_fields(jsonl):
    from llama4_jax.train.step import BATCH_KEYS as STEP_KEYS

    assert BATCH_KEYS == STEP_KEYS  # what the train step reads
    for b in batches(DataConfig(source=jsonl, shuffle=False), split="train", num_epochs=1):
        assert {k: (v.dtype, v.shape) for k, v in b.items()} == {
            "inputs": (np.int32, (4, 16)), "targets": (np.int32, (4, 16)), "weights": (np.float32, (4, 16)),
            "positions": (np.int32, (4, 16)), "segment_ids": (np.int32, (4, 16))}
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])  # shifted by one
        seg, pos, w = b["segment_ids"], b["positions"], b["weights"]
        for r in range(4):
            for t in range(16):
                if seg[r, t] == 0:  # padding: pad id, never trained on
                    assert b["inputs"][r, t] == PAD and w[r, t] == 0
                    continue
                starts = t == 0 or seg[r, t] != seg[r, t - 1]
                assert pos[r, t] == (0 if starts else pos[r, t - 1] + 1)  # positions restart per segment
                # Weight 1 exactly when the target continues the same document.
                same_doc = b["targets"][r, t] != BOS and b["targets"][r, t] != PAD
                if t + 1 < 16:
                    same_doc = same_doc and seg[r, t + 1] == seg[r, t]
                assert w[r, t] == same_doc, (r, t)


def test_eos_to_next_bos_has_zero_weight(jsonl):
    out = batches(DataConfig(source=jsonl, shuffle=False), 3)
    crossing = [(b["inputs"] == EOS) & (b["targets"] == BOS) for b in out]
    assert sum(c.sum() for c in crossing) > 0
    for b, c in zip(out, crossing):
        assert np.all(b["weights"][c] == 0)
        assert np.all(b["segment_ids"][:, 1:][c[:, :-1]] != b["segment_ids"][:, :-1][c[:, :-1]])


# --------------------------------------------------------------------------------------------------
# Order, resumption, shards


def test_deterministic_by_seed_and_seeds_differ(jsonl):
    a = batches(DataConfig(source=jsonl, seed=3), 6)
    assert_same(a, batches(DataConfig(source=jsonl, seed=3), 6))
    b = batches(DataConfig(source=jsonl, seed=4), 6)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


def test_resume_from_state_equals_uninterrupted(jsonl):
    config = DataConfig(source=jsonl, seed=1)
    kwargs = dict(split="train", seq_len=16, batch_size=4, process_index=0, process_count=1, tokenizer=WordIds())
    reference = batches(config, 40)  # > one epoch of this corpus, so the reshuffle is crossed too
    it = make_iterator(config, **kwargs)
    for _ in range(13):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as it travels through a JSON checkpoint
    resumed = make_iterator(config, **kwargs)
    resumed.set_state(state)
    assert_same([next(resumed) for _ in range(27)], reference[13:])


def test_orbax_checkpoint_of_iterator(jsonl, tmp_path):
    import orbax.checkpoint as ocp

    config = DataConfig(source=jsonl, seed=2)
    kwargs = dict(split="train", seq_len=16, batch_size=4, process_index=0, process_count=1, tokenizer=WordIds())
    it = make_iterator(config, **kwargs)
    for _ in range(5):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data=iterator_checkpoint_args(it)))
        manager.wait_until_finished()
        expected = [next(it) for _ in range(4)]
        restored = make_iterator(config, **kwargs)
        manager.restore(5, args=ocp.args.Composite(data=iterator_checkpoint_args(restored, restore=True)))
    assert_same([next(restored) for _ in range(4)], expected)


def test_processes_read_disjoint_documents_covering_the_split(jsonl):
    config = DataConfig(source=jsonl, seed=5)

    def docs_read(index, count):
        out = batches(config, split="train", batch_size=4, process_index=index, process_count=count, num_epochs=1)
        assert all(b["inputs"].shape == (4 // count, 16) for b in out)
        tokens = np.concatenate([b["inputs"].ravel() for b in out])
        return {doc_of(t) for t in tokens if t >= 1000}

    first, second = docs_read(0, 2), docs_read(1, 2)
    assert first and second and not first & second
    assert first | second == docs_read(0, 1)


def test_heldout_split_is_disjoint_from_train(jsonl):
    config = DataConfig(source=jsonl)
    train = {doc_of(int(open_documents(config, "train")[i].split()[0])) for i in range(len(
        open_documents(config, "train")))}
    held = {doc_of(int(d.split()[0])) for d in (open_documents(config, "eval")[i] for i in range(len(
        open_documents(config, "eval"))))}
    assert held and not train & held and train | held == set(range(len(LENGTHS)))
    assert set(np.flatnonzero(heldout_mask(len(LENGTHS), 0.05))) == held
    # The embedded corpus: about one document in 20 held out, by name disjoint from train.
    names = [name for name, _ in embedded_documents()]
    mask = heldout_mask(len(names), 0.05)
    assert 0.02 < mask.mean() < 0.09 and len(names) > 200
    embedded = DataConfig()
    eval_texts = [open_documents(embedded, "eval")[i] for i in range(len(open_documents(embedded, "eval")))]
    assert eval_texts == [t for (_, t), m in zip(embedded_documents(), mask) if m]


# --------------------------------------------------------------------------------------------------
# Sources


def test_jsonl_txt_parquet_array_record_sources_agree(jsonl, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    texts = [doc_text(d, n) for d, n in enumerate(LENGTHS)]
    txt = tmp_path / "txt"
    txt.mkdir()
    for d, t in enumerate(texts):
        (txt / f"{d:03d}.txt").write_text(t)
    pq.write_table(pa.table({"body": texts}), tmp_path / "docs.parquet", row_group_size=16)
    writer = ArrayRecordWriter(str(tmp_path / "docs.array_record"), "group_size:1")
    for t in texts:
        writer.write(t.encode())
    writer.close()
    configs = [DataConfig(source=jsonl), DataConfig(source=str(txt)),
               DataConfig(source=str(tmp_path / "docs.parquet"), text_field="body"),
               DataConfig(source=str(tmp_path / "docs.array_record"))]
    for config in configs:
        docs = open_documents(config, "all")
        assert [docs[i] for i in range(len(docs))] == texts, config.source
    reference = batches(configs[0], 5)
    for config in configs[1:]:
        assert_same(batches(config, 5), reference)


def test_tfds_data_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyText(tfds.core.GeneratorBasedBuilder):
        """A tiny TFDS dataset prepared offline in the ArrayRecord format that tfds.data_source reads."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 40), "validation": self._generate_examples(40, 50)}

        def _generate_examples(self, lo, hi):
            for d in range(lo, hi):
                yield d, {"text": doc_text(d, LENGTHS[d])}

    TinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = DataConfig(source="tfds:tiny_text", data_dir=str(tmp_path), seed=7)
    train, held = open_documents(config, "train"), open_documents(config, "eval")
    assert len(train) == 40 and len(held) == 10
    assert {doc_of(int(held[i].split()[0])) for i in range(10)} == set(range(40, 50))
    out = batches(config, 3)
    assert out[0]["inputs"].shape == (4, 16)
    assert_same(out, batches(DataConfig(source="tfds:tiny_text:train", data_dir=str(tmp_path), seed=7), 3))
    with pytest.raises(ValueError, match="tfds:no_such_dataset"):
        open_documents(DataConfig(source="tfds:no_such_dataset", data_dir=str(tmp_path)), "train")


def test_prepare_data_round_trip(jsonl, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "tools"))
    import prepare_data

    tokenizer_path = tmp_path / "tokenizer.json"
    train_bpe([doc_text(d, n) for d, n in enumerate(LENGTHS)], 300).save(str(tokenizer_path))
    out = tmp_path / "tokens"
    prepare_data.main(["--source", jsonl, "--tokenizer", str(tokenizer_path), "--out", str(out),
                       "--num-shards", "3", "--no-progress"])
    metadata = json.loads((out / "llama4_jax_tokens.json").read_text())
    assert metadata["num_documents"] == len(LENGTHS) and metadata["num_shards"] == 3
    tokenizer = HFTokenizer.from_file(tokenizer_path)
    tokens = open_documents(DataConfig(source=str(out), tokenizer=str(tokenizer_path)), "all")
    texts = open_documents(DataConfig(source=jsonl), "all")
    for i in range(len(texts)):
        np.testing.assert_array_equal(tokens[i], [tokenizer.bos_id, *tokenizer.encode(texts[i]), tokenizer.eos_id])
    assert tokenizer.decode(tokens[5][1:-1]) == texts[5]
    # Training from the shards gives the batches that tokenizing on the fly gives, held-out split included.
    for split in ("train", "eval"):
        from_text = batches(DataConfig(source=jsonl, tokenizer=str(tokenizer_path)), 4, split=split,
                            tokenizer=tokenizer)
        from_tokens = batches(DataConfig(source=str(out), tokenizer=str(tokenizer_path)), 4, split=split,
                              tokenizer=tokenizer)
        assert_same(from_tokens, from_text)
    with pytest.raises(ValueError, match="not empty"):
        prepare_data.main(["--source", jsonl, "--tokenizer", str(tokenizer_path), "--out", str(out), "--no-progress"])
    with pytest.raises(ValueError, match="token shards were written with"):
        batches(DataConfig(source=str(out)), 1, tokenizer=WordIds())


# --------------------------------------------------------------------------------------------------
# Tokenizers


def test_tokenizer_json_from_the_tokenizers_library(tmp_path):
    texts = ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog"] * 20
    train_bpe(texts, 300).save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_tokenizer(DataConfig(tokenizer=str(tmp_path)))  # a directory holding tokenizer.json works too
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.vocab_size <= 300
    text = "the lazy fox: def g(y) -> ünïcode ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level: any text round-trips
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|pad|>", "eos_token": {
        "content": "<|begin_of_text|>"}}))
    named = load_tokenizer(DataConfig(tokenizer=str(tmp_path / "tokenizer.json")))
    assert (named.bos_id, named.eos_id) == (2, 0)


def test_embedded_bpe_is_cached_and_round_trips(bpe_cache, monkeypatch):
    monkeypatch.setenv("LLAMA4_JAX_CACHE", str(bpe_cache))
    tokenizer = load_tokenizer(DataConfig())
    assert tokenizer.vocab_size == 512 and (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    cached = list(bpe_cache.glob("bpe-embedded-v512-*.json"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = load_tokenizer(DataConfig())
    assert cached[0].stat().st_mtime_ns == mtime  # loaded, not retrained
    text = embedded_documents()[0][1][:500]
    assert again.encode(text) == tokenizer.encode(text) and tokenizer.decode(tokenizer.encode(text)) == text
    out = batches(DataConfig(), 2, seq_len=64, batch_size=2, tokenizer=tokenizer)
    assert out[0]["inputs"].max() < 512 and out[0]["weights"].sum() > 0


def test_llama4_tokenizer_from_llama_models():
    pytest.importorskip("llama_models")
    tokenizer = load_tokenizer(DataConfig(tokenizer="llama4"))
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (202048, 200000, 200001,
                                                                                         200018)
    ids = tokenizer.encode("Hello, Llama 4! <|begin_of_text|>")
    assert 200000 not in ids and tokenizer.decode(ids) == "Hello, Llama 4! <|begin_of_text|>"


def test_check_vocab_names_both_sizes():
    check_vocab(WordIds(), 100_000)
    with pytest.raises(ValueError, match="100000.*512"):
        check_vocab(WordIds(), 512)
    with pytest.raises(ValueError, match="100000.*512"):
        make_iterator(DataConfig(), split="train", seq_len=8, batch_size=2, process_index=0, process_count=1,
                      tokenizer=WordIds(), vocab_size=512)


# --------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_before_training(jsonl, tmp_path):
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(ValueError, match="no_such_dir.*does not exist"):
        batches(DataConfig(source=missing), 1)
    with pytest.raises(ValueError, match="unknown source kind '.csv'"):
        DataConfig(source="data.csv")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "missing.json")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no documents"):
        batches(DataConfig(source=str(tmp_path / "empty.jsonl")), 1)
    (tmp_path / "nodata").mkdir()
    with pytest.raises(ValueError, match="no .jsonl"):
        batches(DataConfig(source=str(tmp_path / "nodata")), 1)
    with pytest.raises(ValueError, match="no field 'body'"):
        batches(DataConfig(source=jsonl, text_field="body"), 1)
    with pytest.raises(ValueError, match="divisible"):
        batches(DataConfig(source=jsonl), 1, batch_size=3, process_count=2)
    for bad in (dict(eval_fraction=1.0), dict(seed=-1), dict(num_workers=-1), dict(bpe_vocab_size=100),
                dict(source="tfds:"), dict(tokenizer="")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DataConfig(**bad)


def test_worker_processes_give_the_in_process_batches(jsonl, tmp_path):
    train_bpe([doc_text(d, n) for d, n in enumerate(LENGTHS)], 300).save(str(tmp_path / "tokenizer.json"))
    tokenizer = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    kwargs = dict(split="train", seq_len=16, batch_size=4, process_index=0, process_count=1, tokenizer=tokenizer)
    reference = batches(DataConfig(source=jsonl, seed=1), 12, tokenizer=tokenizer)
    config = DataConfig(source=jsonl, seed=1, num_workers=1)  # one worker reads every document, in order
    iterators = [make_iterator(config, **kwargs) for _ in range(2)]
    try:
        first, resumed = iterators
        out = [next(first) for _ in range(5)]
        state = json.loads(json.dumps(first.get_state()))
        out += [next(first) for _ in range(7)]
        assert_same(out, reference)
        resumed.set_state(state)
        assert_same([next(resumed) for _ in range(7)], reference[5:])
    finally:
        for it in iterators:
            it.close()
