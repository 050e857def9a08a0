"""Camera images -> the ``images`` / ``img_masks`` lists of ``Pi05.embed_prefix``/``sample_actions``.

Behaviour follows openpi's inference pipeline (upstream commit 15a9616), written from scratch:

1. Each image is brought to uint8 HWC as openpi's ``*_policy._parse_image`` does: a float
   image is taken to be in [0, 1] and becomes ``(255 * x).astype(uint8)`` (truncation; we
   clip to [0, 1] first, where openpi would wrap), and a CHW image is transposed.
   ``float_range="signed"`` instead takes float images as already in the model's [-1, 1]
   (openpi's ``Observation`` convention) and skips the uint8 step.
2. ``resize_with_pad`` to the model's resolution (224 for pi0.5) keeping the aspect ratio, as
   openpi's ``ResizeImages`` transform (``openpi_client.image_tools.resize_with_pad``): the new
   size is ``int(h / r), int(w / r)`` with ``r = max(w / W, h / H)``, resampled with PIL's
   BILINEAR filter -- reproduced here bit for bit in numpy, no Pillow needed: the horizontal
   pass, then the vertical one, as Pillow <= 12 always does (openpi locks Pillow 11.2.1;
   Pillow 13 may run the vertical pass first for some shapes, +-1 differences) -- and pasted on
   a black canvas at ``(int((W - w') / 2), int((H - h') / 2))``. An image already at the
   target size is left untouched. Signed float images follow openpi's
   ``resize_with_pad_torch`` instead (bilinear, no antialiasing, clamped, padded with -1).
3. uint8 -> float32 ``x / 255 * 2 - 1`` (``Observation.from_dict``), CHW.
4. Cameras ``base_0_rgb``, ``left_wrist_0_rgb``, ``right_wrist_0_rgb`` in that order. An absent
   camera is an all-zero uint8 image (openpi's policies use ``np.zeros_like``), i.e. all -1 after
   scaling, with mask False; a present camera has mask True unless a mask says otherwise.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_KEYS",
    "IMAGE_RESOLUTION",
    "to_uint8_hwc",
    "resize_with_pad",
    "resize_with_pad_signed",
    "preprocess_image",
    "preprocess_cameras",
]

IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
IMAGE_RESOLUTION = 224

# PIL's fixed-point resampling: 8-bit data, coefficients scaled by 2**22 (Resample.c).
_PRECISION_BITS = 32 - 8 - 2


def _is_chw(shape: Sequence[int]) -> bool:
    """openpi's test for channels-first (3 leading channels), unless it is also channels-last."""
    return shape[-3] == 3 and shape[-1] != 3


def to_uint8_hwc(image, float_range: str = "unit") -> np.ndarray:
    """One image (HWC or CHW; uint8, or float in [0, 1]) -> uint8 ``[H, W, 3]``."""
    if float_range != "unit":
        raise ValueError("to_uint8_hwc takes [0, 1] float images; signed ones skip the uint8 step")
    x = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if x.ndim != 3:
        raise ValueError(f"image must be one image [H, W, C] or [C, H, W], got shape {x.shape}")
    if _is_chw(x.shape):
        x = np.transpose(x, (1, 2, 0))
    if x.shape[-1] != 3:
        raise ValueError(f"image must have 3 colour channels, got shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        x = (255 * np.clip(x, 0.0, 1.0)).astype(np.uint8)
    elif x.dtype != np.uint8:
        raise ValueError(f"image must be uint8 or float, got {x.dtype}")
    return np.ascontiguousarray(x)


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's BILINEAR coefficients for one axis: ``(first input index [out], int weights [out, k])``.

    Antialiased when shrinking (the triangle filter is stretched by the scale), normalized per
    output pixel, then rounded to fixed point with 22 fractional bits.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 1.0 * filter_scale  # the triangle filter's support is 1
    k = int(math.ceil(support)) * 2 + 1
    starts = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, k), dtype=np.int64)
    one = float(1 << _PRECISION_BITS)
    inv = 1.0 / filter_scale
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = [max(0.0, 1.0 - abs((i - center + 0.5) * inv)) for i in range(lo, hi)]
        total = sum(w)
        starts[o] = lo
        for j, wj in enumerate(w):
            wj = wj / total if total != 0.0 else wj
            weights[o, j] = int(wj * one - 0.5) if wj < 0 else int(wj * one + 0.5)
    return starts, weights


def _resample_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One PIL resampling pass of uint8 ``x`` along ``axis``, with 8-bit rounding and clipping."""
    in_size = x.shape[axis]
    starts, weights = _bilinear_taps(in_size, out_size)
    idx = np.minimum(starts[:, None] + np.arange(weights.shape[1]), in_size - 1)  # zero weights past the end
    moved = np.moveaxis(x, axis, 0).astype(np.int64)  # [in, ...]
    gathered = moved[idx]  # [out, k, ...]
    w = weights.reshape(weights.shape + (1,) * (moved.ndim - 1))
    acc = (gathered * w).sum(axis=1) + (1 << (_PRECISION_BITS - 1))
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def _pil_bilinear_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``PIL.Image.fromarray(image).resize((width, height), Image.BILINEAR)`` for uint8 HWC:
    the horizontal pass first, then the vertical one, each skipped when its size is unchanged."""
    out = image
    if out.shape[1] != width:
        out = _resample_axis(out, 1, width)
    if out.shape[0] != height:
        out = _resample_axis(out, 0, height)
    return out


def _fit(cur_h: int, cur_w: int, height: int, width: int) -> tuple[int, int]:
    ratio = max(cur_w / width, cur_h / height)
    return int(cur_h / ratio), int(cur_w / ratio)


