"""ONNX export (a dynamic batch axis, and a dynamic sequence axis for texts) and an ONNX Runtime model that
plugs into strop's evaluation.

`export_graph` traces any model that takes named tensors and returns `.logits`; what the inputs are (names,
an example of each, which axes vary) is the task's (`Task.onnx_inputs`: `text_inputs` for token ids,
`image_inputs` for pixels). `OnnxModel` behaves like the PyTorch models where strop uses them
(`model(**inputs).logits`, `.eval()`, `.train()`, `.to()`), so `evaluate`, `batched_logits` and the
predictors run an exported model unchanged.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from strop.errors import ExportError
from strop.models.classifier import Output
from strop.models.cls_only import first_token_only

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 18
# ONNX Runtime's names of input element types -> what numpy arrays fed to them must hold
ONNX_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}


def onnxruntime():
    """The onnxruntime module, or an error that says how to install it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("ONNX export needs onnx, onnxruntime and onnxscript: pip install 'strop[onnx]'") from None
    return ort


@dataclass
class OnnxInputs:
    """What an export traces the model with: an example tensor per input name (in the graph's input order)
    and the axes of each that vary at run time ({axis index: torch.export.Dim}); every other axis is fixed to
    the example's size."""

    example: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, object]]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.example)

    def axis_names(self) -> list[str]:
        """Names of the dynamic axes, in order of first appearance (strop.json's `dynamic_axes`)."""
        seen: list[str] = []
        for axes in self.dynamic.values():
            seen += [d.__name__ for d in axes.values() if d.__name__ not in seen]
        return seen


class LogitsOnly(nn.Module):
    """Wraps a model so the traced graph takes the tensors `names` (positionally, in that order) and returns
    only logits: (batch, num_labels), or (batch, sequence, num_labels) for a token classifier."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).logits


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


def text_inputs(tokenizer, max_length: int = 512) -> OnnxInputs:
    """int64 token inputs (input_names_for) with axes (batch, sequence), sequence up to max_length."""
    names = input_names_for(tokenizer)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=1, max=max(2, max_length))
    return OnnxInputs(dict(zip(names, example_inputs(tokenizer, names, max_length))),
                      {n: {0: batch, 1: seq} for n in names})


def image_inputs(size: int, channels: int = 3) -> OnnxInputs:
    """float32 `pixel_values` (batch, channels, size, size), normalised as training batches are. Only the
    batch axis varies: predictors resize every image to the run's size, so no other size reaches the graph,
    and fixed sizes let the exporter turn the "SAME" padding of strided convolutions into constants."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    return OnnxInputs({"pixel_values": torch.zeros(2, channels, size, size)}, {"pixel_values": {0: batch}})


def export_onnx(model: nn.Module, tokenizer, path: Path, max_length: int = 512) -> tuple[str, ...]:
    """A text model to ONNX (fp32): int64 inputs with axes (batch, sequence), output `logits`. Returns the
    input names."""
    return export_graph(model, text_inputs(tokenizer, max_length), path)


def export_graph(model: nn.Module, inputs: OnnxInputs, path: Path) -> tuple[str, ...]:
    """Write `model` to `path` as ONNX (fp32): the inputs `inputs` names, with its dynamic axes; output
    `logits`.

    Uses torch's torch.export-based exporter (`dynamo=True`, torch's default since 2.9): the TorchScript tracer gives
    logits off by ~1e-2 on padded batches with transformers 5's masking code. Returns the input names.
    """
    onnxruntime()
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError:
        raise ExportError("ONNX export needs onnxscript: pip install 'strop[onnx]'") from None
    names = inputs.names
    wrapper = LogitsOnly(model.eval(), names)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the exporter logs one line per torchvision op it skips and per pass; the parity check is what users need
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        # a first-token classifier's last layer computes position 0 only in the graph too (models/cls_only.py)
        with warnings.catch_warnings(), torch.no_grad(), first_token_only(model):
            warnings.simplefilter("ignore")
            # LogitsOnly takes *inputs, so torch.export wants the dynamic axes under that parameter's name
            dynamic = {"inputs": tuple(inputs.dynamic.get(n, {}) for n in names)}
            torch.onnx.export(wrapper, tuple(inputs.example.values()), str(path), input_names=list(names),
                              output_names=["logits"], dynamic_shapes=dynamic, dynamo=True,
                              external_data=False, opset_version=OPSET, verbose=False)
    except Exception as e:  # the exporter raises many types; all mean this architecture did not export
        arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ExportError(f"architecture {arch!r} could not be exported to ONNX by torch {torch.__version__} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); export supports the "
                          "models torch.export can trace (BERT, RoBERTa, DistilBERT, ELECTRA, "
                          "EfficientNet-Lite, ...)") from None
    return names


class OnnxModel:
    """An ONNX Runtime session with the calling convention of strop's PyTorch models.

    model(**inputs) -> Output with logits float32: (batch, num_labels), or (batch, sequence, num_labels) for
    token classification. `inputs` are the graph's input tensors by name, or positionally in the graph's
    order (input_ids, attention_mask, token_type_ids: (batch, sequence) integers; pixel_values:
    (batch, channels, H, W) floats), each passed to ONNX Runtime in the graph's dtype.
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
        self.input_dtypes = {i.name: ONNX_DTYPES.get(i.type, np.float32)
                             for i in self.session.get_inputs()}
        self.training = False

    def __call__(self, *args: torch.Tensor | None, **inputs: torch.Tensor | None) -> Output:
        inputs = {**dict(zip(self.input_names, args)), **inputs}  # positional: the graph's inputs in order
        feed = {}
        for name in self.input_names:
            if inputs.get(name) is not None:
                feed[name] = inputs[name].detach().cpu().numpy().astype(self.input_dtypes[name], copy=False)
            elif name == "token_type_ids" and "input_ids" in feed:  # single texts: every segment id is 0
                feed[name] = np.zeros_like(feed["input_ids"])
            else:
                raise ExportError(f"{self.path} takes {self.input_names}; got {sorted(inputs)} "
                                  f"(no {name!r})")
        return Output(torch.from_numpy(self.session.run(["logits"], feed)[0]))

    def eval(self) -> OnnxModel:
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        return self  # an inference session has no training mode

    def to(self, device) -> OnnxModel:
        if torch.device(device).type != "cpu":
            raise ExportError("the ONNX model runs on CPU with onnxruntime; use device=cpu")
        return self


def export_file_of(path: str | Path) -> Path | None:
    """The ONNX file to run for `path` (an export folder -> its model.onnx, or an .onnx file in one); None when
    `path` is not an export."""
    path = Path(path)
    if path.suffix == ".onnx" and path.is_file():
        return path
    if path.is_dir() and (path / "model.onnx").is_file():
        return path / "model.onnx"
    return None


def load_export(onnx_path: Path, threads: int = 0) -> tuple[OnnxModel, dict]:
    """(OnnxModel, meta) of an export folder written by `strop export`; the processor saved beside it
    (tokenizer, image normalisation) is the task's to load (`Task.load_processor`)."""
    from strop.models.classifier import read_meta

    folder = onnx_path.parent
    meta = read_meta(folder)
    if "onnx" not in meta:
        raise ExportError(f"{folder / 'strop.json'} has no 'onnx' entry; it was not written by strop export. "
                          "Export the run again: strop export RUN")
    return OnnxModel(onnx_path, threads), meta
