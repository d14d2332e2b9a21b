"""Image classification: one class per image (X-ray, ultrasound, fundus, ... or any picture).

Data are a MedMNIST-style .npz, a folder per class or a table of image paths (data/images.py), decoded and resized
to image.size when read; batches are normalised as the backbone expects and augmented in training only
(data/image_batches.py, image.augment). The model is EfficientNet-Lite0 with ImageNet weights by default
(models/efficientnet_lite.py, models/vision.py) with a new linear head, or a local Hugging Face
image-classification folder (ViT, ConvNeXt, ...: models/hf_vision.py), whose own input size an empty
image.size takes; models/image_backbone.py tells the two apart. Full fine-tuning, freezing and LoRA on
linear layers and convolutions work as for text. Metrics: ROC AUC (one-vs-rest averaged over classes,
the MedMNIST convention), accuracy, macro-F1, MCC, calibration (ECE); AUC is the model-selection metric
because it does not depend on a decision threshold and moves smoothly on a small validation split, where
accuracy changes in steps of one image (and MedMNIST ranks by it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from strop.compress.onnx import OnnxInputs, image_inputs
from strop.data.image_batches import ImageEncoded, collate_images, encode_images
from strop.data.images import is_image_data, prepare_images
from strop.evaluate.evaluator import batched_logits
from strop.evaluate.metrics import (ScoredClassificationMetrics, ScoredMultiLabelMetrics, decide, softmax,
                                    tune_threshold, youden_threshold)
from strop.evaluate.image_report import image_sections
from strop.tasks.classification import (class_flat, class_format, labels_agreement, labels_flat, labels_format,
                                        labels_sections)
from strop.models.image_backbone import build_image_model, image_model_folder, input_size
from strop.models.vision import ImageProcessor, default_vision_path
from strop.predict_images import ImagePredictor
from strop.tasks.base import ExportSignature, Task
from strop.training.progress import console


SINGLE, MULTI = "image_classification", "image_multi_label"  # the data decide which under task=auto


class ImageClassification(Task):
    name = SINGLE
    description = "one class per image: a MedMNIST-style .npz, a folder per class, or a table of image paths"
    metrics = ("roc_auc", "accuracy", "macro_f1", "mcc", "ece", "loss")  # ece: 15 bins, evaluate/metrics.py
    model_inputs = ("pixel_values",)
    head_names = ("classifier",)
    class_per_row = True
    default_model = "EfficientNet-Lite0 (ImageNet)"
    # full fine-tuning: 1e-3 beat 3e-4 on BreastMNIST (test AUC .905 vs .851, 112 px, 1 seed; DECISIONS.md): a CNN
    # with batch norm and a new head takes 20x a transformer's rate. The others are not measured yet: LoRA's
    # low-rank updates at twice it, as LoRA runs above full fine-tuning for text
    method_lr = {"none": 1e-3, "lora": 2e-3, "adalora": 2e-3, "adapter": 1e-3, "freeze": 1e-3}
    # BreastMNIST's 546 images at 224 px: 3 epochs (the text default, 51 steps) reached test AUC .831, 10 epochs .919
    # and .900 (seeds 42, 7; BENCHMARKS.md): a new head and batch norms on a small set need a few hundred steps
    default_epochs = 10
    takes_images = True  # serve answers image files, multipart or base64 (serve/images.py)
    # ONNX: pixel_values (batch, 3, size, size) -> logits; int8 is static, calibrated on training images
    export = ExportSignature(("pixel_values",), ("batch", "labels"), int8="static")

    # -- data -----------------------------------------------------------------------------------------------------

    def detects(self, cfg) -> bool:
        return is_image_data(cfg.data)

    def prepare(self, cfg, carve: bool = True):
        return prepare_images(cfg, SINGLE, MULTI, carve)

    def resolve_defaults(self, cfg) -> list[str]:
        if cfg.image.size is not None:
            return []
        cfg.image.size, folder = input_size(cfg.model.path)
        if folder is None:
            return []
        return [f"image.size={cfg.image.size} (the input size model folder {folder.name} states; set "
                "image.size to override)"]

    def model_path(self, cfg) -> str | Path:
        return default_vision_path() if str(cfg.model.path) == "default" else cfg.model.path

    def model_folder(self, path, allow_pickle: bool = False) -> Path:
        return image_model_folder(path)

    def load_processor(self, folder, trust_remote_code: bool = False) -> ImageProcessor:
        return ImageProcessor.from_folder(folder)

    def encode(self, processor, examples, meta: dict) -> ImageEncoded:
        return encode_images(examples.pixels, examples.labels, processor.image_mean, processor.image_std,
                             meta["image"]["augment"])

    def collate(self, enc: ImageEncoded, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict:
        return collate_images(enc, idx, rng)

    def split_summary(self, ds, split: str, enc: ImageEncoded) -> dict:
        counts = np.bincount(ds.splits[split].labels, minlength=len(ds.labels))
        return {"label_counts": dict(zip(ds.labels, counts.tolist())), "image_shape": list(enc.pixels.shape[1:])}

    # -- model ----------------------------------------------------------------------------------------------------

    def build_model(self, cfg, labels: list[str]):
        folder = self.model_folder(self.model_path(cfg))
        model, note = build_image_model(folder, labels, cfg.model, cfg.image.size, head=False)
        if note:
            console.print(note, markup=False)
        return model

    def load_model(self, folder, meta: dict, head: bool = True):
        return build_image_model(self.model_folder(folder), meta["labels"], head=head)[0]

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1)

    # -- evaluation, metadata, prediction -------------------------------------------------------------------------

    def evaluate(self, model, enc: ImageEncoded, labels: list[str], batch_size: int, device: torch.device,
                 precision: str = "fp32", threshold: float = 0.5, keep_outputs: bool = False):
        """Streamed metrics with `loss`; with keep_outputs also the (n, L) probabilities in input order."""
        metrics, kept, loss_sum = self.metrics_of(labels, threshold), None, 0.0
        if keep_outputs:
            kept = np.zeros((len(enc), len(labels)), dtype=np.float32)
        for idx, logits, batch in batched_logits(model, enc, batch_size, device, precision, self.collate,
                                                 self.model_inputs):
            loss_sum += float(self.loss(logits, batch)) * len(idx)
            probs = self.outputs(logits)
            metrics.update(probs, batch["labels"])
            if kept is not None:
                kept[idx] = probs.numpy()
        result = metrics.compute()
        result["loss"] = loss_sum / max(1, len(enc))
        return result, kept

    def metrics_of(self, labels: list[str], threshold: float):
        """The streaming metrics of a labelled split (evaluate/metrics.py)."""
        return ScoredClassificationMetrics(labels, threshold)

    def tunes_threshold_for(self, cfg, labels: list[str]) -> bool:
        return bool(cfg.eval.tune_threshold) and len(labels) == 2

    def choose_threshold(self, probs: np.ndarray, labels: np.ndarray) -> float:
        # Youden's J: the operating point a screening test is usually set at (sensitivity + specificity)
        return youden_threshold(probs[:, 1], np.asarray(labels) == 1)

    def agreement(self, a: np.ndarray, b: np.ndarray, threshold: float) -> float | None:
        return float((decide(softmax(a), threshold) == decide(softmax(b), threshold)).mean())

    def meta(self, cfg, ds) -> dict:
        channels = int(ds.splits["train"].pixels.shape[-1])
        return {"image": {"size": cfg.image.size, "channels": channels, "augment": cfg.image.augment},
                "image_column": ds.columns.text, "label_column": ds.columns.label, "text_column": None,
                "text_pair_column": None, "label_delimiter": cfg.data.label_delimiter}

    def predictor(self, model, processor, meta: dict, device: torch.device, precision: str = "fp32"):
        return ImagePredictor(model, processor, meta, device, precision, task=self)

    def onnx_inputs(self, processor, meta: dict) -> OnnxInputs:
        return image_inputs(meta["image"]["size"])  # always 3 channels: collate repeats a grey one

    def format(self, row: np.ndarray, labels: list[str], meta: dict) -> dict:
        return class_format(row, labels, meta.get("threshold", 0.5))

    def flat(self, pred: dict, labels: list[str]) -> dict:
        return class_flat(pred, labels)

    def report_sections(self, predictor, examples, results, split, errors_k, explain_k):
        """Confusion matrix, ROC curves, calibration, images with Grad-CAM (evaluate/image_report.py)."""
        return image_sections(predictor, examples, results, split, errors_k)



class ImageMultiLabel(ImageClassification):
    """Several findings per image (ChestMNIST's 14 labels; a table of images with lists of labels): one sigmoid
    per label, binary cross-entropy, the decision threshold tuned on validation (micro-F1) and saved; ROC AUC is the
    mean of the labels' AUCs (ChestMNIST's convention) and picks the best step, as for one class per image."""

    name = MULTI
    description = "several labels per image: an .npz with (N, L) 0/1 labels, or a table of image paths with lists"
    metrics = ("roc_auc", "micro_f1", "macro_f1", "exact_match", "loss")
    class_per_row = False
    tunes_threshold = True

    def detects(self, cfg) -> bool:
        return False  # image data are recognised once, by image_classification, whose reader picks this task

    def split_summary(self, ds, split: str, enc: ImageEncoded) -> dict:
        counts = np.asarray(ds.splits[split].labels).sum(0).astype(int)
        return {"label_counts": dict(zip(ds.labels, counts.tolist())), "image_shape": list(enc.pixels.shape[1:])}

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"].float())

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()

    def metrics_of(self, labels: list[str], threshold: float) -> ScoredMultiLabelMetrics:
        return ScoredMultiLabelMetrics(labels, threshold)

    def tunes_threshold_for(self, cfg, labels: list[str]) -> bool:
        return True

    def choose_threshold(self, probs: np.ndarray, labels: np.ndarray) -> float:
        return tune_threshold(probs, labels)

    def agreement(self, a: np.ndarray, b: np.ndarray, threshold: float) -> float | None:
        return labels_agreement(a, b, threshold)

    def format(self, row: np.ndarray, labels: list[str], meta: dict) -> dict:
        return labels_format(row, labels, meta.get("threshold", 0.5))

    def flat(self, pred: dict, labels: list[str]) -> dict:
        return labels_flat(pred, labels)

    def report_sections(self, predictor, examples, results, split, errors_k, explain_k):
        return labels_sections(predictor, examples, split)


IMAGE_CLASSIFICATION = ImageClassification()
IMAGE_MULTI_LABEL = ImageMultiLabel()
