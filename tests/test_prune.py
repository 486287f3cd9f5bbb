"""Data pruning (llama4_jax.distill.prune, tools/prune_data.py): the kept examples are exactly the hardest ones
after the teacher-wrong drop, by scores recomputed here with a direct full forward; IFD equals its definition;
bad input is refused naming the value; a failed run leaves no output directory."""

import functools
import importlib.util
import json
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from llama4_jax.checkpoint import save_model
from llama4_jax.config import TINY_SCOUT
from llama4_jax.data import DataConfig, load_tokenizer
from llama4_jax.distill import DistillConfig, prune
from llama4_jax.distill.prune import PruneConfig, prune_dataset, select
from llama4_jax.distill.teacher import teacher_factory
from llama4_jax.experiment import ExperimentConfig, TrainConfig
from llama4_jax.sharding import MeshConfig, make_mesh

ROOT = pathlib.Path(__file__).parent.parent
SEQ_LEN = 32
TOLERANCE = 1e-4  # float32 chunked/batched/sharded sums vs one unchunked forward per model
TEACHER = TINY_SCOUT.replace(attention_chunk_size=16)
STUDENT = TEACHER.replace(hidden_size=32, intermediate_size=32, intermediate_size_mlp=64)
WORDS = ("def", "return", "self", "import", "the", "value", "of", "list", "for", "in", "range", "print", "zeta",
         "quux", "None", "True", "lambda", "x", "y", "=", "(", ")", ":", "0", "1")

EXPERIMENT_FILE = """
from llama4_jax.config import TINY_SCOUT
from llama4_jax.data import DataConfig
from llama4_jax.distill import DistillConfig
from llama4_jax.experiment import ExperimentConfig, TrainConfig
from llama4_jax.sharding import MeshConfig

TEACHER = TINY_SCOUT.replace(attention_chunk_size=16)
STUDENT = TEACHER.replace(hidden_size=32, intermediate_size=32, intermediate_size_mlp=64)
EXPERIMENT = ExperimentConfig(
    name="prune_test", model=STUDENT,
    train=TrainConfig(batch_size=8, seq_len={seq_len}, param_dtype="float32", compute_dtype="float32", remat="none"),
    data=DataConfig(source={source!r}, tokenizer="bpe:embedded", bpe_vocab_size=512),
    mesh=MeshConfig(fsdp=-1),
    distill=DistillConfig(teacher=TEACHER, teacher_checkpoint={teacher!r}, teacher_param_dtype="float32", chunk=16),
)
"""


def experiment(source, teacher_checkpoint) -> ExperimentConfig:
    return ExperimentConfig(
        name="prune_test", model=STUDENT,
        train=TrainConfig(batch_size=8, seq_len=SEQ_LEN, param_dtype="float32", compute_dtype="float32",
                          remat="none"),
        data=DataConfig(source=str(source), tokenizer="bpe:embedded", bpe_vocab_size=512),
        mesh=MeshConfig(fsdp=-1),
        distill=DistillConfig(teacher=TEACHER, teacher_checkpoint=str(teacher_checkpoint),
                              teacher_param_dtype="float32", chunk=16))


def one_device():
    return make_mesh(MeshConfig(fsdp=1, data=1), jax.devices()[:1])


def random_model(config, seed: int):
    """A model with N(0, 0.1) weights and unit norms, filled from numpy: compiling the model's own random
    init takes ~10 s on a busy CPU, this no time."""
    factory = teacher_factory(config, param_dtype="float32", compute_dtype="float32")
    graphdef, abstract = nnx.split(nnx.eval_shape(factory), nnx.Param)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: np.ones(a.shape, a.dtype) if "norm" in jax.tree_util.keystr(path)
        else (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
    return nnx.merge(graphdef, params)


def _text(rng, n):
    return " ".join(rng.choice(WORDS, size=n))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random tiny teacher and student saved as model checkpoints, a text corpus and a prompt/answer corpus."""
    root = tmp_path_factory.mktemp("prune")
    models = {}
    for name, config, seed in (("teacher", TEACHER, 1), ("student", STUDENT, 2)):
        models[name] = random_model(config, seed)
        save_model(models[name], root / name)
    rng = np.random.default_rng(0)
    texts = [_text(rng, n) for n in rng.integers(1, 40, size=21)]  # many exceed SEQ_LEN tokens: truncated
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    pairs = [{"prompt": _text(rng, int(p)), "answer": _text(rng, int(a))}
             for p, a in zip(rng.integers(1, 12, size=15), rng.integers(1, 20, size=15))]
    pairs.append({"prompt": _text(rng, 60), "answer": "x"})  # the prompt fills the window: nothing to score
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return {"root": root, "models": models, "texts": texts, "pairs": pairs,
            "tokenizer": load_tokenizer(DataConfig(tokenizer="bpe:embedded", bpe_vocab_size=512))}


def mean_ce(model, rows: list[tuple[list[int], int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-row mean CE and top-1 accuracy over targets from `first` on, from one full forward of the rows
    right-padded to SEQ_LEN (float64 on the host)."""
    ids = np.zeros((24, SEQ_LEN), np.int32)  # one shape for every call: one compilation per model
    for r, (tokens, _) in enumerate(rows):
        ids[r, :len(tokens) - 1] = tokens[:-1]
    graphdef, params = nnx.split(model, nnx.Param)
    logits = np.asarray(_forward(graphdef, params, ids), np.float64)
    ce, accuracy = [], []
    for r, (tokens, first) in enumerate(rows):
        n = len(tokens) - 1
        if n <= first:
            ce.append(np.nan)
            accuracy.append(np.nan)
            continue
        logp = logits[r, first:n] - np.log(np.sum(np.exp(logits[r, first:n]), -1, keepdims=True))
        targets = np.asarray(tokens[first + 1:n + 1])
        ce.append(-np.mean(logp[np.arange(len(targets)), targets]))
        accuracy.append(np.mean(np.argmax(logp, -1) == targets))
    return np.asarray(ce), np.asarray(accuracy)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, ids):
    return nnx.merge(graphdef, params)(ids)


