"""Heatmaps drawn over images, and images as PNG bytes: what `strop explain --image` writes and the
report embeds.

A heatmap in [0, 1] is resized to the image (bilinear), coloured with matplotlib's `jet` (blue = low,
red = high, as Grad-CAM figures usually are) and blended in with an opacity that grows with the heat, so
the parts of the image that did not matter stay visible as they are.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from torch.nn import functional as F

from strop.data.image_files import pillow

MAX_OPACITY = 0.6  # of the colour at the hottest pixel: the image under it stays readable


def as_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) uint8 -> (H, W, 3) uint8 (grey repeated over the channels)."""
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def resize_heat(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) floats -> (height, width), bilinear: a CAM's coarse cells become a smooth map."""
    t = torch.as_tensor(np.asarray(heat, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def heat_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """image: (H, W[, 1 or 3]) uint8; heat: (h, w) in [0, 1] (clipped) -> (H, W, 3) uint8."""
    import matplotlib

    rgb = as_rgb(image).astype(np.float32)
    h = np.clip(resize_heat(heat, rgb.shape[0], rgb.shape[1]), 0.0, 1.0)
    colour = matplotlib.colormaps["jet"](h)[..., :3].astype(np.float32) * 255.0
    alpha = (MAX_OPACITY * h)[..., None]
    return np.round(rgb * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)


def scaled(heat: np.ndarray, percentile: float = 100.0) -> np.ndarray:
    """heat / its `percentile`-th percentile, clipped to [0, 1]; all zeros stays zeros. Integrated
    gradients use 99: a handful of extreme pixels would otherwise wash out the rest of the map."""
    top = float(np.percentile(heat, percentile)) if heat.size else 0.0
    return np.clip(heat / top, 0.0, 1.0) if top > 0 else np.zeros_like(heat, dtype=np.float32)


def png_bytes(image: np.ndarray, max_side: int | None = None) -> bytes:
    """(H, W[, 1 or 3]) uint8 -> PNG file bytes; shrunk (same aspect) when its longer side passes
    max_side."""
    Image, _ = pillow()
    img = Image.fromarray(as_rgb(image))
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(image: np.ndarray, max_side: int | None = None) -> str:
    """The image as a data: URI to put in an <img src>, so a page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image, max_side)).decode()
