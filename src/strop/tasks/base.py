"""The task protocol: everything that differs between tasks, behind one small interface.

A task is an object (one module per task in `strop.tasks`) that every stage asks instead of comparing task names:
what the data looks like (`detects`, `prepare`), how examples become model inputs (`encode`, `collate`), which model
it trains (`build_model`, `load_model`, `head_names`), what it optimises and reports (`loss`, `metrics`, `evaluate`),
what a finished model remembers (`meta` -> strop.json) and how it answers (`predictor`, `export`).

`Task` gives the defaults shared by the encoder tasks (a text tokenizer as the processor, input_ids /
attention_mask / token_type_ids as model inputs, linear heads named classifier / score); a task overrides what
differs. The registry (`strop.tasks.get_task`, `task_names`, `detect_task`) maps names from config.yaml and
strop.json to these objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from strop.config import EPOCHS
from strop.compress.onnx import OnnxInputs, text_inputs
from strop.data.batching import Encoded, collate_inputs
from strop.evaluate.metrics import greater_is_better, tune_threshold
from strop.models.backbone import load_tokenizer, resolve_model_path


@dataclass(frozen=True)
class ExportSignature:
    """What an ONNX export of the task's model takes and gives: input names (in order) and the output's axes."""

    inputs: tuple[str, ...]
    output_axes: tuple[str, ...]  # ("batch", "labels") or ("batch", "sequence", "labels")
    # model.int8.onnx: "dynamic" (int8 weights of the MatMuls, activations quantised per batch: transformers)
    # or "static" (weights and activations, ranges calibrated on training inputs: CNNs, whose convolutions
    # ONNX Runtime's dynamic int8 runs slower than fp32)
    int8: str = "dynamic"


class Task:
    name: str = ""
    description: str = ""  # one line for `--help-config` and error messages
    metrics: tuple[str, ...] = ("loss",)  # validation metrics, the default model-selection metric first
    model_inputs: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
    # task heads across architectures: trained in full, saved with adapters, never wrapped by PEFT (all-linear)
    head_names: tuple[str, ...] = ("classifier", "score", "pre_classifier")
    modes: tuple[str, ...] = ("standard",)  # training modes (train.mode) the task supports
    tunes_threshold: bool = False  # outputs are thresholded (multi-label): the threshold is tuned on validation
    class_per_row: bool = False  # each example has exactly one class (single-label): counts per class mean something
    takes_words: bool = False  # its predictor also takes pre-split words (serve's {tokens} inputs, entities out)
    takes_images: bool = False  # its predictor takes images (serve's multipart and base64 uploads, serve/images.py)
    generates: bool = False  # its predictor answers prompts with text (serve's OpenAI-compatible routes)
    export: ExportSignature | None = None  # None: `strop export` refuses with `export_refusal`
    export_refusal: str = "this task has no ONNX export"
    serve_refusal: str | None = None  # set: `strop serve` refuses the task's runs with this reason
    predict_refusal: str | None = None  # set: its predictor's predict / explain refuse with this reason
    auto_detected: bool = True  # task=auto can find it from the data (False: chosen by name only, task=...)
    compressible: bool = False  # `strop export --prune / --distill` apply (soft_loss, gold_rows, a sequence head)
    default_model: str = "all-MiniLM-L6-v2"  # what model.path=default loads (model_path), by name
    default_peft: str = "none"  # what peft.method=auto means for this task (none = full fine-tuning)
    method_lr: dict | None = None  # train.lr by peft.method when unset; None = config.METHOD_LR (text encoders)
    default_epochs: float = EPOCHS  # train.epochs when unset

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    # -- metrics --------------------------------------------------------------------------------------------------

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def greater_is_better(self, metric: str) -> bool:
        return greater_is_better(metric)

    # -- data -----------------------------------------------------------------------------------------------------

    def detects(self, cfg) -> bool:
        """Whether `cfg.data.train` holds data only this task reads (task=auto); the fallback task says False."""
        return False

    def prepare(self, cfg, carve: bool = True):
        """cfg.data -> validated `Dataset` (task name, labels, columns, splits); carve=False leaves train whole."""
        raise NotImplementedError

    def resolve_defaults(self, cfg) -> list[str]:
        """Fill settings left empty whose default depends on the model (an image task's image.size: the
        size the model folder states); one note per value filled, for the log. Idempotent: a value already
        set is kept."""
        return []

    def model_path(self, cfg):
        """The model folder cfg.model.path names (`default`: the task's default model)."""
        return cfg.model.path

    def model_folder(self, path, allow_pickle: bool = False):
        """The checked model folder `path` names (errors say what is missing): a Hugging Face folder here."""
        return resolve_model_path(path, allow_pickle)

    def load_processor(self, folder, trust_remote_code: bool = False):
        """What turns raw inputs into model inputs, from a model folder: its tokenizer here (an image task's
        normalisation); `encode` gets it, and the run saves it beside the weights (`save_pretrained`)."""
        return load_tokenizer(folder, trust_remote_code)

    def check_settings(self, cfg, ds, processor) -> None:
        """Settings that need the data and the processor (model.max_length against special tokens, ...)."""

    def encode(self, processor, examples, meta: dict) -> Encoded:
        """Examples -> `Encoded` model inputs, with the settings of `meta` (this task's strop.json fields), so a
        run's training and its predictions encode alike."""
        raise NotImplementedError

    def collate(self, enc: Encoded, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict:
        """A padded batch of the examples `idx` (model inputs plus `labels` where the split has them). `rng`
        draws what is random per batch (masks, augmentation); seeded by the loop so a resumed run is exact."""
        return collate_inputs(enc, idx)

    def check_encoded(self, enc: Encoded, examples, split: str, processor=None) -> None:
        """Refuse an encoded split that cannot train or score (e.g. a row with nothing left to learn); may show
        the user what training will see."""

    def training_rows(self, enc: Encoded, cfg) -> Encoded:
        """The training split as the loop batches it (generation may pack several examples per row)."""
        return enc

    def batch_weight(self, enc: Encoded, idx: np.ndarray) -> float:
        """What the loss of examples `idx` is averaged over: examples by default; the loop weights each
        micro-batch by its share, so accumulation and several processes equal one large batch."""
        return float(len(idx))

    def split_summary(self, ds, split: str, enc: Encoded) -> dict:
        """Task-specific fields of data.json for one split (label counts, windows, ...)."""
        return {}

    # -- model ----------------------------------------------------------------------------------------------------

    def build_model(self, cfg, labels: list[str]) -> nn.Module:
        raise NotImplementedError

    def load_model(self, folder, meta: dict, head: bool = True) -> nn.Module:
        """The model strop.json `meta` describes, with the weights in `folder`; head=False: the base model of an
        adapter (the adapter holds the head)."""
        raise NotImplementedError

    def num_outputs(self, labels: list[str]) -> int:
        """Width of the head's output for these labels."""
        return len(labels)

    def forward(self, model, batch: dict) -> torch.Tensor:
        """The logits `loss` reads: the model on the batch's model inputs (a task may compute fewer of them)."""
        return model(**{k: v for k, v in batch.items() if k in self.model_inputs}).logits

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean training loss of a batch (the loop averages over accumulation and processes)."""
        raise NotImplementedError

    # -- evaluation, metadata, prediction -------------------------------------------------------------------------

    def evaluate(self, model, enc: Encoded, labels: list[str], batch_size: int, device: torch.device,
                 precision: str = "fp32", threshold: float = 0.5, keep_outputs: bool = False):
        """(metrics with `loss`, kept outputs in input order or None) on a labelled split."""
        raise NotImplementedError

    def tunes_threshold_for(self, cfg, labels: list[str]) -> bool:
        """Whether this run's decision threshold is chosen on validation (`choose_threshold`) once it has trained."""
        return self.tunes_threshold

    def choose_threshold(self, probs: np.ndarray, labels: np.ndarray) -> float:
        """The decision threshold for validation outputs `probs` (evaluate's kept outputs) and their labels:
        micro-F1's best for thresholded outputs (multi-label)."""
        return tune_threshold(probs, labels)

    def final_evaluate(self, model, processor, enc: Encoded, labels: list[str], cfg, device: torch.device,
                       precision: str, threshold: float, generate: bool) -> dict:
        """The metrics of a split with the final weights (generate: this split is the one the run's final scores
        come from, for tasks that answer by generating)."""
        return self.evaluate(model, enc, labels, cfg.eval.batch_size, device, precision, threshold)[0]

    def meta(self, cfg, ds) -> dict:
        """What a finished model must remember to predict as it trained (strop.json, besides the common fields)."""
        return {"max_length": cfg.model.max_length}

    def predictor(self, model, processor, meta: dict, device: torch.device, precision: str = "fp32"):
        raise NotImplementedError

    def onnx_inputs(self, processor, meta: dict) -> OnnxInputs:
        """The inputs `strop export` traces the model with (names, examples, dynamic axes): token ids of
        (batch, sequence) up to strop.json's max_length here."""
        return text_inputs(processor, meta["max_length"])

    def agreement(self, a: np.ndarray, b: np.ndarray, threshold: float) -> float | None:
        """Share of examples (rows of the export's logits) two models predict alike; None where predictions are
        values (regression: the logit difference says it)."""
        return float((a.argmax(1) == b.argmax(1)).mean())

    def report_sections(self, predictor, examples, results: dict, split: str | None, errors_k: int,
                        explain_k: int) -> tuple[dict[str, str], dict]:
        """({section id: html}, extra results for report.json) of the task's own report sections; `examples`: the
        split the report looks at (test, else validation), None when the data are gone."""
        return {}, {}
