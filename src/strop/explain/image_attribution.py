"""Why an image classifier predicted what it did: Grad-CAM (explain/gradcam.py) and integrated gradients
on the pixels (Captum), each drawn as a heatmap over the image (explain/overlay.py).

Integrated gradients attribute `logit[target](x) - logit[target](black image)` to every input pixel and
channel; completeness (the attributions sum to that difference) is checked as for text, doubling the steps
until it holds. The map drawn is the magnitude summed over the channels, scaled to its 99th percentile. A
black baseline is the usual choice for X-rays and photographs alike: "no signal", against which the
model's evidence is measured.

Overlays are drawn on the image as it was read, at its own size (the model saw it resized to image.size;
the heatmap is resized back), so they line up with the original file. Pixels never go to a log: only file
names, classes and numbers are printed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from strop.data.image_files import IMAGE_SUFFIXES, decode_image, fit, is_image_file, stack_images
from strop.errors import DataError
from strop.explain.attribution import require_captum, require_torch_model
from strop.explain.gradcam import CamLayer, grad_cam
from strop.explain.overlay import heat_overlay, png_bytes, scaled

CAM_BATCH = 16  # images per Grad-CAM forward and backward


@dataclass
class ImageExplanation:
    """The explanations of one image. cam: (h, w) >= 0 at `layer`'s resolution; attributions:
    (size, size) integrated gradients summed over channels (None when only Grad-CAM was asked for);
    image: the pixels as read, (H, W) or (H, W, 1 or 3) uint8."""

    source: str  # the file, or 'input i'
    prediction: dict  # the task's format: {'label', 'score', 'probs'}
    target: str  # the class explained
    layer: CamLayer
    cam: np.ndarray
    image: np.ndarray
    attributions: np.ndarray | None = None
    completeness: dict | None = None

    def overlays(self) -> dict[str, np.ndarray]:
        """{'gradcam': (H, W, 3) uint8[, 'integrated_gradients': ...]} at the image's own size."""
        out = {"gradcam": heat_overlay(self.image, scaled(self.cam))}
        if self.attributions is not None:
            out["integrated_gradients"] = heat_overlay(self.image, scaled(np.abs(self.attributions), 99.0))
        return out

    def to_dict(self) -> dict:
        return {"image": self.source, "label": self.prediction["label"], "score": self.prediction["score"],
                "probs": self.prediction["probs"], "target": self.target, "gradcam_layer": self.layer.name,
                "gradcam_map": [self.layer.height, self.layer.width], "completeness": self.completeness}


