"""Data pruning: score every example by difficulty, drop what the teacher itself gets wrong, keep the hardest.

Scores (per example, per-token means over its scored tokens; higher = harder = kept first):

  excess_loss  CE_S - CE_T: what the student still has to learn that the teacher knows (Rho-1's excess loss)
  kl           KL(p_T || p_S) at temperature 1
  ifd          L(answer | prompt) / L(answer) of one model, the student by default (instruction-following
               difficulty, Li et al., NAACL 2024): near or above 1 when the prompt does not help with the answer

Examples are scored whole, one per row, never packed: a document is [bos] + tokens + [eos] as the training
pipeline frames it, truncated to train.seq_len + 1 tokens and padded on the right with weight 0 (attention is
causal, so padding never reaches a real token). Prompt/answer records (jsonl) are [bos] + prompt + answer +
[eos] with only the answer tokens and eos scored; L(answer) scores the same answer tokens after [bos] alone.

Teacher wrong (dropped before the cut, as noise rather than hard data): an example whose mean teacher CE is
strictly above the `teacher_wrong_quantile` quantile (default 0.95, linear interpolation) of the teacher CEs of
all scored examples, or whose teacher top-1 accuracy on its tokens is below `teacher_min_accuracy` (off by
default). Either rule may be switched off (None).

The cut keeps ceil(keep_fraction x candidates) examples, candidates being the scored examples that are not
teacher-wrong; ties go to the earlier example. See `prune_dataset` for what is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama4_jax import loops
from llama4_jax.distill.prune_examples import Examples, batch_arrays
from llama4_jax.sharding import TRAIN_RULES, logical_to_spec, make_mesh, use_sharding
from llama4_jax.train.losses import chunk_size_for

SCORES = ("excess_loss", "kl", "ifd")
IFD_MODELS = ("student", "teacher")
PRUNE_SPLITS = ("train", "eval", "all")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """What to score, how much to keep, and which examples count as teacher errors (see the module doc)."""

    score: str = "excess_loss"
    keep_fraction: float = 0.5  # 0.5 as for Maverick's SFT data, 0.05 as for Behemoth's
    teacher_wrong_quantile: float | None = 0.95  # None: no CE rule
    teacher_min_accuracy: float | None = None  # None: no accuracy rule
    pairs: bool = False  # prompt/answer jsonl records (always so for ifd)
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    ifd_model: str = "student"
    split: str = "train"  # of data.source, as training splits it ("all": every document)
    batch_size: int | None = None  # None: train.batch_size
    limit: int | None = None  # score only the first `limit` examples of the split
    student_param_dtype: str | None = None  # None: train.param_dtype
    chunk: int = 1024  # sequence chunk: one chunk of float32 logits per model is alive at a time

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; scores: {SCORES}")
        if not isinstance(self.keep_fraction, int | float) or not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction!r}")
        if self.teacher_wrong_quantile is not None and not 0.0 < self.teacher_wrong_quantile < 1.0:
            raise ValueError(f"teacher_wrong_quantile must be in (0, 1) or None, got {self.teacher_wrong_quantile!r}")
        if self.teacher_min_accuracy is not None and not 0.0 <= self.teacher_min_accuracy <= 1.0:
            raise ValueError(f"teacher_min_accuracy must be in [0, 1] or None, got {self.teacher_min_accuracy!r}")
        for name in ("prompt_field", "answer_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.prompt_field == self.answer_field:
            raise ValueError(f"prompt_field and answer_field must differ, both are {self.prompt_field!r}")
        if self.ifd_model not in IFD_MODELS:
            raise ValueError(f"ifd_model must be one of {IFD_MODELS}, got {self.ifd_model!r}")
        if self.split not in PRUNE_SPLITS:
            raise ValueError(f"split must be one of {PRUNE_SPLITS}, got {self.split!r}")
        for name in ("batch_size", "limit", "chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.student_param_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"student_param_dtype must be 'float32' or 'bfloat16', got {self.student_param_dtype!r}")

    @property
    def uses_pairs(self) -> bool:
        return self.pairs or self.score == "ifd"

    @property
    def filters_teacher(self) -> bool:
        return self.teacher_wrong_quantile is not None or self.teacher_min_accuracy is not None

    @property
    def needs_teacher(self) -> bool:
        return self.score != "ifd" or self.ifd_model == "teacher" or self.filters_teacher

    @property
    def needs_student(self) -> bool:
        return self.score != "ifd" or self.ifd_model == "student"


# --------------------------------------------------------------------------------------------------
# Models


def load_models(experiment, config: PruneConfig, student_checkpoint: str | None, mesh) -> dict[str, Any]:
    """{"teacher": Teacher, "student": Teacher}, only those the score and the teacher-wrong rule need.

    The teacher is the experiment's distill section; the student is read from `student_checkpoint` (any
    checkpoint `load_teacher` reads) with the config stored in it (HF or model checkpoints) or else
    `experiment.model` (training runs, whose stored config is checked against it)."""
    from llama4_jax.distill.config import DistillConfig
    from llama4_jax.distill.teacher import load_teacher

    models = {}
    if config.needs_teacher:
        if experiment.distill is None:
            raise ValueError(f"score {config.score!r} with the teacher-wrong rule needs a teacher, but experiment "
                             f"{experiment.name!r} has no distill section (for ifd of the student alone, switch the "
                             f"rule off: teacher_wrong_quantile=None, teacher_min_accuracy=None)")
        models["teacher"] = load_teacher(experiment.distill, experiment.train, mesh)
    if config.needs_student:
        if not student_checkpoint:
            raise ValueError(f"score {config.score!r} needs the student: pass its checkpoint (--student)")
        student_config = checkpoint_config(student_checkpoint) or experiment.model
        dtype = config.student_param_dtype or experiment.train.param_dtype
        base = experiment.distill or DistillConfig(teacher=student_config)
        spec = base.replace(teacher=student_config, teacher_checkpoint=str(student_checkpoint),
                            teacher_param_dtype=dtype)
        models["student"] = load_teacher(spec, experiment.train, mesh)
    check_vocabularies(models)
    return models


def checkpoint_config(path: str | pathlib.Path):
    """The model config stored in an HF directory or a model checkpoint; None for a training run."""
    from llama4_jax.distill.teacher import checkpoint_kind

    path = pathlib.Path(path)
    kind = checkpoint_kind(path)
    if kind == "hf":
        from llama4_jax.convert.load import open_hf

        return open_hf(path).config
    if kind == "model":
        from llama4_jax.checkpoint import ParamReader

        return ParamReader(path).config
    return None


def check_vocabularies(models: dict[str, Any]) -> None:
    """ValueError unless teacher and student share one vocabulary (scores compare distributions over it)."""
    if {"teacher", "student"} <= models.keys():
        t, s = models["teacher"].config.vocab_size, models["student"].config.vocab_size
        if t != s:
            raise ValueError(f"student vocab_size ({s}) differs from the teacher's vocab_size ({t}): excess loss, KL "
                             f"and the teacher-wrong rule compare the two models over one vocabulary")


def make_sums_fn(graphdefs: dict[str, Any], *, kl: bool, chunk: int = 1024):
    """sums(params, batch) -> per-row float32 sums, each (B,): "{name}_ce", "{name}_correct" for every model,
    "kl" (KL(p_T || p_S), with kl=True: models "teacher" and "student") and "tokens".

    params: {name: nnx.State}; batch: "inputs", "targets" int32 (B, T), "weights" float32 (B, T). Logits are
    computed in float32 one sequence chunk at a time, so (B, T, V) never exists (V = 202048 at scale)."""
    names = tuple(graphdefs)

    def sums(params, batch):
        modules = {n: nnx.merge(graphdefs[n], params[n]) for n in names}
        hidden = {n: m.model(batch["inputs"]) for n, m in modules.items()}
        b, t = batch["inputs"].shape
        size = chunk_size_for(t, chunk)
        split = lambda x: x.reshape(b, t // size, size, *x.shape[2:]).swapaxes(0, 1)  # (T/c, B, c, ...)

        def one(carry, xs):
            hs, y, w = xs
            logp = {n: jax.nn.log_softmax(modules[n].logits(hs[n]).astype(jnp.float32), axis=-1) for n in names}
            out = {}
            for n in names:
                out[f"{n}_ce"] = -jnp.sum(jnp.take_along_axis(logp[n], y[..., None], axis=-1)[..., 0] * w, axis=1)
                out[f"{n}_correct"] = jnp.sum((jnp.argmax(logp[n], axis=-1) == y) * w, axis=1)
            if kl:
                lt, ls = logp["teacher"], logp["student"]
                out["kl"] = jnp.sum(jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1) * w, axis=1)
            return jax.tree.map(jnp.add, carry, out), None

        keys = [f"{n}_{k}" for n in names for k in ("ce", "correct")] + (["kl"] if kl else [])
        init = {k: jnp.zeros((b,), jnp.float32) for k in keys}
        weights = batch["weights"].astype(jnp.float32)
        totals, _ = loops.scan(one, init, ({n: split(h) for n, h in hidden.items()}, split(batch["targets"]),
                                           split(weights)))
        return {**totals, "tokens": jnp.sum(weights, axis=1)}

    return sums


# --------------------------------------------------------------------------------------------------
# Examples


def score_examples(models: dict[str, Any], examples: Examples, config: PruneConfig, *, batch_size: int, mesh,
                   progress: bool = True) -> dict[str, np.ndarray]:
    """Per-example float arrays (N,): "tokens", "{model}_ce", "{model}_accuracy" (per-token means), "kl" when
    both models run, for ifd "answer_ce" (L(answer) of the ifd model), and "score" (NaN: nothing to score)."""
    from tqdm import tqdm

    spec = logical_to_spec(("batch", "length"), TRAIN_RULES)
    shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(spec[0]))
    if batch_size % shards:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the mesh's batch axes ({shards} devices)")
    sharding, replicated = NamedSharding(mesh, spec), NamedSharding(mesh, PartitionSpec())
    kl = {"teacher", "student"} <= models.keys()
    main = jax.jit(make_sums_fn({n: m.graphdef for n, m in models.items()}, kl=kl, chunk=config.chunk),
                   out_shardings=replicated)
    ifd_name = config.ifd_model
    alone = jax.jit(make_sums_fn({ifd_name: models[ifd_name].graphdef}, kl=False, chunk=config.chunk),
                    out_shardings=replicated) if config.score == "ifd" else None
    sums: dict[str, list[np.ndarray]] = {}
    with tqdm(total=examples.count, unit="example", desc=f"scoring ({config.score})", disable=not progress) as bar:
        for start in range(0, examples.count, batch_size):
            index = range(start, min(start + batch_size, examples.count))
            rows = examples.rows(index)
            sums.setdefault("truncated", []).append(np.asarray(rows["truncated"]))
            runs = [("", main, models, rows["main"])]
            if alone is not None:
                runs.append(("alone_", alone, {ifd_name: models[ifd_name]}, rows["alone"]))
            for prefix, fn, used, part in runs:
                arrays = batch_arrays(part, batch_size, examples.seq_len, examples.tokenizer.pad_id)
                batch = {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
                         for k, v in arrays.items()}
                with use_sharding(mesh):
                    out = fn({n: m.params for n, m in used.items()}, batch)
                for key, value in out.items():
                    sums.setdefault(prefix + key, []).append(np.asarray(value)[:len(index)])
            bar.update(len(index))
    return per_example(config, {k: np.concatenate(v).astype(np.float64) for k, v in sums.items()})


def per_example(config: PruneConfig, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-row sums -> per-token means and the score (NaN where an example has no scored token)."""
    tokens = sums["tokens"]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = lambda key, n=tokens: np.where(n > 0, sums[key] / np.maximum(n, 1), np.nan)
        out = {"tokens": tokens, "truncated": sums["truncated"]}
        for key in sums:
            if key.endswith("_ce") and not key.startswith("alone_"):
                out[key] = mean(key)
                out[key.replace("_ce", "_accuracy")] = mean(key.replace("_ce", "_correct"))
        if "kl" in sums:
            out["kl"] = mean("kl")
        if config.score == "excess_loss":
            out["score"] = out["student_ce"] - out["teacher_ce"]
        elif config.score == "kl":
            out["score"] = out["kl"]
        else:
            out["answer_ce"] = mean(f"alone_{config.ifd_model}_ce", sums["alone_tokens"])
            out["score"] = out[f"{config.ifd_model}_ce"] / out["answer_ce"]
    return out