def expected_selection(score, teacher_ce, keep_fraction, quantile=0.95):
    scorable = np.isfinite(score)
    wrong = scorable & (teacher_ce > np.quantile(teacher_ce[scorable], quantile))
    candidates = np.flatnonzero(scorable & ~wrong)
    keep = math.ceil(keep_fraction * len(candidates) - 1e-9)
    return set(candidates[np.argsort(-score[candidates])][:keep].tolist()), wrong


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_excess_loss_keeps_exactly_the_hardest_after_the_teacher_wrong_drop(setup, tmp_path):
    root, tok = setup["root"], setup["tokenizer"]
    experiment_file = tmp_path / "exp.py"
    experiment_file.write_text(EXPERIMENT_FILE.format(seq_len=SEQ_LEN, source=str(root / "corpus.jsonl"),
                                                      teacher=str(root / "teacher")))
    spec = importlib.util.spec_from_file_location("prune_data", ROOT / "tools" / "prune_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "out"
    summary = tool.main([str(experiment_file), "--out", str(out), "--student", str(root / "student"),
                         "--score", "excess_loss", "--keep", "0.5", "--split", "all", "--no-progress"])

    rows = [([tok.bos_id, *tok.encode(t), tok.eos_id][:SEQ_LEN + 1], 0) for t in setup["texts"]]
    teacher_ce, teacher_accuracy = mean_ce(setup["models"]["teacher"], rows)
    student_ce, _ = mean_ce(setup["models"]["student"], rows)
    excess = student_ce - teacher_ce
    kept, wrong = expected_selection(excess, teacher_ce, 0.5)

    scores = read_jsonl(out / "scores.jsonl")
    np.testing.assert_allclose([r["score"] for r in scores], excess, atol=TOLERANCE)
    np.testing.assert_allclose([r["teacher_ce"] for r in scores], teacher_ce, atol=TOLERANCE)
    np.testing.assert_allclose([r["teacher_accuracy"] for r in scores], teacher_accuracy, atol=TOLERANCE)
    assert all(r["kl"] > 0 for r in scores)
    assert {r["index"] for r in scores if r["kept"]} == kept
    assert [r["teacher_wrong"] for r in scores] == wrong.tolist() and wrong.sum() >= 1
    assert summary["kept"] == len(kept) == math.ceil(0.5 * (len(rows) - wrong.sum()))
    assert summary["teacher_wrong"] == wrong.sum() and summary["examples"] == len(rows) and summary["truncated"] > 0
    # kept.jsonl: the whole original records of the kept examples, in corpus order, trainable as a source
    originals = read_jsonl(root / "corpus.jsonl")
    assert read_jsonl(out / "kept.jsonl") == [originals[i] for i in sorted(kept)]
    assert (out / "scores.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["cut"] == pytest.approx(min(excess[list(kept)]),
                                                                                  abs=TOLERANCE)


def test_ifd_on_prompt_answer_pairs_equals_its_definition(setup, tmp_path):
    root, tok = setup["root"], setup["tokenizer"]
    exp = experiment(root / "pairs.jsonl", root / "teacher")
    config = PruneConfig(score="ifd", keep_fraction=0.25, split="all", batch_size=4)
    summary = prune_dataset(exp, tmp_path / "out", config, student_checkpoint=str(root / "student"),
                            mesh=one_device(), progress=False)

    conditional, alone = [], []
    for pair in setup["pairs"]:
        p, a = tok.encode(pair["prompt"]), tok.encode(pair["answer"])
        tokens = [tok.bos_id, *p, *a, tok.eos_id][:SEQ_LEN + 1]
        conditional.append((tokens, len(p)))
        alone.append(([tok.bos_id, *a, tok.eos_id][:max(0, len(tokens) - 1 - len(p)) + 1], 0))
    student_conditional, _ = mean_ce(setup["models"]["student"], conditional)
    student_alone, _ = mean_ce(setup["models"]["student"], alone)
    teacher_ce, _ = mean_ce(setup["models"]["teacher"], conditional)
    ifd = student_conditional / student_alone
    assert np.isnan(ifd[-1]) and np.isfinite(ifd[:-1]).all()

    scores = read_jsonl(tmp_path / "out" / "scores.jsonl")
    np.testing.assert_allclose([np.nan if r["score"] is None else r["score"] for r in scores], ifd, atol=TOLERANCE)
    np.testing.assert_allclose([r["answer_ce"] or np.nan for r in scores], student_alone, atol=TOLERANCE)
    kept, wrong = expected_selection(ifd, teacher_ce, 0.25)
    assert {r["index"] for r in scores if r["kept"]} == kept
    assert summary["unscorable"] == 1 and summary["kept"] == len(kept)
    assert read_jsonl(tmp_path / "out" / "kept.jsonl") == [setup["pairs"][i] for i in sorted(kept)]


def test_selection_keeps_the_fraction_of_candidates():
    rng = np.random.default_rng(1)
    n = 200
    scores = {"score": rng.normal(size=n), "teacher_ce": rng.gamma(2.0, size=n), "teacher_accuracy": rng.random(n)}
    scores["score"][:3] = np.nan
    for fraction in (0.05, 0.5, 1.0):
        chosen = select(scores, PruneConfig(keep_fraction=fraction))
        counts = chosen["counts"]
        assert counts["candidates"] == n - 3 - counts["teacher_wrong"]
        assert counts["kept"] == chosen["kept"].sum() == math.ceil(fraction * counts["candidates"] - 1e-9)
        assert abs(counts["teacher_wrong"] - 0.05 * (n - 3)) <= 1
        assert not (chosen["kept"] & chosen["teacher_wrong"]).any() and not chosen["kept"][:3].any()
        kept_scores = scores["score"][chosen["kept"]]
        others = scores["score"][chosen["scorable"] & ~chosen["kept"] & ~chosen["teacher_wrong"]]
        assert len(others) == 0 or kept_scores.min() >= others.max()
    chosen = select(scores, PruneConfig(teacher_wrong_quantile=None, teacher_min_accuracy=0.5))
    assert chosen["teacher_wrong"].sum() == ((scores["teacher_accuracy"] < 0.5) & np.isfinite(scores["score"])).sum()
    assert chosen["counts"]["teacher_wrong_by_ce"] == 0


def test_bad_input_is_refused_naming_the_value(setup, tmp_path):
    root = setup["root"]
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"keep_fraction.*{fraction}"):
            PruneConfig(keep_fraction=fraction)
    with pytest.raises(ValueError, match="'perplexity'"):
        PruneConfig(score="perplexity")
    with pytest.raises(ValueError, match="teacher_wrong_quantile.*1.5"):
        PruneConfig(teacher_wrong_quantile=1.5)
    exp = experiment(root / "pairs.jsonl", root / "teacher")
    with pytest.raises(ValueError, match="'instruction'"):
        prune_dataset(exp, tmp_path / "a", PruneConfig(score="ifd", prompt_field="instruction", split="all"),
                      student_checkpoint=str(root / "student"), mesh=one_device(), progress=False)
    with pytest.raises(ValueError, match="--student"):
        prune_dataset(experiment(root / "corpus.jsonl", root / "teacher"), tmp_path / "b", mesh=one_device())
    save_model(random_model(STUDENT.replace(vocab_size=1024), 3), tmp_path / "wide")
    with pytest.raises(ValueError, match="vocab_size \\(1024\\).*\\(512\\)"):
        prune_dataset(experiment(root / "corpus.jsonl", root / "teacher"), tmp_path / "c",
                      student_checkpoint=str(tmp_path / "wide"), mesh=one_device(), progress=False)
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_failed_run_leaves_no_output_directory(setup, tmp_path, monkeypatch):
    root = setup["root"]

    def crash(*args, **kwargs):
        raise RuntimeError("injected failure while plotting")

    monkeypatch.setattr(prune, "plot_scores", crash)
    with pytest.raises(RuntimeError, match="injected"):
        prune_dataset(experiment(root / "corpus.jsonl", root / "teacher"), tmp_path / "out",
                      PruneConfig(split="all", limit=8), student_checkpoint=str(root / "student"),
                      mesh=one_device(), progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the directory nor its temporary twin
