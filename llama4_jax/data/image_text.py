"""Image+text records -> fixed-shape training batches for Llama4ForConditionalGeneration.

    records (.jsonl)                     {"image": "cat.png", "text": "A cat."}: data.image_field, data.text_field
      [process_index::process_count]     each process reads a disjoint shard of records
      .shuffle(seed).repeat()            deterministic, a new order every epoch (train split only)
      .map(ImageTextExample)             image -> tiles (data/images.py), prompt -> ids, one example per row
      .batch(B_local)                    inputs/targets/weights/positions/segment_ids (B, T), pixel_values
                                         (B, data.image_tiles_per_example, 3, S, S)

An image path is relative to its jsonl file (or absolute). `.npy` files hold (H, W, 3) uint8 arrays; anything
else is opened with Pillow and converted to RGB. A text with `<|image|>` placeholders gets image i's token
layout at the i-th one (`Llama4Processor`'s); a text without any gets the images in front of it. The row is
[bos] + prompt + [eos], truncated or padded to seq_len + 1; every image token must land inside the row.
Targets that are padding or image-layout tokens (start, separators, <|image|>, <|patch|>, end) have weight 0.
Tiles of a row beyond its images are zeros: the model fills each row's <|patch|> positions from that row's
own tile slots in order (per-example fusion), so padding tiles are never read. The iterator is a grain
DatasetIterator, saved in checkpoints like the text pipeline's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import ml_dtypes
import numpy as np

from llama4_jax.data.config import SPLITS, DataConfig, heldout_mask
from llama4_jax.data.images import IMAGE_PLACEHOLDER, TOKENS, as_rgb_array, image_prompt_ids, preprocess_image
from llama4_jax.data.sources import JsonlFiles, open_documents
from llama4_jax.data.tokenizer import Llama4Tokenizer, Tokenizer
from llama4_jax.multimodal_config import PATCH_ID, Llama4VisionConfig

BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids", "pixel_values")


def image_token_ids(tokenizer: Tokenizer) -> dict[int, int]:
    """Llama 4 image-token id -> this tokenizer's id for the same token (looked up by name).

    Meta's tokenizer has them at their Llama 4 ids. A tokenizer that has none of them (e.g. the embedded BPE)
    gets them appended after its vocabulary, in the order of `TOKENS` (<|patch|> last: vocab_size + 5), so the
    model's vocabulary must be that much larger. Having only some of them is an error.
    """
    if isinstance(tokenizer, Llama4Tokenizer):
        return {i: i for i in TOKENS}
    lookup = getattr(getattr(tokenizer, "_tokenizer", None), "token_to_id", None)
    found = {i: lookup(name) if lookup else None for i, name in TOKENS.items()}
    if all(v is not None for v in found.values()):
        return found
    if any(v is not None for v in found.values()):
        missing = [TOKENS[i] for i, v in found.items() if v is None]
        raise ValueError(f"data.tokenizer has some Llama 4 image tokens but not {missing}; it needs all or none")
    return {i: tokenizer.vocab_size + k for k, i in enumerate(TOKENS)}


def load_image(path: Path, where: str) -> np.ndarray:
    """(H, W, 3) uint8 from a .npy array or an image file Pillow reads; ValueError naming the record."""
    if not path.is_file():
        raise ValueError(f"{where}: image file {path} does not exist")
    try:
        if path.suffix == ".npy":
            image = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as opened:
                image = np.asarray(opened.convert("RGB"))
        return as_rgb_array(image).transpose(1, 2, 0)
    except (ValueError, OSError) as e:  # wrong shape/dtype, or not an image
        raise ValueError(f"{where}: image {path}: {e}") from e


class ImageTextExample(grain.transforms.Map):
    """(record, "path:line") -> one row: the batch fields of one example (see the module docstring)."""

    def __init__(self, config: DataConfig, vision: Llama4VisionConfig, tokenizer: Tokenizer, seq_len: int):
        self.config, self.vision, self.tokenizer, self.seq_len = config, vision, tokenizer, seq_len
        self.ids = image_token_ids(tokenizer)
        self.layout_ids = np.asarray(sorted(self.ids.values()), np.int32)

    def _images(self, record: dict, where: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
        value = record[self.config.image_field]
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"{where}: {self.config.image_field!r} must be an image path or a list of them, "
                             f"got {value!r}")
        base = Path(where.rpartition(":")[0]).parent
        tiles, ratios = [], []
        for p in paths:
            image = preprocess_image(load_image(base / p, where), tile_size=self.vision.image_size,
                                     max_tiles=self.config.max_image_tiles)
            tiles.append(image.pixel_values)
            ratios.append(image.aspect_ratio)
        tiles = np.concatenate(tiles)
        slots = self.config.image_tiles_per_example
        if len(tiles) > slots:
            raise ValueError(f"{where}: its images make {len(tiles)} tiles, more than data.image_tiles_per_example "
                             f"({slots}); raise it or lower data.max_image_tiles")
        padded = np.zeros((slots, *tiles.shape[1:]), ml_dtypes.bfloat16)
        padded[: len(tiles)] = tiles  # exact: the normalized pixels are bfloat16 values
        return padded, ratios

    def _prompt(self, text: str, ratios: list[tuple[int, int]], where: str) -> list[int]:
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) == 1:
            pieces = [""] * len(ratios) + pieces  # no placeholders: the images come first
        if len(pieces) - 1 != len(ratios):
            raise ValueError(f"{where}: the text has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but "
                             f"{len(ratios)} images")
        ids = [self.tokenizer.bos_id, *self.tokenizer.encode(pieces[0])]
        for ratio, piece in zip(ratios, pieces[1:]):
            ids += [self.ids[i] for i in image_prompt_ids(ratio, self.vision.tokens_per_tile)]
            ids += self.tokenizer.encode(piece)
        return ids + [self.tokenizer.eos_id]

    def map(self, item: tuple[Any, str]) -> dict[str, np.ndarray]:
        record, where = item
        for field in (self.config.image_field, self.config.text_field):
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{where}: expected an object with {field!r} (data.image_field / data.text_field)")
        if not isinstance(record[self.config.text_field], str):
            raise ValueError(f"{where}: {self.config.text_field!r} must be text")
        pixels, ratios = self._images(record, where)
        ids = np.asarray(self._prompt(record[self.config.text_field], ratios, where), np.int32)
        is_image = np.isin(ids, self.layout_ids)
        last_image = int(np.flatnonzero(is_image)[-1])
        if last_image >= self.seq_len:  # inputs are the first seq_len tokens; a cut image would be misaligned
            raise ValueError(f"{where}: its image tokens reach position {last_image}, beyond train.seq_len "
                             f"({self.seq_len}); raise seq_len or lower data.max_image_tiles")
        row = np.full(self.seq_len + 1, self.tokenizer.pad_id, np.int32)
        n = min(len(ids), self.seq_len + 1)
        row[:n] = ids[:n]
        real = np.arange(self.seq_len + 1) < n
        trained = real & ~np.isin(row, self.layout_ids)
        return {"inputs": row[:-1], "targets": row[1:], "weights": trained[1:].astype(np.float32),
                "positions": np.arange(self.seq_len, dtype=np.int32), "segment_ids": real[:-1].astype(np.int32),
                "pixel_values": pixels}


class _Records:
    """Random access to (record, "path:line") of a jsonl source's split."""

    def __init__(self, files: JsonlFiles, indices: np.ndarray):
        self.files, self.indices = files, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        i = int(self.indices[index])
        return self.files.record(i), self.files.where(i)


