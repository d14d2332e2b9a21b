"""Sequence classification of texts and text pairs: single-label, multi-label and regression.

The three share data (a table with a text column, an optional pair column and a label column; which of the three
a table is, `task=auto` infers from its labels), encoding (one tokenized row per example), the model (the
architecture's `*ForSequenceClassification`, or mean pooling + linear) and the predictor; they differ in the loss,
how logits become outputs (softmax / sigmoid / the value), the metrics and their streaming accumulators.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from strop.data.batching import INPUT_NAMES, Encoded, collate_inputs, encode
from strop.data.examples import infer_label_kind, label_names, resolve_columns, to_examples
from strop.data.prepare import Dataset, read_tables
from strop.errors import ConfigError, DataError
from strop.evaluate.evaluator import batched_logits
from strop.evaluate.metrics import ClassificationMetrics, MultiLabelMetrics, RegressionMetrics, decide
from strop.evaluate.report_parts import (calibration, calibration_section, confusion_section, errors_section,
                                         multi_label_calibration, regression_section)
from strop.models.classifier import build_classifier, load_sequence_classifier, sequence_classifier
from strop.predict import Predictor
from strop.tasks.base import ExportSignature, Task


def check_room_for_text(tokenizer, max_length: int, pairs: bool) -> None:
    """model.max_length must hold the tokenizer's special tokens plus one real token of each text; below the special
    tokens alone the tokenizer does not truncate at all."""
    need = tokenizer.num_special_tokens_to_add(pair=pairs) + (2 if pairs else 1)
    if max_length < need:
        what = "a text pair" if pairs else "a text"
        raise ConfigError(f"model.max_length={max_length} leaves no room for the text: this tokenizer adds "
                          f"{need - (2 if pairs else 1)} special tokens to {what}, so the least that keeps a token of "
                          f"{'each text' if pairs else 'it'} is {need}; set model.max_length>={need} (128 is usual)")


class SequenceClassification(Task):
    """One of the three sequence tasks; `kind` picks the loss, the outputs and the metric accumulator."""

    export = ExportSignature(INPUT_NAMES, ("batch", "labels"))
    compressible = True

    def __init__(self, name: str, description: str, metrics: tuple[str, ...], modes: tuple[str, ...]):
        self.name, self.description, self.metrics, self.modes = name, description, metrics, modes

    label_kind = "class"  # what its label column holds (data/examples.py LABEL_KINDS)

    def prepare(self, cfg, carve: bool = True):
        return prepare_table(cfg, carve)

    def check_settings(self, cfg, ds, processor) -> None:
        check_room_for_text(processor, cfg.model.max_length, ds.columns.pair is not None)

    def encode(self, processor, examples, meta: dict) -> Encoded:
        return encode(processor, examples, meta["max_length"])

    def collate(self, enc: Encoded, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict:
        batch = collate_inputs(enc, idx)
        if enc.labels is not None:
            batch["labels"] = torch.from_numpy(enc.labels[idx])
        return batch

    problem_type = "single_label_classification"  # transformers' config.problem_type

    def build_model(self, cfg, labels: list[str]):
        return build_classifier(cfg.model, labels, self.num_outputs(labels), self.problem_type)

    def load_model(self, folder: Path, meta: dict, head: bool = True):
        load = load_sequence_classifier if head else sequence_classifier
        return load(folder, meta, self.num_outputs(meta["labels"]), self.problem_type)

    def meta(self, cfg, ds) -> dict:
        return {"max_length": cfg.model.max_length, "pooling": cfg.model.pooling, "text_column": ds.columns.text,
                "text_pair_column": ds.columns.pair, "label_column": ds.columns.label,
                "label_delimiter": cfg.data.label_delimiter}

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (batch, num_labels) -> what predictions report: probabilities, or values (batch,)."""
        raise NotImplementedError

    def accumulator(self, labels: list[str], threshold: float):
        raise NotImplementedError

    def evaluate(self, model, enc: Encoded, labels: list[str], batch_size: int, device: torch.device,
                 precision: str = "fp32", threshold: float = 0.5, keep_outputs: bool = False):
        """Streamed metrics (plus mean `loss`); with keep_outputs also the outputs in input order ((n, L)
        probabilities or (n,) values), which multi-label threshold tuning needs."""
        metrics, kept, loss_sum = self.accumulator(labels, threshold), None, 0.0
        for idx, logits, batch in batched_logits(model, enc, batch_size, device, precision, self.collate,
                                                 self.model_inputs):
            loss_sum += float(self.loss(logits, batch)) * len(idx)
            out = self.outputs(logits)
            metrics.update(self.scored(out), batch["labels"])
            if keep_outputs:
                if kept is None:
                    kept = np.zeros((len(enc),) + tuple(out.shape[1:]), dtype=np.float32)
                kept[idx] = out.numpy()
        result = metrics.compute()
        result["loss"] = loss_sum / max(1, len(enc))
        return result, kept

    def gold_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """(batch,) bool: rows with a gold label (augmented distillation rows hold NaN)."""
        missing = torch.isnan(labels.float())
        return ~(missing.flatten(1).any(1) if missing.dim() > 1 else missing)

    def scored(self, out: torch.Tensor) -> torch.Tensor:
        """What the metric accumulator compares with the labels."""
        return out

    def predictor(self, model, processor, meta: dict, device: torch.device, precision: str = "fp32"):
        return Predictor(model, processor, meta, device, precision, task=self)


