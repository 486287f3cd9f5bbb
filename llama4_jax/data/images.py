"""Image preprocessing and prompt layout as transformers' `Llama4ImageProcessor` / `Llama4Processor` (5.24).

An image is cut into up to `max_tiles` square tiles of `tile_size` (336) pixels: it is resized, without
distortion, to the best canvas of whole tiles (upscaling at most to one tile's size unless
`resize_to_max_canvas`), padded with black on the right and bottom, split row-major into tiles, and, when
there is more than one tile, followed by a global tile (the whole image resized to one tile). Pixels are
rescaled by 1/255 and normalized with mean = std = 0.5 in bfloat16, as Meta's code does.

The resize is torch's antialiased bilinear resize of uint8 images (what torchvision runs on CPUs with AVX2):
separable passes, horizontal then vertical, with int16 fixed-point weights and a rounded uint8 result after
each pass, reimplemented here in NumPy so no torch is needed.
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np

from llama4_jax.multimodal_config import (
    IMAGE_END_ID,
    IMAGE_ID,
    IMAGE_START_ID,
    PATCH_ID,
    TILE_X_SEPARATOR_ID,
    TILE_Y_SEPARATOR_ID,
)

TOKENS = {IMAGE_START_ID: "<|image_start|>", IMAGE_END_ID: "<|image_end|>", TILE_X_SEPARATOR_ID: "<|tile_x_separator|>",
          TILE_Y_SEPARATOR_ID: "<|tile_y_separator|>", IMAGE_ID: "<|image|>", PATCH_ID: "<|patch|>"}
IMAGE_PLACEHOLDER = "<|image|>"  # what a prompt writes where an image goes, before expand_image_placeholders


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
    """pixel_values: (tiles, 3, S, S) float32 holding bfloat16 values (tiles row-major, then the global
    tile if any); aspect_ratio: (tile rows, tile columns)."""

    pixel_values: np.ndarray
    aspect_ratio: tuple[int, int]


def supported_canvases(max_tiles: int, tile_size: int) -> list[tuple[int, int]]:
    """Every (height, width) of whole tiles with at most max_tiles tiles, in HF's order (ties keep the first)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_tiles, 0, -1):
        for h in sorted(f for f in range(1, count + 1) if count % f == 0):
            by_ratio.setdefault(h / (count // h), []).append((h, count // h))
    return [(h * tile_size, w * tile_size) for shapes in by_ratio.values() for h, w in shapes]


def best_canvas(image_size: tuple[int, int], canvases: list[tuple[int, int]], resize_to_max_canvas: bool) -> tuple:
    """The canvas the image fits with the smallest upscaling >= 1 (the largest if resize_to_max_canvas), else the
    least downscaling; ties go to the smallest area. Scales in float32, as HF computes them with torch."""
    h, w = np.float32(image_size[0]), np.float32(image_size[1])
    sizes = np.asarray(canvases, np.float32)
    scales = np.minimum(sizes[:, 0] / h, sizes[:, 1] / w)
    up = scales[scales >= 1]
    chosen = (up.max() if resize_to_max_canvas else up.min()) if len(up) else scales[scales < 1].max()
    candidates = [c for c, s in zip(canvases, scales) if s == chosen]
    return min(candidates, key=lambda c: c[0] * c[1])  # min keeps the first of equal areas, as argmin


def _fit_without_distortion(image_size, target, target_is_f32) -> tuple[int, int]:
    """HF's get_max_res_without_distortion. A target side that came from a torch tensor makes HF divide in
    float32 rather than float64; reproduce which, so the floor lands on the same pixel."""
    (oh, ow), (th, tw) = image_size, target
    scale_w = np.float32(tw) / np.float32(ow) if target_is_f32[1] else tw / ow
    scale_h = np.float32(th) / np.float32(oh) if target_is_f32[0] else th / oh
    f32 = any(target_is_f32)
    if (np.float32(scale_w) < np.float32(scale_h)) if f32 else (scale_w < scale_h):
        product = np.float32(oh) * scale_w if target_is_f32[1] else oh * scale_w
        return min(math.floor(product), th), tw
    product = np.float32(ow) * scale_h if target_is_f32[0] else ow * scale_h
    return th, min(math.floor(product), tw)


def _aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Antialiased bilinear (triangle filter widened by the downscale factor) source indices (out, K) and int16
    fixed-point weights (out, K) of torch's uint8 kernel, and their precision in bits."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(out_size) + 0.5)
    lo = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    k = int((hi - lo).max())
    index = lo[:, None] + np.arange(k)
    weights = np.clip(1.0 - np.abs((index - centers[:, None] + 0.5) * inv), 0.0, None)
    weights = np.where(index < hi[:, None], weights, 0.0)
    total = weights.sum(1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total != 0)
    # The most bits such that the largest weight, doubled, still fits in int16 (torch / Pillow-SIMD rule).
    precision = 0
    while precision < 22 and int(0.5 + weights.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled < 0, scaled - 0.5, scaled + 0.5).astype(np.int64)  # C cast: round half away
    return np.minimum(index, in_size - 1), fixed, precision


def _resize_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    index, fixed, precision = _aa_weights(x.shape[axis], out_size)
    x = np.moveaxis(x.astype(np.int64), axis, 0)
    acc = np.full((out_size, *x.shape[1:]), 1 << (precision - 1) if precision else 0, np.int64)
    for j in range(index.shape[1]):
        acc += fixed[:, j].reshape(-1, *([1] * (x.ndim - 1))) * x[index[:, j]]
    return np.moveaxis(np.clip(acc >> precision, 0, 255).astype(np.uint8), 0, axis)


def resize_bilinear_aa(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) uint8 -> (C, height, width) uint8, bit for bit torch's interpolate(mode="bilinear",
    antialias=True) on uint8. A pass whose size does not change is skipped, as in torch."""
    if image.shape[2] != width:
        image = _resize_axis(image, 2, width)
    if image.shape[1] != height:
        image = _resize_axis(image, 1, height)
    return image


def _normalize(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 holding bfloat16: (bf16(x) * (1/255) - 0.5) / 0.5, each step rounded to bfloat16."""
    bf16 = ml_dtypes.bfloat16
    x = (image.astype(np.float32) * np.float32(1 / 255)).astype(bf16)
    x = (x.astype(np.float32) - np.float32(0.5)).astype(bf16)
    return (x.astype(np.float32) / np.float32(0.5)).astype(bf16).astype(np.float32)


def as_rgb_array(image) -> np.ndarray:
    """A PIL image (converted to RGB) or an (H, W, 3) uint8 array -> (3, H, W) uint8; ValueError otherwise."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image, without importing PIL
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (height, width, 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixel values (0-255), got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected an image of at least 1x1 pixels, got {image.shape[0]}x{image.shape[1]}")
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def preprocess_image(image, *, tile_size: int = 336, max_tiles: int = 16,
                     resize_to_max_canvas: bool = False) -> ProcessedImage:
    """One image (PIL or (H, W, 3) uint8) -> its tiles, as `Llama4ImageProcessor` (torchvision backend)."""
    pixels = as_rgb_array(image)
    size = pixels.shape[1:]
    canvas = best_canvas(size, supported_canvases(max_tiles, tile_size), resize_to_max_canvas)
    if resize_to_max_canvas:
        target, from_tensor = canvas, (True, True)
    else:  # never upscale past one tile; HF's min(int, tensor) keeps the tensor only when it is smaller
        bounds = (max(size[0], tile_size), max(size[1], tile_size))
        target = tuple(min(b, c) for b, c in zip(bounds, canvas))
        from_tensor = tuple(c < b for b, c in zip(bounds, canvas))
    new_h, new_w = _fit_without_distortion(size, target, from_tensor)
    resized = resize_bilinear_aa(pixels, max(new_h, 1), max(new_w, 1))
    padded = np.zeros((3, *canvas), np.uint8)
    padded[:, : resized.shape[1], : resized.shape[2]] = resized
    rows, cols = canvas[0] // tile_size, canvas[1] // tile_size
    tiles = _normalize(padded).reshape(3, rows, tile_size, cols, tile_size).transpose(1, 3, 0, 2, 4)
    tiles = tiles.reshape(rows * cols, 3, tile_size, tile_size)
    if rows * cols > 1:
        whole = _normalize(resize_bilinear_aa(pixels, tile_size, tile_size))
        tiles = np.concatenate([tiles, whole[None]])
    return ProcessedImage(np.ascontiguousarray(tiles), (rows, cols))


def image_prompt(aspect_ratio: tuple[int, int], tokens_per_tile: int = 144) -> str:
    """The tokens `Llama4Processor` puts in place of one `<|image|>`: start, tile rows of `<|patch|>` blocks
    (x separators between tiles, a y separator after each row) only if there are several tiles, then
    `<|image|>` and the global (or only) tile's block, then end."""
    rows, cols = aspect_ratio
    out = "<|image_start|>"
    if rows * cols > 1:
        row = "<|tile_x_separator|>".join(["<|patch|>" * tokens_per_tile] * cols)
        out += (row + "<|tile_y_separator|>") * rows
    return out + "<|image|>" + "<|patch|>" * tokens_per_tile + "<|image_end|>"


def image_prompt_ids(aspect_ratio: tuple[int, int], tokens_per_tile: int = 144) -> list[int]:
    """`image_prompt` as Llama 4 token ids (every piece is one special token)."""
    rows, cols = aspect_ratio
    ids = [IMAGE_START_ID]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                ids += [PATCH_ID] * tokens_per_tile + ([TILE_X_SEPARATOR_ID] if x < cols - 1 else [])
            ids.append(TILE_Y_SEPARATOR_ID)
    return ids + [IMAGE_ID] + [PATCH_ID] * tokens_per_tile + [IMAGE_END_ID]


def expand_image_placeholders(text: str, aspect_ratios: list[tuple[int, int]], tokens_per_tile: int = 144) -> str:
    """Replaces the i-th `<|image|>` of a prompt with image i's token layout; ValueError if the counts differ."""
    parts = text.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(aspect_ratios):
        raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(aspect_ratios)} "
                         "images were given")
    out = parts[0]
    for ratio, part in zip(aspect_ratios, parts[1:]):
        out += image_prompt(ratio, tokens_per_tile) + part
    return out