def open_records(config: DataConfig, split: str) -> _Records:
    """The train or eval records of a jsonl source (held out by `heldout_mask`, like text sources)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = open_documents(config, "all")
    if not isinstance(files, JsonlFiles):
        raise ValueError(f"data.source {config.source!r}: image+text records must be .jsonl files")
    indices = np.flatnonzero(heldout_mask(len(files), config.eval_fraction) == (split == "eval"))
    if len(indices) == 0:
        raise ValueError(f"data.source {config.source!r}: the {split} split has no records "
                         f"(eval_fraction={config.eval_fraction})")
    return _Records(files, indices)


def make_image_text_iterator(config: DataConfig, vision: Llama4VisionConfig, *, split: str, seq_len: int,
                             batch_size: int, process_index: int, process_count: int, tokenizer: Tokenizer,
                             image_token_index: int = PATCH_ID, vocab_size: int | None = None
                             ) -> grain.DatasetIterator:
    """This process's batches of `split` (BATCH_KEYS; batch_size // process_count rows), repeating forever.
    Checks that the tokenizer's <|patch|> id is the model's `image_token_index` and every image token fits
    `vocab_size`."""
    ids = image_token_ids(tokenizer)
    if ids[PATCH_ID] != image_token_index:
        raise ValueError(f"data.tokenizer's <|patch|> id is {ids[PATCH_ID]} but the experiment's image_token_index "
                         f"is {image_token_index}; set image_token_index={ids[PATCH_ID]}")
    if vocab_size is not None and max(ids.values()) >= vocab_size:
        raise ValueError(f"the image tokens take ids up to {max(ids.values())} (after the tokenizer's "
                         f"{tokenizer.vocab_size}); model.vocab_size ({vocab_size}) must exceed it")
    if batch_size % process_count:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({process_count})")
    records = open_records(config, split)
    ds = grain.MapDataset.source(records)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"data.source {config.source!r}: the {split} split has {len(records)} records, fewer than "
                         f"the {process_count} processes")
    if config.shuffle and split == "train":
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(None).map(ImageTextExample(config, vision, tokenizer, seq_len))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=16))
    return iter(it.batch(batch_size // process_count, drop_remainder=True))


_COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
           "black": (10, 10, 10), "white": (245, 245, 245)}


def write_synthetic_dataset(directory: str | Path, num_records: int, *, seed: int = 0, npy: bool = False) -> Path:
    """Writes a toy captioning set: images of a colored box on another color, of random sizes (so tile
    layouts vary), captioned "a <box color> box on <background color>." The colors are only in the pixels, so
    a model lowers its loss on those words only by looking. PNG files (Pillow), or .npy arrays with `npy`.
    Returns the path of the jsonl (records reference images by relative path)."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(_COLORS)
    lines = []
    for i in range(num_records):
        back, box = rng.choice(len(names), 2, replace=False)
        h, w = (int(x) for x in rng.integers(24, 120, 2))
        image = np.empty((h, w, 3), np.uint8)
        image[...] = _COLORS[names[back]]
        image[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = _COLORS[names[box]]
        name = f"images/{i:05d}.{'npy' if npy else 'png'}"
        if npy:
            np.save(directory / name, image)
        else:
            from PIL import Image

            Image.fromarray(image).save(directory / name)
        lines.append(json.dumps({"image": name, "text": f"a {names[box]} box on {names[back]}."}))
    path = directory / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
