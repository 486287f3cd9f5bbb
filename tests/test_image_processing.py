"""Image preprocessing and prompt layout against transformers' Llama4ImageProcessor and Llama4Processor.

torchvision cannot be installed here (no CPU wheel; the CUDA wheel does not load against torch+cpu), and
transformers' Llama4ImageProcessor imports it. So the reference runs transformers' own `_preprocess` (canvas
choice, resize targets, padding, bfloat16 normalization, tiles, global tile) with torchvision's two kernels
replaced by what torchvision calls on a CPU with AVX2: torch's uint8 antialiased bilinear `interpolate`,
and a constant pad. Our resize is also checked bit for bit against that torch kernel directly.
"""

import importlib
import sys
import types

import numpy as np
import pytest
import torch
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.llama4.processing_llama4 import Llama4Processor

from llama4_jax.data.images import (
    expand_image_placeholders,
    image_prompt,
    image_prompt_ids,
    preprocess_image,
    resize_bilinear_aa,
)


@pytest.fixture(scope="module")
def hf_image_module():
    """transformers.models.llama4.image_processing_llama4, imported with a stand-in `tvF` module."""
    tvf = types.ModuleType("torchvision.transforms.v2.functional")

    def pad(images, padding, fill):  # torchvision: padding = [left, top, right, bottom], per-channel fill
        assert len(set(fill)) == 1, fill
        left, top, right, bottom = padding
        return torch.nn.functional.pad(images, (left, right, top, bottom), value=fill[0])

    tvf.pad = pad
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2", tvf.__name__]
    with pytest.MonkeyPatch.context() as patch:
        for name in names[:-1]:
            patch.setitem(sys.modules, name, types.ModuleType(name))
        patch.setitem(sys.modules, names[-1], tvf)
        sys.modules["torchvision.transforms.v2"].functional = tvf
        patch.delitem(sys.modules, "transformers.models.llama4.image_processing_llama4", raising=False)
        module = importlib.import_module("transformers.models.llama4.image_processing_llama4")
    return module


class _Kernels:
    """`self` for Llama4ImageProcessor._preprocess: torchvision's resize and normalize as torchvision runs them
    on uint8 / bfloat16 CPU tensors; `rescale_and_normalize` is transformers' own."""

    def __init__(self, module):
        self.rescale_and_normalize = module.Llama4ImageProcessor.rescale_and_normalize.__get__(self)

    def resize(self, image, size, resample=None):
        if tuple(image.shape[-2:]) == (size.height, size.width):
            return image
        return torch.nn.functional.interpolate(image, size=(size.height, size.width), mode="bilinear",
                                               antialias=True, align_corners=False)

    def normalize(self, image, mean, std):
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        return image.sub(mean).div_(torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1))


def hf_preprocess(module, image_hwc: np.ndarray, max_tiles: int = 16, resize_to_max_canvas: bool = False):
    out = module.Llama4ImageProcessor._preprocess(
        _Kernels(module), [torch.as_tensor(image_hwc.transpose(2, 0, 1).copy())], do_resize=True,
        size=SizeDict(height=336, width=336), resample=PILImageResampling.BILINEAR, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, max_patches=max_tiles,
        resize_to_max_canvas=resize_to_max_canvas, disable_grouping=None, return_tensors=None)
    pixels, ratio = out["pixel_values"][0], out["aspect_ratios"][0]
    assert pixels.dtype == torch.bfloat16
    return pixels.float().numpy(), tuple(int(r) for r in ratio)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus noise: exercises both the interpolation and the rounding."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    base = np.stack([255 * y / max(height, 1), 255 * x / max(width, 1), 128 + 0 * x], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size,kwargs,ratio", [
    ((1, 1), {}, (1, 1)),  # one pixel: upscaled to a single tile, no global tile
    ((200, 300), {}, (1, 1)),
    ((500, 900), {}, (2, 3)),  # several tiles + the global tile
    ((700, 260), dict(max_tiles=4), (3, 1)),
    ((120, 200), dict(resize_to_max_canvas=True), (3, 5)),  # 8.4x upscale to 15 tiles
])
def test_pixel_tiles_equal_transformers(hf_image_module, size, kwargs, ratio):
    image = _image(*size)
    ref_pixels, ref_ratio = hf_preprocess(hf_image_module, image, **kwargs)
    ours = preprocess_image(image, **kwargs)
    assert ours.aspect_ratio == ref_ratio == ratio
    n = ratio[0] * ratio[1]
    assert ours.pixel_values.shape == ref_pixels.shape == (n + (n > 1), 3, 336, 336)
    np.testing.assert_array_equal(ours.pixel_values, ref_pixels)


def test_resize_is_bit_exact_with_torch_uint8_antialias():
    rng = np.random.default_rng(0)
    for _ in range(8):
        (h, w), (nh, nw) = rng.integers(1, 300, 2), rng.integers(1, 500, 2)
        image = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
        ref = torch.nn.functional.interpolate(torch.as_tensor(image)[None], size=(int(nh), int(nw)), mode="bilinear",
                                              antialias=True, align_corners=False)[0].numpy()
        np.testing.assert_array_equal(resize_bilinear_aa(image, int(nh), int(nw)), ref)


@pytest.mark.parametrize("bad,message", [
    (np.zeros((10, 10, 4), np.uint8), r"shape \(height, width, 3\), got shape \(10, 10, 4\)"),
    (np.zeros((10, 10), np.uint8), r"shape \(height, width, 3\)"),
    (np.zeros((0, 10, 3), np.uint8), "at least 1x1 pixels, got 0x10"),
    (np.zeros((10, 10, 3), np.float32), "uint8"),
])
def test_bad_images_raise_naming_what_was_expected(bad, message):
    with pytest.raises(ValueError, match=message):
        preprocess_image(bad)


def _hf_processor() -> Llama4Processor:
    """Llama4Processor without a tokenizer file: its layout methods read only these attributes."""
    processor = Llama4Processor.__new__(Llama4Processor)
    processor.patch_size, processor.downsample_ratio = 14, 4
    return processor


@pytest.mark.parametrize("ratio", [(1, 1), (2, 3), (4, 1)])
def test_token_layout_equals_llama4_processor(ratio):
    processor = _hf_processor()
    n = ratio[0] * ratio[1]
    pixel_values = [torch.zeros(n + (n > 1), 3, 336, 336)]
    expected = processor.replace_image_token({"pixel_values": pixel_values, "aspect_ratios": [ratio]}, 0)
    assert image_prompt(ratio) == expected
    assert expected.count("<|patch|>") == 144 * (n + (n > 1))
    tokenizer = pytest.importorskip("llama_models.llama4.tokenizer").Tokenizer.get_instance()
    assert image_prompt_ids(ratio) == tokenizer.encode(expected, bos=False, eos=False, allowed_special="all")


def test_expand_image_placeholders():
    text = "<|image|>Compare with <|image|>."
    assert expand_image_placeholders(text, [(1, 1), (1, 2)], 2) == (
        image_prompt((1, 1), 2) + "Compare with " + image_prompt((1, 2), 2) + ".")
    with pytest.raises(ValueError, match="2 <|image|> placeholders but 1 images"):
        expand_image_placeholders(text, [(1, 1)])
