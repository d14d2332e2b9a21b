"""ONNX export (dynamic batch and sequence axes) and an ONNX Runtime model that plugs into strop's evaluation.

`OnnxModel` behaves like the PyTorch classifiers where strop uses them (`model(**inputs).logits`, `.eval()`,
`.train()`, `.to()`), so `evaluate`, `batched_logits` and `Predictor` run an exported model unchanged.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from strop.errors import ExportError
from strop.models.classifier import Output
from strop.models.cls_only import first_token_only

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 18


def onnxruntime():
    """The onnxruntime module, or an error that says how to install it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("ONNX export needs onnx, onnxruntime and onnxscript: pip install 'strop[onnx]'") from None
    return ort


class LogitsOnly(nn.Module):
    """Wraps a classifier so the traced graph takes tensors and returns only logits: (batch, num_labels), or
    (batch, sequence, num_labels) for a token classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def input_names_for(tokenizer) -> tuple[str, ...]:
    """ONNX inputs: input_ids, attention_mask, and token_type_ids when the model's tokenizer produces them."""
    names = getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"]
    return tuple(n for n in INPUTS if n in names or n != "token_type_ids")


def example_inputs(tokenizer, names: tuple[str, ...], max_length: int = 512) -> tuple[torch.Tensor, ...]:
    """Padded example texts, (batch, sequence) each, with 2 <= sequence <= max_length (the traced length must fit
    the sequence axis's range) and batch != sequence, so the exporter keeps both axes dynamic and apart."""
    texts = ["an example text to trace the model with", "a short one"]
    length = max(2, max_length)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
    if enc["input_ids"].shape[1] == len(texts):  # e.g. max_length 2: a third text makes the batch axis differ
        enc = tokenizer(texts + ["one more"], padding=True, truncation=True, max_length=length, return_tensors="pt")
    return tuple(enc[n] if n in enc else torch.zeros_like(enc["input_ids"]) for n in names)


def export_onnx(model: nn.Module, tokenizer, path: Path, max_length: int = 512) -> tuple[str, ...]:
    """Write `model` to `path` as ONNX (fp32): int64 inputs with axes (batch, sequence), output `logits`.

    Uses torch's torch.export-based exporter (`dynamo=True`, torch's default since 2.9): the TorchScript tracer gives
    logits off by ~1e-2 on padded batches with transformers 5's masking code. Returns the input names.
    """
    onnxruntime()
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError:
        raise ExportError("ONNX export needs onnxscript: pip install 'strop[onnx]'") from None
    names = input_names_for(tokenizer)
    wrapper = LogitsOnly(model.eval())
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=1, max=max(2, max_length))
    path.parent.mkdir(parents=True, exist_ok=True)
    # the exporter logs one line per torchvision op it skips and per pass; the parity check is what users need
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        # a first-token classifier's last layer computes position 0 only in the graph too (models/cls_only.py)
        with warnings.catch_warnings(), torch.no_grad(), first_token_only(model):
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, example_inputs(tokenizer, names, max_length), str(path),
                              input_names=list(names), output_names=["logits"],
                              dynamic_shapes={n: {0: batch, 1: seq} for n in names}, dynamo=True,
                              external_data=False, opset_version=OPSET, verbose=False)
    except Exception as e:  # the exporter raises many types; all mean this architecture did not export
        arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ExportError(f"architecture {arch!r} could not be exported to ONNX by torch {torch.__version__} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); export supports the encoders "
                          "torch.export can trace (BERT, RoBERTa, DistilBERT, ELECTRA, ...)") from None
    return names


class OnnxModel:
    """An ONNX Runtime session with the calling convention of strop's PyTorch classifiers.

    model(input_ids=..., attention_mask=..., token_type_ids=...) -> Output with logits (batch, num_labels) float32
    ((batch, sequence, num_labels) for token classification).
    """

    def __init__(self, path: str | Path, threads: int = 0):
        ort = onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"{path} not found; export the run first: strop export RUN")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads() or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # ORT warns about unused initializers after quantisation: noise for users
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ExportError(f"onnxruntime cannot load {path} ({e}); export the run again") from None
        self.path = path
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.training = False

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> Output:
        feed = {"input_ids": _numpy(input_ids), "attention_mask": _numpy(attention_mask)}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = _numpy(token_type_ids) if token_type_ids is not None else \
                np.zeros_like(feed["input_ids"])
        return Output(torch.from_numpy(self.session.run(["logits"], feed)[0]))

    def eval(self) -> OnnxModel:
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        return self  # an inference session has no training mode

    def to(self, device) -> OnnxModel:
        if torch.device(device).type != "cpu":
            raise ExportError("the ONNX model runs on CPU with onnxruntime; use device=cpu")
        return self


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.int64, copy=False)


def export_file_of(path: str | Path) -> Path | None:
    """The ONNX file to run for `path` (an export folder -> its model.onnx, or an .onnx file in one); None when
    `path` is not an export."""
    path = Path(path)
    if path.suffix == ".onnx" and path.is_file():
        return path
    if path.is_dir() and (path / "model.onnx").is_file():
        return path / "model.onnx"
    return None


def load_export(onnx_path: Path, threads: int = 0) -> tuple[OnnxModel, object, dict]:
    """(OnnxModel, tokenizer, meta) of an export folder written by `strop export`."""
    from strop.models.backbone import load_tokenizer
    from strop.models.classifier import read_meta

    folder = onnx_path.parent
    meta = read_meta(folder)
    if "onnx" not in meta:
        raise ExportError(f"{folder / 'strop.json'} has no 'onnx' entry; it was not written by strop export. "
                          "Export the run again: strop export RUN")
    return OnnxModel(onnx_path, threads), load_tokenizer(folder), meta