def resize_with_pad(image: np.ndarray, height: int = IMAGE_RESOLUTION, width: int = IMAGE_RESOLUTION) -> np.ndarray:
    """uint8 ``[..., H, W, C]`` -> ``[..., height, width, C]``: aspect-preserving PIL-bilinear
    resize, centred on black (openpi_client's ``resize_with_pad``)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"resize_with_pad takes uint8 images, got {image.dtype}")
    if image.shape[-3:-1] == (height, width):
        return image
    lead = image.shape[:-3]
    flat = image.reshape((-1,) + image.shape[-3:])
    cur_h, cur_w = flat.shape[1:3]
    new_h, new_w = _fit(cur_h, cur_w, height, width)
    if new_h < 1 or new_w < 1:
        raise ValueError(f"image {cur_h}x{cur_w} would shrink to {new_h}x{new_w} pixels at {height}x{width}")
    top, left = max(0, int((height - new_h) / 2)), max(0, int((width - new_w) / 2))
    out = np.zeros((flat.shape[0], height, width, flat.shape[-1]), dtype=np.uint8)
    for i, im in enumerate(flat):
        out[i, top : top + new_h, left : left + new_w] = _pil_bilinear_resize(im, new_h, new_w)
    return out.reshape(lead + out.shape[1:])


def resize_with_pad_signed(images: torch.Tensor, height: int = IMAGE_RESOLUTION, width: int = IMAGE_RESOLUTION):
    """float ``[B, C, H, W]`` in [-1, 1] -> ``[B, C, height, width]`` as openpi's
    ``resize_with_pad_torch``: bilinear (align_corners False, no antialias), clamped to
    [-1, 1], padded with -1 (``divmod`` split: the extra row/column goes bottom/right)."""
    cur_h, cur_w = images.shape[-2:]
    if (cur_h, cur_w) == (height, width):
        return images
    new_h, new_w = _fit(cur_h, cur_w, height, width)
    out = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    top, rem_h = divmod(height - new_h, 2)
    left, rem_w = divmod(width - new_w, 2)
    return F.pad(out, (left, left + rem_w, top, top + rem_h), mode="constant", value=-1.0)


def preprocess_image(image, resolution: int = IMAGE_RESOLUTION, float_range: str = "unit") -> torch.Tensor:
    """One camera image -> float32 ``[3, resolution, resolution]`` in [-1, 1].

    ``image``: numpy array or tensor, HWC or CHW, uint8 in [0, 255] or float in [0, 1]
    (``float_range="unit"``, openpi's policy inputs) or in [-1, 1] (``"signed"``).
    """
    if float_range not in ("unit", "signed"):
        raise ValueError(f"float_range must be 'unit' or 'signed', got {float_range!r}")
    is_float = (image.is_floating_point() if isinstance(image, torch.Tensor)
                else np.issubdtype(np.asarray(image).dtype, np.floating))
    if float_range == "signed" and is_float:
        x = image.detach().cpu() if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
        if x.ndim != 3:
            raise ValueError(f"image must be one image [H, W, C] or [C, H, W], got shape {tuple(x.shape)}")
        if not _is_chw(x.shape):
            x = x.permute(2, 0, 1)
        if x.shape[0] != 3:
            raise ValueError(f"image must have 3 colour channels, got shape {tuple(x.shape)}")
        x = x.to(torch.float32)
        return resize_with_pad_signed(x[None], resolution, resolution)[0].contiguous()
    u8 = resize_with_pad(to_uint8_hwc(image), resolution, resolution)
    x = u8.astype(np.float32) / 255.0 * 2.0 - 1.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def absent_image(resolution: int = IMAGE_RESOLUTION) -> torch.Tensor:
    """A missing camera: openpi's all-zero uint8 image, i.e. -1 everywhere after scaling."""
    return torch.full((3, resolution, resolution), -1.0, dtype=torch.float32)


def preprocess_cameras(
    samples: Sequence[Mapping[str, object]],
    masks: Optional[Sequence[Optional[Mapping[str, object]]]] = None,
    *,
    image_keys: Sequence[str] = IMAGE_KEYS,
    resolution: int = IMAGE_RESOLUTION,
    float_range: str = "unit",
    device: Optional[torch.device | str] = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A batch of observations' cameras -> ``(images, img_masks)`` for ``Pi05``.

    ``samples[b]`` maps camera names to one image each (missing key or None: absent camera);
    ``masks[b]`` optionally maps camera names to a bool. Returns ``images``: one float32
    ``[B, 3, R, R]`` tensor per name in ``image_keys``, and ``img_masks``: one bool ``[B]``
    tensor per name. Names outside ``image_keys`` are an error (likely a typo).
    """
    if not samples:
        raise ValueError("no observations")
    known = set(image_keys)
    for b, sample in enumerate(samples):
        extra = sorted(set(sample) - known)
        if extra:
            raise ValueError(f"observation {b}: unknown camera(s) {extra}; expected names from {list(image_keys)}")
    images, img_masks = [], []
    for key in image_keys:
        column, flags = [], []
        for b, sample in enumerate(samples):
            img = sample.get(key)
            present = img is not None
            column.append(preprocess_image(img, resolution, float_range) if present else absent_image(resolution))
            flag = present
            if masks is not None and masks[b] is not None and key in masks[b]:
                flag = bool(np.asarray(masks[b][key]))
            flags.append(flag)
        images.append(torch.stack(column).to(device))
        img_masks.append(torch.tensor(flags, dtype=torch.bool, device=device))
    return images, img_masks