def select(scores: dict[str, np.ndarray], config: PruneConfig) -> dict[str, Any]:
    """The teacher-wrong drop and the cut (module doc). Returns boolean masks "scorable", "teacher_wrong",
    "kept" (N,), the thresholds used and the counts."""
    score = scores["score"]
    scorable = np.isfinite(score)
    by_ce = np.zeros_like(scorable)
    by_accuracy = np.zeros_like(scorable)
    ce_threshold = None
    if config.teacher_wrong_quantile is not None and scorable.any():
        ce_threshold = float(np.quantile(scores["teacher_ce"][scorable], config.teacher_wrong_quantile))
        by_ce = scorable & (scores["teacher_ce"] > ce_threshold)
    if config.teacher_min_accuracy is not None:
        by_accuracy = scorable & (scores["teacher_accuracy"] < config.teacher_min_accuracy)
    teacher_wrong = by_ce | by_accuracy
    candidates = np.flatnonzero(scorable & ~teacher_wrong)
    keep = math.ceil(config.keep_fraction * len(candidates) - 1e-9)
    order = candidates[np.argsort(-score[candidates], kind="stable")]  # hardest first, ties to the earlier
    kept = np.zeros_like(scorable)
    kept[order[:keep]] = True
    return {"scorable": scorable, "teacher_wrong": teacher_wrong, "kept": kept,
            "cut": float(score[order[keep - 1]]) if keep else None, "teacher_ce_threshold": ce_threshold,
            "counts": {"examples": int(len(score)), "unscorable": int((~scorable).sum()),
                       "teacher_wrong": int(teacher_wrong.sum()), "teacher_wrong_by_ce": int(by_ce.sum()),
                       "teacher_wrong_by_accuracy": int(by_accuracy.sum()), "candidates": int(len(candidates)),
                       "kept": int(keep)}}