class SingleLabel(SequenceClassification):
    class_per_row = True

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1)

    def scored(self, out: torch.Tensor) -> torch.Tensor:
        return out.argmax(-1)

    def accumulator(self, labels: list[str], threshold: float):
        return ClassificationMetrics(labels)

    def soft_loss(self, student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
        # KL(teacher || student) on temperature-softened distributions times T^2 (Hinton et al. 2015; T^2 keeps
        # the gradient scale independent of T)
        return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean",
                        log_target=True) * t * t

    def gold_rows(self, labels: torch.Tensor) -> torch.Tensor:
        return labels >= 0  # augmented rows hold -1

    def split_summary(self, ds, split: str, enc: Encoded) -> dict:
        counts = np.bincount(ds.splits[split].labels, minlength=len(ds.labels))
        return {"label_counts": dict(zip(ds.labels, counts.tolist()))}

    def format(self, row: np.ndarray, labels: list[str], meta: dict) -> dict:
        return class_format(row, labels)

    def flat(self, pred: dict, labels: list[str]) -> dict:
        return class_flat(pred, labels)

    def report_sections(self, predictor, examples, results, split, errors_k, explain_k):
        sections, extra, probs = class_sections(predictor, examples, results, split)
        if probs is not None:
            sections["errors"], extra["worst_errors"] = errors_section(predictor, examples, probs, errors_k,
                                                                       explain_k)
        return sections, extra


def class_format(row: np.ndarray, labels: list[str], threshold: float = 0.5) -> dict:
    """One single-label prediction: the decided label (the likeliest; with two classes and a tuned threshold,
    evaluate/metrics.decide), its probability, every label's probability."""
    best = int(decide(np.asarray(row)[None], threshold)[0])
    return {"label": labels[best], "score": float(row[best]),
            "probs": {name: float(p) for name, p in zip(labels, row)}}


def class_flat(pred: dict, labels: list[str]) -> dict:
    """A single-label prediction as flat CSV columns."""
    return {"prediction": pred["label"], "score": pred["score"], **{f"prob_{n}": pred["probs"][n] for n in labels}}


def class_sections(predictor, examples, results: dict, split: str | None):
    """(report sections, report.json extras, probabilities or None) every one-class-per-example task shows: the
    confusion matrix and, with the data at hand, calibration."""
    sections = {"confusion": confusion_section(results, predictor.labels,
                                               "test" if "test" in results else "validation")}
    if examples is None:
        return sections, {}, None
    probs = predictor.outputs_of(examples, 64)
    cal = calibration(probs.max(1), probs.argmax(1) == examples.labels)
    sections["calibration"] = calibration_section(cal, split)
    return sections, {"calibration": cal}, probs


class MultiLabel(SequenceClassification):
    problem_type = "multi_label_classification"
    label_kind = "classes"
    tunes_threshold = True

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"].float())

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def accumulator(self, labels: list[str], threshold: float):
        return MultiLabelMetrics(labels, threshold)

    def soft_loss(self, student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t)) * t * t

    def agreement(self, a: np.ndarray, b: np.ndarray, threshold: float) -> float | None:
        return labels_agreement(a, b, threshold)

    def format(self, row: np.ndarray, labels: list[str], meta: dict) -> dict:
        return labels_format(row, labels, meta["threshold"])

    def flat(self, pred: dict, labels: list[str]) -> dict:
        return labels_flat(pred, labels)

    def report_sections(self, predictor, examples, results, split, errors_k, explain_k):
        return labels_sections(predictor, examples, split)


def labels_agreement(a: np.ndarray, b: np.ndarray, threshold: float) -> float:
    """Share of examples whose every label decision two models' logits (n, L) make alike at `threshold`."""
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    return float(((sig(a) >= threshold) == (sig(b) >= threshold)).all(1).mean())


