"""Decoded images -> model batches: channels, scaling, the backbone's normalisation, and training augmentation.

An encoded split keeps uint8 pixels (n, channels, size, size): a quarter of float32's memory, and grey images one
channel until a batch is built. Augmentation happens in `collate_images` only when the training loop passes its
`rng` (seeded from the batch's position: a resumed run draws the same transforms), never for evaluation or
prediction. The policies (`image.augment`):
- none: the images as they are.
- light: horizontal flip (p 0.5), rotation within +-10 degrees, zoom 0.9-1.1, shift within +-5% of the side.
- strong: light's flip, rotation within +-20 degrees, zoom 0.8-1.25, shift +-10%, brightness and contrast
  +-20%.
All geometry is one affine resampling per image (bilinear, zeros outside), applied to the whole batch at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from strop.data.batching import Encoded

# flip probability, max rotation (degrees), zoom range, max shift (share of the side), brightness / contrast range
POLICIES = {
    "none": None,
    "light": {"flip": 0.5, "rotate": 10.0, "zoom": (0.9, 1.1), "shift": 0.05, "jitter": 0.0},
    "strong": {"flip": 0.5, "rotate": 20.0, "zoom": (0.8, 1.25), "shift": 0.10, "jitter": 0.2},
}


@dataclass
class ImageEncoded(Encoded):
    """An encoded image split. pixels: (n, channels, size, size) uint8 tensor; labels: (n,) int64 or None.
    `lengths` is 1 per image, so length-grouped batching is plain shuffling and counts are images."""

    pixels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1, 1, 1, dtype=torch.uint8))
    mean: tuple = (0.5, 0.5, 0.5)  # the backbone's normalisation of [0, 1] RGB pixels
    std: tuple = (0.5, 0.5, 0.5)
    augment: str = "none"  # the policy collate applies when given an rng (training)

    def __len__(self) -> int:
        return len(self.pixels)


def encode_images(pixels: np.ndarray, labels: np.ndarray | None, mean, std, augment: str) -> ImageEncoded:
    """(n, size, size, channels) uint8 pixels (data/images.py) -> an ImageEncoded split."""
    n = len(pixels)
    tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    return ImageEncoded(input_ids=[], token_type_ids=None, labels=labels, lengths=np.ones(n, dtype=np.int64),
                        n_truncated=0, pad_id=0, pixels=tensor, mean=tuple(mean), std=tuple(std), augment=augment)


def collate_images(enc: ImageEncoded, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict:
    """pixel_values (batch, 3, size, size) float32, normalised (plus labels (batch,) int64 where the split has
    them); augmented by enc.augment when `rng` is given (training)."""
    x = enc.pixels[torch.from_numpy(np.asarray(idx, dtype=np.int64))].float().div_(255.0)
    if rng is not None and POLICIES[enc.augment] is not None:
        x = augment(x, POLICIES[enc.augment], rng)
    if x.shape[1] == 1:  # grey: the same picture on the three channels an ImageNet backbone reads
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(enc.mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(enc.std, dtype=x.dtype).view(1, 3, 1, 1)
    batch = {"pixel_values": ((x - mean) / std).contiguous()}
    if enc.labels is not None:
        batch["labels"] = torch.from_numpy(np.asarray(enc.labels)[idx])
    return batch


def augment(x: torch.Tensor, p: dict, rng: np.random.Generator) -> torch.Tensor:
    """x: (batch, channels, H, W) in [0, 1] -> the same shape, each image flipped / rotated / zoomed / shifted
    (and jittered) by values drawn from `rng`, always in the same order, so the same rng gives the same batch."""
    b = x.shape[0]
    flip = np.where(rng.random(b) < p["flip"], -1.0, 1.0)
    angle = np.radians(rng.uniform(-p["rotate"], p["rotate"], b))
    zoom = np.exp(rng.uniform(math.log(p["zoom"][0]), math.log(p["zoom"][1]), b))  # as likely in as out
    shift = rng.uniform(-p["shift"], p["shift"], (b, 2)) * 2  # affine_grid's coordinates span [-1, 1]
    jitter = rng.uniform(1 - p["jitter"], 1 + p["jitter"], (b, 2)) if p["jitter"] else None
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    # theta maps each output pixel to where it is read from in the input: rotation and zoom, then the shift
    theta = np.stack([np.stack([cos * flip, -sin, shift[:, 0]], 1), np.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(torch.from_numpy(theta).to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if jitter is not None:
        bright = torch.from_numpy(jitter[:, 0]).to(x.dtype).view(b, 1, 1, 1)
        contrast = torch.from_numpy(jitter[:, 1]).to(x.dtype).view(b, 1, 1, 1)
        mean = x.mean((1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean) * bright
    return x.clamp_(0.0, 1.0)