# --------------------------------------------------------------------------------------------------
# The whole job


def prune_dataset(experiment, out: str | pathlib.Path, config: PruneConfig = PruneConfig(), *,
                  student_checkpoint: str | None = None, mesh=None, overwrite: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Scores every example of `experiment.data` (split `config.split`) and writes, into `out` (which appears
    only when complete):

      kept.jsonl    the kept examples in their original order, as whole jsonl records (other sources:
                    {text_field: text}), so that DataConfig(source=out/kept.jsonl) trains on them
      scores.jsonl  one line per example: index, score, tokens, per-model CE/accuracy, kl, teacher_wrong, kept
      scores.png    histogram of the scores, teacher-wrong examples apart, the cut marked
      summary.json  counts, the cut, the teacher-wrong thresholds, score statistics, models, seconds

    Returns the summary. Raises ValueError on bad input before any model runs."""
    from llama4_jax.convert.files import atomic_directory, check_destination
    from llama4_jax.data import check_vocab, load_tokenizer

    start_time = time.perf_counter()
    out = pathlib.Path(out)
    check_destination(out, overwrite)
    mesh = make_mesh(experiment.mesh) if mesh is None else mesh
    tokenizer = load_tokenizer(experiment.data)
    examples = Examples(experiment.data, config, tokenizer, experiment.train.seq_len)
    models = load_models(experiment, config, student_checkpoint, mesh)
    for model in models.values():
        check_vocab(tokenizer, model.config.vocab_size)
    scores = score_examples(models, examples, config, batch_size=config.batch_size or experiment.train.batch_size,
                            mesh=mesh, progress=progress)
    chosen = select(scores, config)
    summary = _summary(experiment, config, scores, chosen, student_checkpoint, examples)
    summary["seconds"] = round(time.perf_counter() - start_time, 3)
    if jax.process_index() == 0:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            _write_jsonl(tmp / "kept.jsonl", (examples.record(int(i)) for i in np.flatnonzero(chosen["kept"])))
            _write_jsonl(tmp / "scores.jsonl", _score_rows(scores, chosen, examples))
            plot_scores(scores["score"], chosen, config, tmp / "scores.png")
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _summary(experiment, config, scores, chosen, student_checkpoint, examples) -> dict[str, Any]:
    valid = scores["score"][chosen["scorable"]]
    kept = scores["score"][chosen["kept"]]
    stats = lambda x: {"mean": float(np.mean(x)), "min": float(np.min(x)), "p50": float(np.median(x)),
                       "max": float(np.max(x))} if len(x) else None
    distill = experiment.distill
    return {
        "score": config.score, "keep_fraction": config.keep_fraction, "split": config.split,
        "source": experiment.data.source, "seq_len": examples.seq_len, **chosen["counts"],
        "kept_fraction_of_candidates": chosen["counts"]["kept"] / max(chosen["counts"]["candidates"], 1),
        "cut": chosen["cut"],
        "truncated": int(np.sum(scores["truncated"])),
        "teacher_wrong_rule": {
            "quantile": config.teacher_wrong_quantile, "teacher_ce_threshold": chosen["teacher_ce_threshold"],
            "min_accuracy": config.teacher_min_accuracy,
            "rule": "teacher CE > quantile of all teacher CEs, or teacher top-1 accuracy < min_accuracy"},
        "scores": stats(valid), "kept_scores": stats(kept),
        "teacher_checkpoint": distill.teacher_checkpoint if distill and "teacher_ce" in scores else None,
        "student_checkpoint": student_checkpoint if "student_ce" in scores else None,
        "ifd_model": config.ifd_model if config.score == "ifd" else None,
    }


def _score_rows(scores, chosen, examples):
    keys = [k for k in scores if k not in ("score", "truncated")]
    for i in range(len(scores["score"])):
        row = {"index": i, "source_index": examples.source_index(i), "score": _finite(scores["score"][i])}
        row.update({k: _finite(scores[k][i]) for k in keys}, truncated=bool(scores["truncated"][i]))
        row.update(teacher_wrong=bool(chosen["teacher_wrong"][i]), kept=bool(chosen["kept"][i]))
        yield row


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _write_jsonl(path: pathlib.Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def plot_scores(score: np.ndarray, chosen: dict[str, Any], config: PruneConfig, path: pathlib.Path) -> None:
    """Stacked histogram of the scores (kept, cut, teacher-wrong), with the cut as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"kept": chosen["kept"], "below the cut": chosen["scorable"] & ~chosen["kept"] & ~chosen["teacher_wrong"],
              "teacher wrong (dropped)": chosen["teacher_wrong"]}
    fig, ax = plt.subplots(figsize=(7, 4))
    finite = score[chosen["scorable"]]
    bins = np.histogram_bin_edges(finite, bins=min(50, max(5, len(finite) // 4))) if len(finite) else 10
    ax.hist([score[m] for m in groups.values()], bins=bins, stacked=True, label=list(groups),
            color=["tab:red", "tab:gray", "tab:orange"])
    if chosen["cut"] is not None:
        ax.axvline(chosen["cut"], color="black", linestyle="--",
                   label=f"cut: keep score >= {chosen['cut']:.4g} ({config.keep_fraction:g} of candidates)")
    counts = chosen["counts"]
    ax.set_title(f"{config.score}: {counts['kept']} of {counts['examples']} examples kept "
                 f"({counts['teacher_wrong']} teacher-wrong dropped)")
    ax.set_xlabel({"excess_loss": "CE_S - CE_T (nats/token)", "kl": "KL(p_T || p_S) (nats/token)",
                   "ifd": "IFD = L(answer | prompt) / L(answer)"}[config.score])
    ax.set_ylabel("examples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