def labels_format(row: np.ndarray, labels: list[str], threshold: float) -> dict:
    """One multi-label prediction: the labels at or above the threshold, every label's probability."""
    probs = {name: float(p) for name, p in zip(labels, row)}
    return {"labels": [n for n, p in probs.items() if p >= threshold], "probs": probs}


def labels_flat(pred: dict, labels: list[str]) -> dict:
    """A multi-label prediction as flat CSV columns (the labels joined by '|')."""
    return {"prediction": "|".join(pred["labels"]), **{f"prob_{n}": pred["probs"][n] for n in labels}}


def labels_sections(predictor, examples, split: str | None) -> tuple[dict, dict]:
    """The report of a multi-label task, with the data at hand: calibration of each label's decision."""
    if examples is None:
        return {}, {}
    probs = predictor.outputs_of(examples, 64)
    cal = multi_label_calibration(probs, examples.labels, predictor.meta.get("threshold", 0.5))
    return {"calibration": calibration_section(cal, split + ", per label decision")}, {"calibration": cal}


class Regression(SequenceClassification):
    problem_type = "regression"
    label_kind = "number"

    def num_outputs(self, labels: list[str]) -> int:
        return 1

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.mse_loss(logits.float().squeeze(-1), batch["labels"].float())

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1)

    def accumulator(self, labels: list[str], threshold: float):
        return RegressionMetrics()

    def soft_loss(self, student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
        return F.mse_loss(student, teacher)

    def agreement(self, a: np.ndarray, b: np.ndarray, threshold: float) -> float | None:
        return None

    def format(self, row: np.ndarray, labels: list[str], meta: dict) -> dict:
        return {"value": float(row)}

    def flat(self, pred: dict, labels: list[str]) -> dict:
        return {"prediction": pred["value"]}

    def report_sections(self, predictor, examples, results, split, errors_k, explain_k):
        if examples is None:
            return {}, {}
        return {"regression": regression_section(predictor.outputs_of(examples, 64), examples.labels, split)}, {}


SINGLE_LABEL = SingleLabel("single_label", "one class per text (binary or multi-class)",
                           ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "mcc", "loss"), ("standard", "fewshot"))
MULTI_LABEL = MultiLabel("multi_label", "any number of classes per text (labels as lists or delimited)",
                         ("micro_f1", "macro_f1", "micro_precision", "micro_recall", "exact_match", "hamming_loss",
                          "loss"), ("standard",))
REGRESSION = Regression("regression", "a number per text (scores)",
                        ("pearson", "spearman", "mse", "rmse", "mae", "loss"), ("standard",))
BY_KIND = {t.label_kind: t for t in (SINGLE_LABEL, MULTI_LABEL, REGRESSION)}


def prepare_table(cfg, carve: bool = True) -> Dataset:
    """Read, validate and split the table described by `cfg.data` for a sequence task (`cfg.task`, or task=auto:
    the one whose label kind the training labels hold).

    carve=False leaves train whole (validation/test only where files give them): a run first decides its training
    mode from the whole training file, which sets data.validation_ratio, then calls `ds.carve_missing(cfg.data)`.
    """
    d = cfg.data
    tables = read_tables(d)
    train = tables["train"]
    if not train.rows:
        raise DataError(f"{train.path} has a header but no rows; add training examples")
    cols = resolve_columns(train, d.text_column, d.text_pair_column, d.label_column)
    notes = [f"columns: text={cols.text!r}" + (f", pair={cols.pair!r}" if cols.pair else "") + f", label={cols.label!r}"]
    if cfg.task == "auto":
        kind, why = infer_label_kind(train, cols.label, d.label_delimiter)
        task = BY_KIND[kind]
        notes.append(f"task inferred: {task.name} ({why}); set task=... to override")
    else:
        task = next(t for t in BY_KIND.values() if t.name == cfg.task)
    names = label_names(train, cols.label, task.label_kind, d.label_delimiter)
    splits = {}
    for split, table in tables.items():
        if split not in ("train", "validation", "test"):
            continue
        for key, name in (("data.text_column", cols.text), ("data.text_pair_column", cols.pair),
                          ("data.label_column", cols.label)):
            if name and name not in table.columns:
                raise DataError(f"{key}={name!r} not found in {table.path} ({split} split); columns are "
                                f"{table.columns}")
        splits[split] = to_examples(table, cols, task.label_kind, names, d.label_delimiter, split)
    ds = Dataset(task.name, names, cols, splits, notes)
    if carve:
        ds.carve_missing(d)
    return ds