def image_files(paths: list[str | Path]) -> list[Path]:
    """The image files that `paths` name: files as given, folders by every image file in them
    (recursively, in name order). A missing path, or a folder without images, is a DataError naming it."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                raise DataError(f"{path}: no image files in this folder (looked for "
                                f"{', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such image file or folder; check the path given to --image")
    return files


def read_originals(files: list[Path]) -> list[np.ndarray]:
    """Each file's pixels as decoded ((H, W) or (H, W, 3) uint8); a file that does not decode is a DataError
    naming it, raised before anything is computed or written."""
    out = []
    for path in files:
        try:
            out.append(decode_image(path))
        except Exception as e:  # noqa: BLE001 - Pillow: OSError, ValueError, DecompressionBomb...
            raise DataError(f"{path}: cannot read this image ({type(e).__name__}: {str(e)[:200]}); give a "
                            "PNG, JPEG, TIFF, BMP or DICOM file") from None
    return out


def target_index(target: str | int | None, labels: list[str]) -> int | None:
    """A label name (or its index) -> its index; None stays None (each image's predicted class)."""
    if target is None:
        return None
    if str(target) in labels:
        return labels.index(str(target))
    if str(target).isdigit() and int(target) < len(labels):
        return int(target)
    raise DataError(f"target {target!r} is not a label of this model; labels are {labels}")


def pixel_batch(predictor, images: list[np.ndarray]) -> torch.Tensor:
    """Images as read -> pixel_values (n, 3, size, size) as the run's task encodes them for prediction."""
    pixels = stack_images([fit(a, predictor.size) for a in images], predictor.channels)
    enc = predictor.task.encode(predictor.processor, predictor.examples(pixels), predictor.meta)
    return predictor.task.collate(enc, np.arange(len(enc)))["pixel_values"]


def explain_images(predictor, images: list[np.ndarray], sources: list[str], target: str | int | None = None,
                   steps: int = 50, integrated: bool = True) -> list[ImageExplanation]:
    """Grad-CAM (and, with `integrated`, integrated gradients) of each image for `target` (default: its
    predicted class). images: as read, any size; sources: a name for each."""
    require_torch_model(predictor)
    if integrated:
        require_captum()
    index = target_index(target, predictor.labels)
    out = []
    for start in range(0, len(images), CAM_BATCH):
        chunk = images[start:start + CAM_BATCH]
        x = pixel_batch(predictor, chunk).to(predictor.device)
        res = grad_cam(predictor.model, x, index)
        probs = predictor.task.outputs(res.logits).cpu().numpy()
        for i, image in enumerate(chunk):
            t = int(res.targets[i])
            ex = ImageExplanation(sources[start + i], predictor.task.format(probs[i], predictor.labels,
                                                                            predictor.meta),
                                  predictor.labels[t], res.layer, res.cams[i].cpu().numpy(), image)
            if integrated:
                ex.attributions, ex.completeness = integrated_gradients(predictor, x[i:i + 1], t, steps)
            out.append(ex)
    return out


def integrated_gradients(predictor, x: torch.Tensor, target: int, steps: int = 50, tolerance: float = 0.05,
                         max_steps: int = 400, internal_batch_size: int = 32) -> tuple[np.ndarray, dict]:
    """((size, size) attributions summed over channels, completeness) of one image x (1, 3, size, size)
    against a black image. Doubles the steps from `steps` (up to max_steps) until
    |sum - logit difference| <= tolerance x |logit difference|."""
    from captum.attr import IntegratedGradients

    model = predictor.model
    mean = torch.tensor(predictor.processor.image_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(predictor.processor.image_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    baseline = ((0.0 - mean) / std).expand_as(x)  # a black image, normalised as the model sees pixels

    def forward(pixels):
        return model(pixel_values=pixels).logits.float()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            diff = float(forward(x)[0, target] - forward(baseline)[0, target])
        ig = IntegratedGradients(forward)
        while True:
            attr, delta = ig.attribute(x, baselines=baseline, target=target, n_steps=steps,
                                       internal_batch_size=internal_batch_size,
                                       return_convergence_delta=True)
            delta = float(delta.abs().max())
            done = delta <= tolerance * max(abs(diff), 1e-2)
            if done or steps * 2 > max_steps:
                break
            steps *= 2
    finally:
        model.train(was_training)
    total = attr.detach().float()[0].sum(0).cpu().numpy()
    return total, {"sum": float(total.sum()), "logit_diff": diff, "delta": delta, "steps": steps,
                   "within_tolerance": done, "tolerance": tolerance}


def write_overlays(explanations: list[ImageExplanation], folder: str | Path) -> list[dict]:
    """Write each image's overlays as `<name>.gradcam.png` and `<name>.integrated_gradients.png` into
    `folder` (created), plus explanations.json; returns the explanations' dicts with the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records, used = [], set()
    for ex in explanations:
        stem = Path(ex.source).stem or "image"
        name, k = stem, 1
        while name in used:  # two files of one name from different folders
            k += 1
            name = f"{stem}-{k}"
        used.add(name)
        files = {}
        for kind, rgb in ex.overlays().items():
            (folder / f"{name}.{kind}.png").write_bytes(png_bytes(rgb))
            files[kind] = f"{name}.{kind}.png"
        records.append({**ex.to_dict(), "files": files})
    text = json.dumps(records, indent=2, ensure_ascii=False)
    (folder / "explanations.json").write_text(text, encoding="utf-8")
    return records
