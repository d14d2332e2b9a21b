"""Models behind the server: the run's torch model or its ONNX export, both driven by strop.predict.Predictor.

The ONNX backend wraps an ONNX Runtime session in a parameter-free torch module that returns the same `.logits`
as the torch model, so tokenisation, batching and output formatting stay Predictor's (one code path, parity-tested).
Export folder layout (written by `strop export`): model.onnx (fp32; int64 inputs input_ids, attention_mask and
token_type_ids when the model uses them, dynamic batch/sequence axes, or float32 pixel_values with a dynamic
batch axis; output `logits`), model.int8.onnx, the processor files (tokenizer, or image normalisation) and
strop.json (the run's meta).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from strop.errors import ModelError, RunError
from strop.models.classifier import Output, read_meta
from strop.predict import Predictor
from strop.runs import open_run
from strop.tasks import get_task, load_predictor


class OnnxLogits(nn.Module):
    """An ONNX Runtime session as a torch module: forward(**the graph's inputs) (input_ids, attention_mask
    [, token_type_ids], or pixel_values; positionally in the graph's order too) -> Output(logits float32:
    (batch, num_labels), or (batch, sequence, num_labels) for token classification)."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]

    def forward(self, *args, **given) -> Output:
        given = {**dict(zip(self.input_names, args)), **given}
        if given.get("token_type_ids") is None and "input_ids" in given:  # single texts: segment ids all 0
            given["token_type_ids"] = torch.zeros_like(given["input_ids"])
        feed = {name: given[name].cpu().numpy() for name in self.input_names}
        (logits,) = self.session.run(["logits"], feed)
        return Output(torch.from_numpy(logits))


def find_export(path: Path) -> Path:
    """The export folder of a run folder (RUN/export) or the folder itself."""
    for folder in (path / "export", path):
        if (folder / "strop.json").is_file() and list(folder.glob("*.onnx")):
            return folder
    raise RunError(f"{path} holds no ONNX export (RUN/export/ with model.onnx and strop.json); run "
                   f"`strop export {path}` first, or serve it with --backend torch")


def run_batch(predictor, inputs: list, pairs: list[str] | None) -> list[dict]:
    """Outputs of one batch, in input order (the task's predictor decides what an input may be)."""
    return predictor.predict_inputs(inputs, pairs, batch_size=len(inputs))


def onnx_predictor(path: Path, onnx_file: str | None, threads: int) -> tuple[Predictor, Path]:
    """A Predictor whose model is an ONNX Runtime session over `onnx_file` of the export folder at `path`."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError("--backend onnx needs ONNX Runtime: pip install 'strop[serve]'") from None

    folder = find_export(path)
    name = onnx_file or ("model.int8.onnx" if (folder / "model.int8.onnx").is_file() else "model.onnx")
    file = folder / name
    if not file.is_file():
        raise ModelError(f"serve.onnx_file={name!r} not found in {folder}; it holds "
                         f"{sorted(p.name for p in folder.glob('*.onnx'))}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # idle pool threads would spin and take the event loop's core (as torch's OpenMP does, see cli.serve)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    if "logits" not in [o.name for o in session.get_outputs()]:
        raise ModelError(f"{file} has no output named 'logits' (outputs: {[o.name for o in session.get_outputs()]});"
                         " re-export it with `strop export`")
    meta = read_meta(folder)
    task = get_task(meta["task"])
    processor = task.load_processor(folder)  # saved beside the graph: tokenizer, image normalisation
    return task.predictor(OnnxLogits(session), processor, meta, torch.device("cpu")), file


@dataclass
class LoadedModel:
    """What the server serves: the predictor plus facts for /v1/model."""

    predictor: Predictor
    backend: str  # torch | onnx
    source: Path  # model folder or ONNX file
    version: str  # run name plus a short hash of the weights' identity
    config_hash: str  # sha256 of the run's config.yaml (or of strop.json when there is no config.yaml)
    load_seconds: float
    precision: str = "fp32"  # torch: fp32 or bf16; onnx: fp32 or int8 (by file)
    device: str = "cpu"  # where the model runs: cpu or cuda


def _config_hash(path: Path, model_folder: Path) -> str:
    for candidate in (path / "config.yaml", path.parent / "config.yaml", model_folder.parent / "config.yaml",
                      model_folder / "strop.json"):
        if candidate.is_file():
            return hashlib.sha256(candidate.read_bytes()).hexdigest()
    return ""


def served_meta(path: str | Path, backend: str) -> dict:
    """The strop.json of what `strop serve path` serves (the run's model or its export), without loading weights."""
    path = Path(path)
    return read_meta(find_export(path) if backend == "onnx" else open_run(path))


def check_target(path: str | Path, backend: str, onnx_file: str | None = None) -> None:
    """Fail before the server starts when there is nothing to serve, or nothing it can serve (the loading itself
    runs in the background)."""
    task = get_task(served_meta(path, backend)["task"])
    if task.serve_refusal:
        raise ModelError(f"cannot serve {path}: {task.serve_refusal}")
    if backend == "onnx" and onnx_file:
        folder = find_export(Path(path))
        if not (folder / onnx_file).is_file():
            raise ModelError(f"serve.onnx_file={onnx_file!r} not found in {folder}; it holds "
                             f"{sorted(p.name for p in folder.glob('*.onnx'))}")


def run_name(folder: Path) -> str:
    """The name of the run a model (or export) folder belongs to: runs/<name>/model -> <name>."""
    return (folder.parent if folder.name in ("model", "export") else folder).name


def load_model_for_serving(path: str | Path, backend: str = "torch", onnx_file: str | None = None,
                           threads: int = 0, precision: str = "fp32", device: str = "cpu") -> LoadedModel:
    """Load a run folder (or its model/ folder, or an export folder) for serving; only safetensors/ONNX load.
    precision (torch backend): fp32, bf16 (autocast with the Linear weights stored in bf16) or auto.
    device (torch backend): cpu, cuda or auto; the onnx backend runs on the CPU."""
    from strop.device import bf16_linear_weights, resolve_device, resolve_precision

    path = Path(path)
    start = time.perf_counter()
    if backend == "onnx":
        predictor, source = onnx_predictor(path, onnx_file, threads)
        identity = f"{source.name}:{source.stat().st_size}:{source.stat().st_mtime_ns}"
        folder = source.parent
        precision = "int8" if "int8" in source.name else "fp32"
    else:
        if threads:
            torch.set_num_threads(threads)
        folder = open_run(path)
        where = resolve_device(device, "serve.device")
        precision = resolve_precision(precision, where)
        predictor = load_predictor(folder, device=str(where), precision=precision)
        if precision == "bf16":
            bf16_linear_weights(predictor.model)
        source = folder
        weights = sorted(folder.glob("*.safetensors"))
        identity = json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights])
    version = f"{run_name(folder)}@{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    return LoadedModel(predictor, backend, source, version, _config_hash(path, folder),
                       time.perf_counter() - start, precision, predictor.device.type)
