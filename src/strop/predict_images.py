"""Use a finished image classifier: predict images (paths, arrays, PIL images) or files of them (an .npz, a folder,
a table of image paths), evaluate labelled ones. Images are decoded, resized and normalised as in training, from
the run's strop.json (`image`: size, channels) and its saved processor (the backbone's normalisation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from strop.data.image_batches import collate_images
from strop.data.image_files import ImageReader, as_array, fit, stack_images
from strop.data.images import ImageExamples, read_prediction_input
from strop.errors import DataError, StropError
from strop.evaluate.evaluator import batched_logits
from strop.explain.image_attribution import explain_images, image_files, read_originals
from strop.predict import check_output, write_predictions


class InputSettings:
    """What reading prediction input needs of the data config's keys: the file format, and the training table's
    column names where the input has them (else they are inferred: `strict_columns` False)."""

    strict_columns = False

    def __init__(self, meta: dict, fmt: str = "auto", encoding: str = "utf-8", image_column=None, label_column=None):
        self.format, self.encoding = fmt, encoding
        self.image_column = image_column or meta.get("image_column")
        self.label_column = label_column or meta.get("label_column")
        self.label_delimiter = meta.get("label_delimiter")  # several labels per image: how a table's cells split


class ImagePredictor:
    """A loaded image classifier with its processor, strop.json metadata (labels, image size) and task object."""

    def __init__(self, model, processor, meta: dict, device: torch.device, precision: str = "fp32", task=None):
        self.model, self.processor, self.meta = model.to(device), processor, meta
        self.tokenizer = processor  # the name other stages use for "what encodes the input"
        self.device, self.precision = device, precision
        self.task, self.labels = task, meta["labels"]
        self.size, self.channels = meta["image"]["size"], meta["image"]["channels"]

    def outputs_of(self, examples, batch_size: int) -> np.ndarray:
        """(n, L) class probabilities in input order."""
        enc = self.task.encode(self.processor, examples, self.meta)
        out = np.zeros((len(enc), len(self.labels)), dtype=np.float32)
        for idx, logits, _ in batched_logits(self.model, enc, batch_size, self.device, self.precision,
                                             collate_images, self.task.model_inputs):
            out[idx] = self.task.outputs(logits).numpy()
        return out

    def pixels_of(self, images: list) -> np.ndarray:
        """Paths, arrays or PIL images -> (n, size, size, channels) uint8, as training read its images."""
        reader, fitted = ImageReader(self.size), []
        for i, image in enumerate(images):
            if isinstance(image, (str, Path)):
                fitted.append(reader.read(Path(image).expanduser(), f"input {i}"))
            else:
                fitted.append(fit(as_array(image), self.size))
        return stack_images(fitted, self.channels)

    def predict(self, images, batch_size: int = 64) -> list[dict]:
        """One {'label', 'score', 'probs'} per image; `images`: a path, array or PIL image, or a list of them."""
        if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "mode"):
            images = [images]
        images = list(images)
        if not images:
            return []
        probs = self.outputs_of(self.examples(self.pixels_of(images)), batch_size)
        return [self.task.format(row, self.labels, self.meta) for row in probs]

    def examples(self, pixels: np.ndarray, labels: np.ndarray | None = None) -> ImageExamples:
        n = len(pixels)
        return ImageExamples(pixels, labels, [f"input {i}" for i in range(n)], list(range(n)))

    def predict_inputs(self, inputs: list, pairs=None, batch_size: int = 64) -> list[dict]:
        """Serve's batches: images, as `predict`."""
        return self.predict(inputs, batch_size=batch_size)

    def file_examples(self, path, need_label: bool, fmt: str = "auto", encoding: str = "utf-8", **columns):
        settings = InputSettings(self.meta, fmt, encoding, **columns)
        return read_prediction_input(path, settings, self.size, self.channels, self.labels, need_label,
                                     multi=not self.task.class_per_row)

    def labelled_encoding(self, path, **columns):
        """A labelled file encoded as training encoded its data."""
        _, ex = self.file_examples(path, True, **columns)
        return self.task.encode(self.processor, ex, self.meta)

    def evaluate_file(self, path, batch_size: int = 128, **columns) -> dict:
        """Metrics of this model on labelled images (an .npz's test split, a folder of class folders, a table)."""
        enc = self.labelled_encoding(path, **columns)
        metrics, _ = self.task.evaluate(self.model, enc, self.labels, batch_size, self.device, self.precision)
        metrics["images"] = len(enc)
        return metrics

    def predict_file(self, path, out: str | Path, batch_size: int = 64, **columns) -> int:
        """Write one row per image of `path` to `out` (.csv or .jsonl): the input's columns (path, or split and
        index, or the table's), then prediction, score and prob_<label>."""
        check_output(out)
        raw, ex = self.file_examples(path, False, **columns)
        probs = self.outputs_of(ex, batch_size)
        preds = [self.task.format(r, self.labels, self.meta) for r in probs]
        write_predictions(out, raw.columns, [raw.rows[i] for i in ex.rows], preds, self.flat)
        return len(preds)

    def flat(self, pred: dict) -> dict:
        return self.task.flat(pred, self.labels)

    def explain(self, *args, **kwargs):
        raise StropError("this model classifies images: give --image FILE_OR_FOLDER (Grad-CAM and "
                         "integrated gradients, written as PNG overlays), not --text")

    def explain_inputs(self, path):
        raise DataError(f"{path}: this model classifies images: give --image FILE_OR_FOLDER, not --data")

    def explain_images(self, paths: list, target=None, steps: int = 50) -> list:
        """Grad-CAM and integrated gradients of the image files `paths` name (files, or folders of them), for
        `target` (default: each image's predicted class); every file is read before anything is computed."""
        files = image_files(paths)
        return explain_images(self, read_originals(files), [str(f) for f in files], target, steps)
