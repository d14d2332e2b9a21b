"""`strop export RUN`: the run's model -> RUN/export/ (ONNX fp32 + int8, tokenizer, strop.json, parity.json), plus
optional pruned and distilled variants; every artifact is measured against the original on held data.

RUN/export/ (a contract with `strop serve`, which loads it with onnxruntime):
  model.onnx        fp32; the inputs the task names (`Task.onnx_inputs`): int64 input_ids, attention_mask
                    (+ token_type_ids when the tokenizer makes them), axes (batch, sequence), or float32
                    pixel_values (batch, 3, size, size) of images normalised as in training; output
                    `logits` (batch, num_labels), or (batch, sequence, num_labels) for token classification
                    (parity then compares every real subword's logits)
  model.int8.onnx   ONNX Runtime dynamic int8 (transformers), or static int8 calibrated on training inputs
                    (image classifiers: the task's `export.int8`)
  processor files   as saved by the run's tokenizer (or image processor: the normalisation)
  strop.json        the run's meta plus an "onnx" entry: files, input names and dynamic axes
  parity.json       ONNX vs PyTorch on held data, and quality/size/speed of every variant
  pruned/, student/ optional: model folders (strop.json inside) of the pruned and distilled models
Options are all checked first (options.py). The folder is written as export.tmp/, removed on any failure, and
swapped in for export/ at the end (folders.py); a parity failure leaves export.failed/ to inspect.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from strop.compress.folders import replace_folder, tidy_leftovers
from strop.compress.generation_export import export_generation
from strop.compress.onnx import OnnxModel, export_graph
from strop.compress.options import ExportOptions, check_options, check_options_for_model
from strop.compress.timing import latency_ms, throughput
from strop.data.batching import INPUT_NAMES, Encoded, collate_inputs
from strop.errors import ExportError, RunError, StropError
from strop.evaluate.evaluator import batched_logits
from strop.models.classifier import META_FILE, save_model
from strop.tasks import Task, get_task, load_trained
from strop.tasks import prepare as prepare_task_data

CPU = torch.device("cpu")


def run_model_dir(run: str | Path) -> Path:
    """RUN/model of a finished run; errors say when the run is missing or unfinished."""
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"{run} not found; give a run folder (runs/<name>) written by strop train")
    if run.name == "model" and (run / META_FILE).is_file():
        run = run.parent
    model = run / "model"
    if not (model / META_FILE).is_file():
        state = "has a config.yaml but no model/strop.json: training did not finish" if (run / "config.yaml").is_file() \
            else "is not a strop run folder (no config.yaml, no model/)"
        raise RunError(f"cannot export {run}: it {state}. Finish it (strop train --resume {run}) or give a "
                       "finished run")
    if not (model / "config.json").is_file() or not any(model.glob("*.safetensors")):
        raise RunError(f"cannot export {run}: model/ is incomplete (config.json or *.safetensors missing); "
                       "train the run again")
    return model


def _data(run: Path, meta: dict, processor, opts: ExportOptions, need_train: tuple[str, str] | None):
    """(held Encoded, where it came from, train Encoded or None, train Examples or None); subword windows for
    token classification. need_train: (what needs the training split, how to export without it), or None."""
    task = get_task(meta["task"])
    held = source = None
    if opts.data:
        held, source = _held_file(opts.data, meta, processor), str(opts.data)
    if held is not None and not need_train:
        return held, source, None, None
    ds = _run_data(run, need_train)
    if held is None:
        split = "validation" if "validation" in ds.splits else "test" if "test" in ds.splits else None
        if split is None:
            raise ExportError(f"{run} has no validation or test split to check the export on; pass --data FILE")
        held, source = task.encode(processor, ds.splits[split], meta), f"{split} split of {run}/config.yaml"
    if not need_train:
        return held, source, None, None
    return held, source, task.encode(processor, ds.splits["train"], meta), ds.splits["train"]


def _run_data(run: Path, need_train: tuple[str, str] | None):
    """The Dataset the run's config.yaml names; errors say what needed it and how to do without."""
    from strop.config import load_config

    where = "run from the folder the run was trained in"
    if need_train:
        what, without = need_train
        why, fix = f"{what} needs the run's training data", f"{where}, or {without}"
    else:
        why, fix = "the export is checked on its validation data", f"{where}, or pass --data FILE (labelled)"
    if not (run / "config.yaml").is_file():
        raise RunError(f"{run} has no config.yaml, so its data is unknown and {why}; {fix}")
    try:
        return prepare_task_data(load_config(run / "config.yaml"))
    except StropError as e:
        raise type(e)(f"{e} (reading the data named in {run / 'config.yaml'}: {why}; {fix})") from None


def train_need(opts: ExportOptions, task: Task) -> tuple[str, str] | None:
    """(what needs the run's training split, how to export without it), or None when nothing does."""
    if opts.distill > 0:
        return "--distill (training the student)", "drop --distill"
    if opts.prune is not None and opts.recover_epochs > 0:
        return "--recover-epochs (fine-tuning the pruned model)", "drop --recover-epochs"
    if opts.static_int8 and task.export.int8 != "static":
        return "--static-int8 (calibration)", "drop --static-int8"
    if opts.int8 and task.export.int8 == "static":
        return (f"int8 export (static: activation ranges calibrated on {opts.calibration_size} training "
                "examples)"), "export the fp32 model alone with --no-int8"
    return None


def _held_file(path: str, meta: dict, tokenizer) -> Encoded:
    """A labelled file encoded as the run's predictor encodes it (classification rows or NER windows)."""
    task = get_task(meta["task"])
    return task.predictor(torch.nn.Identity(), tokenizer, meta, CPU).labelled_encoding(path)


def per_token(task: Task) -> bool:
    """Whether the task's exported logits have a sequence axis (an output per token)."""
    return "sequence" in task.export.output_axes


def logits_of(model, enc: Encoded, batch_size: int = 64, per_token: bool = False, collate=collate_inputs,
              inputs: tuple[str, ...] = INPUT_NAMES) -> np.ndarray:
    """Logits in input order: (n, num_labels) float32 for one output per example; per_token: the logits of every
    real (unpadded) subword of every window, windows in input order: (total tokens, num_labels). `collate`
    and `inputs`: the task's batches and model inputs (token ids by default)."""
    rows: list = [None] * len(enc)
    for idx, logits, _ in batched_logits(model, enc, batch_size, CPU, collate=collate, inputs=inputs):
        for row, i in enumerate(idx):
            rows[i] = logits[row, :enc.lengths[i]].numpy() if per_token else logits[row].numpy()
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(rows) if per_token else np.stack(rows)


def task_logits(model, enc: Encoded, task: Task) -> np.ndarray:
    """`logits_of` with the task's batches, inputs and output axes."""
    return logits_of(model, enc, per_token=per_token(task), collate=task.collate, inputs=task.model_inputs)


def file_mb(*paths: Path) -> float:
    return round(sum(p.stat().st_size for p in paths) / 2**20, 2)


def torch_size_mb(model) -> float:
    """Size of the model's state dict as torch.save writes it (int8 packed weights included)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.pt"
        torch.save(model.state_dict(), path)
        return file_mb(path)


class Report:
    """Collects the measurements of each variant (quality, size, speed, agreement with the original)."""

    def __init__(self, held: Encoded, meta: dict, reference: np.ndarray, opts: ExportOptions):
        self.held, self.meta, self.reference, self.opts = held, meta, reference, opts
        self.task = get_task(meta["task"])
        self.metric = self.task.primary_metric
        self.variants: dict[str, dict] = {}

    def add(self, name: str, model, size_mb: float, **extra) -> dict:
        m = self.meta
        metrics, _ = self.task.evaluate(model, self.held, m["labels"], 64, CPU, "fp32", m.get("threshold", 0.5))
        logits = task_logits(model, self.held, self.task)
        entry = {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                 self.metric: metrics[self.metric], "size_mb": size_mb,
                 "max_abs_logit_diff": float(np.abs(logits - self.reference).max()),
                 "agreement": self.task.agreement(logits, self.reference, m.get("threshold", 0.5)), **extra}
        if self.opts.timing:
            batches = {"collate": self.task.collate, "inputs": self.task.model_inputs}
            lat = latency_ms(model, self.held, self.opts.timing_examples, **batches)
            speed = throughput(model, self.held, 32, 4 * self.opts.timing_examples, **batches)
            entry.update(latency_ms_p50=lat["p50"], latency_ms_p95=lat["p95"], throughput_bs32=speed)
        self.variants[name] = entry
        return entry

    def ratios(self) -> None:
        """Each variant's quality change (the primary metric's, and every metric's in `metric_changes`) and
        speed-up relative to the PyTorch fp32 original."""
        base = self.variants["torch_fp32"]
        for entry in self.variants.values():
            entry[f"{self.metric}_change"] = entry[self.metric] - base[self.metric]
            entry["metric_changes"] = {k: v - base["metrics"][k] for k, v in entry["metrics"].items()
                                       if isinstance(v, float) and k in base["metrics"]}  # not counts (n)
            entry["size_ratio"] = entry["size_mb"] / base["size_mb"]
            if "latency_ms_p50" in entry:
                entry["latency_p50_ratio"] = entry["latency_ms_p50"] / base["latency_ms_p50"]
                entry["throughput_ratio"] = entry["throughput_bs32"] / base["throughput_bs32"]


def export_run(run: str | Path, opts: ExportOptions | None = None, log=print) -> dict:
    """Export and compress a finished run into RUN/export/; returns what parity.json holds.

    Every option is checked before anything is written. The export is built in RUN/export.tmp/, which any failure
    removes, and swapped in for RUN/export/ only once complete. Raises ExportError when the ONNX model's logits
    differ from PyTorch's by more than opts.tolerance (RUN/export.failed/parity.json then says by how much).
    """
    opts = opts or ExportOptions()
    check_options(opts)
    model_dir = run_model_dir(run)
    run_dir = model_dir.parent
    tidy_leftovers(run_dir, log)
    teacher, tokenizer, meta, task = load_trained(model_dir)
    if task.export is None and task.generates:
        return _export_generation(run_dir, model_dir, opts, log)
    if task.export is None:
        raise ExportError(f"cannot export {run_dir}: {task.export_refusal}")
    check_options_for_model(opts, teacher, meta, task, run_dir)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    held, source, train_enc, train_examples = _data(run_dir, meta, tokenizer, opts, train_need(opts, task))
    log(f"checking on {len(held)} held examples ({source})")

    tmp, final = run_dir / "export.tmp", run_dir / "export"
    shutil.rmtree(run_dir / "export.failed", ignore_errors=True)
    tmp.mkdir()
    try:
        parity = _export_into(tmp, run_dir, model_dir, teacher, tokenizer, meta, held, source, train_enc,
                              train_examples, opts, log)
        replace_folder(tmp, final)
    except BaseException:  # Ctrl-C included: leave no half-written export.tmp/ behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {final}")
    return parity


def _export_generation(run_dir: Path, model_dir: Path, opts: ExportOptions, log) -> dict:
    """A generation run's GGUF export (generation_export.py), held prompts from its data when they are readable."""
    from strop.config import load_config

    if opts.prune or opts.distill or opts.static_int8:
        raise ExportError("--prune, --distill and --static-int8 apply to classifiers; a generation run exports a GGUF "
                          "file (--gguf f16 or q8_0)")
    try:
        ds = prepare_task_data(load_config(run_dir / "config.yaml"))
        examples = ds.splits.get("validation") or ds.splits.get("test")
    except (StropError, OSError):
        examples = None  # the data moved: the check uses generic prompts
    return export_generation(run_dir, model_dir, examples, opts.gguf, log)


def _export_into(tmp: Path, run_dir: Path, model_dir: Path, teacher, tokenizer, meta: dict, held: Encoded,
                 source: str, train_enc, train_examples, opts: ExportOptions, log) -> dict:
    """Write every file of the export into `tmp`; returns parity.json's content. A parity failure moves `tmp` to
    RUN/export.failed/ and raises ExportError."""
    started = time.perf_counter()
    task = get_task(meta["task"])
    reference = task_logits(teacher, held, task)
    report = Report(held, meta, reference, opts)
    parity = {"run": str(run_dir), "task": meta["task"], "held_data": {"source": source, "examples": len(held)},
              "adapter": adapter_entry(meta), "tolerance": opts.tolerance,
              "primary_metric": report.metric, "threads": torch.get_num_threads()}

    log("exporting ONNX (fp32) ...")
    inputs = task.onnx_inputs(tokenizer, meta)
    names = export_graph(teacher, inputs, tmp / "model.onnx")
    onnx_fp32 = OnnxModel(tmp / "model.onnx", opts.threads)
    exported = task_logits(onnx_fp32, held, task)
    diff = np.abs(exported - reference)
    parity["onnx"] = {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
                      "prediction_agreement": task.agreement(exported, reference, meta.get("threshold", 0.5)),
                      "passed": bool(diff.max() <= opts.tolerance)}
    if not parity["onnx"]["passed"]:
        failed = run_dir / "export.failed"
        _write_json(tmp / "parity.json", parity)
        tmp.rename(failed)
        raise ExportError(f"ONNX export of {run_dir} disagrees with PyTorch: max |logit difference| "
                          f"{diff.max():.3g} > tolerance {opts.tolerance:g} on {len(held)} held examples; nothing "
                          f"was exported (see {failed / 'parity.json'}). Raise --tolerance only if the difference "
                          "is acceptable")
    log(f"ONNX parity: max |logit diff| {diff.max():.2e}, agreement {parity['onnx']['prediction_agreement']}")

    report.add("torch_fp32", teacher, file_mb(*model_dir.glob("*.safetensors")))
    report.add("onnx_fp32", onnx_fp32, file_mb(tmp / "model.onnx"))
    files = {"fp32": "model.onnx"}
    if opts.int8:
        files.update(_int8_variants(report, teacher, tmp, names, train_enc, opts, log))
    if opts.prune:
        _pruned_variant(report, teacher, tokenizer, meta, tmp, train_enc, run_dir, opts, log)
    if opts.distill:
        if opts.distill_augment:
            from strop.compress.distill import augment, concat

            extra = augment(train_examples, opts.distill_augment, 0, tokenizer.mask_token)
            log(f"distillation data: {len(train_examples)} training examples + {len(extra)} augmented copies "
                "(teacher labels only)")
            train_enc = task.encode(tokenizer, concat(train_examples, extra), meta)
        _student_variant(report, teacher, tokenizer, meta, tmp, train_enc, run_dir, opts, log)
    report.ratios()
    parity["variants"] = report.variants
    parity["seconds"] = round(time.perf_counter() - started, 1)

    tokenizer.save_pretrained(str(tmp))
    _write_json(tmp / META_FILE, {**meta, "onnx": {"files": files, "inputs": list(names), "output": "logits",
                                                   "opset": _opset(tmp / "model.onnx"),
                                                   "dynamic_axes": inputs.axis_names()},
                                  "source_run": str(run_dir), "adapter_merged": parity["adapter"]["merged"]})
    _write_json(tmp / "parity.json", parity)
    return parity


def adapter_entry(meta: dict) -> dict:
    """parity.json's account of the run's adapter: whether it had one, and whether RUN/model (what is exported)
    holds it merged into the base."""
    method = (meta.get("peft") or {}).get("method", "none")
    if method in ("lora", "adalora"):
        return {"present": True, "merged": True,
                "note": f"{method} adapter: RUN/model holds it merged into the base (the unmerged adapter is in "
                        "RUN/adapter/); the export is of that merged model"}
    if method == "adapter":
        return {"present": True, "merged": False,
                "note": "bottleneck adapters (non-linear, so they cannot be merged): RUN/model holds the base plus "
                        "the unmerged adapters (adapters.safetensors), and the ONNX graphs include them"}
    return {"present": False, "merged": False,
            "note": f"no adapter (peft.method={method}): the export is of RUN/model as trained"}


def _int8_variants(report: Report, teacher, tmp: Path, names, train_enc, opts: ExportOptions, log) -> dict:
    from strop.compress.quantize import (
        quantize_onnx_dynamic,
        quantize_onnx_static,
        torch_dynamic_int8,
    )

    if report.task.export.int8 == "static":
        return _static_int8(report, tmp, names, train_enc, opts, log)
    log("quantising: ONNX Runtime dynamic int8 ...")
    settings = quantize_onnx_dynamic(tmp / "model.onnx", tmp / "model.int8.onnx")
    report.add("onnx_int8", OnnxModel(tmp / "model.int8.onnx", opts.threads), file_mb(tmp / "model.int8.onnx"),
               quantization=settings)
    files = {"int8": "model.int8.onnx"}
    if opts.static_int8:
        log(f"quantising: ONNX Runtime static int8 (calibration: {opts.calibration_size} training examples) ...")
        quantize_onnx_static(tmp / "model.onnx", tmp / "model.static-int8.onnx", train_enc, list(names),
                             opts.calibration_size)
        report.add("onnx_static_int8", OnnxModel(tmp / "model.static-int8.onnx", opts.threads),
                   file_mb(tmp / "model.static-int8.onnx"), calibration_examples=opts.calibration_size)
        files["static_int8"] = "model.static-int8.onnx"
    log("quantising: PyTorch dynamic int8 ...")
    q = torch_dynamic_int8(teacher)
    report.add("torch_int8", q, torch_size_mb(q), note="not saved: PyTorch int8 modules do not load with "
               "from_pretrained; measured for comparison")
    return files


def _static_int8(report: Report, tmp: Path, names, train_enc, opts: ExportOptions, log) -> dict:
    """model.int8.onnx of a task whose int8 is static (CNNs): weights and activations in int8, activation
    ranges from training inputs batched as evaluation batches them (normalised, not augmented). No PyTorch
    int8 variant: torch's dynamic int8 covers nn.Linear only, a CNN's head alone."""
    from strop.compress.quantize import STATIC_INT8_CONV, quantize_onnx_static

    n = min(opts.calibration_size, len(train_enc))
    log(f"quantising: ONNX Runtime static int8 (QDQ; calibration: {n} training examples) ...")
    path = tmp / "model.int8.onnx"
    settings = quantize_onnx_static(tmp / "model.onnx", path, train_enc, list(names), opts.calibration_size,
                                    collate=report.task.collate, settings=STATIC_INT8_CONV)
    report.add("onnx_int8", OnnxModel(path, opts.threads), file_mb(path), quantization=settings)
    return {"int8": "model.int8.onnx"}


def _variant_cfg(run_dir: Path, epochs: float, lr: float | None):
    """The run's config for a short extra training (recovery / distillation): no checkpoints, no TensorBoard."""
    from strop.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    cfg.train.epochs, cfg.train.max_steps, cfg.train.save_every, cfg.track = epochs, -1, -1, []
    cfg.train.early_stopping_patience = 0
    if lr is not None:
        cfg.train.lr = lr
    return cfg


def _train_variant(model, train_enc: Encoded, held: Encoded, meta: dict, cfg, work: Path, loss_fn=None) -> dict:
    """Fine-tune `model` in place with strop's loop; metrics.jsonl goes to `work`. Returns the fit summary."""
    from strop.device import resolve_precision
    from strop.track import Trackers
    from strop.training.loop import fit

    work.mkdir(parents=True, exist_ok=True)
    task = get_task(meta["task"])
    precision = resolve_precision(cfg.train.precision, CPU)
    metric = task.primary_metric if cfg.train.metric == "auto" else cfg.train.metric
    tracker = Trackers(work, [])
    try:
        result = fit(model, train_enc, held, cfg, task, meta["labels"], CPU, precision, tracker, metric,
                     work, loss_fn=loss_fn)
    finally:
        tracker.close()
    model.eval()
    return {"steps": result.state.step, "epochs": cfg.train.epochs, "lr": cfg.train.lr,
            "train_seconds": round(result.train_seconds, 1), "precision": precision,
            "best_step": result.state.best_step}


def _pruned_variant(report: Report, teacher, tokenizer, meta, tmp: Path, train_enc, run_dir, opts, log) -> None:
    import copy

    from strop.compress.prune import (
        magnitude_prune,
        parameter_count,
        prune_ffn,
        prune_heads,
        sparsity_of,
    )

    model, info = copy.deepcopy(teacher), {"spec": opts.prune, "parameters_before": parameter_count(teacher)}
    if "heads" in opts.prune:
        info["attention_heads_kept"] = prune_heads(model, opts.prune["heads"])
    if "ffn" in opts.prune:
        info["ffn_neurons_kept"] = prune_ffn(model, opts.prune["ffn"])
    if "magnitude" in opts.prune:
        info["sparsity"] = magnitude_prune(model, opts.prune["magnitude"])
        info["note"] = "magnitude pruning zeroes weights but keeps matrices dense: no speed or disk gain"
    log(f"pruned: {info}")
    if opts.recover_epochs > 0:
        cfg = _variant_cfg(run_dir, opts.recover_epochs, opts.lr)
        log(f"recovery fine-tune: {opts.recover_epochs} epoch(s) ...")
        mask = _zero_masks(model) if "magnitude" in opts.prune else None
        info["recovery"] = _train_variant(model, train_enc, report.held, meta, cfg, tmp / "pruned-train")
        if mask is not None:  # keep pruned weights at zero: re-apply the mask after the fine-tune
            _apply_masks(model, mask)
            info["sparsity_after_recovery"] = sparsity_of(model)
    info["parameters_after"] = parameter_count(model)
    folder = tmp / "pruned"
    extra = {"attention_heads_kept": info["attention_heads_kept"]} if "attention_heads_kept" in info else {}
    save_model(model, tokenizer, folder, {**meta, "pruning": opts.prune, **extra})
    report.add("pruned", model, file_mb(*folder.glob("*.safetensors")), pruning=info)


def _zero_masks(model) -> dict:
    from strop.compress.prune import linear_layers

    return {id(m): m.weight != 0 for m in linear_layers(model)}


@torch.no_grad()
def _apply_masks(model, masks: dict) -> None:
    from strop.compress.prune import linear_layers

    for m in linear_layers(model):
        m.weight.mul_(masks[id(m)])


def _student_variant(report: Report, teacher, tokenizer, meta, tmp: Path, train_enc, run_dir, opts, log) -> None:
    from strop.compress.distill import distillation_loss, kept_layers, make_student
    from strop.compress.prune import encoder_layers, parameter_count
    from strop.device import resolve_precision

    n_teacher = len(encoder_layers(teacher))
    student = make_student(teacher, opts.distill)
    cfg = _variant_cfg(run_dir, opts.distill_epochs, opts.lr)
    precision = resolve_precision(cfg.train.precision, CPU)
    log(f"distilling a {opts.distill}-layer student (teacher layers {kept_layers(n_teacher, opts.distill)}), "
        f"{opts.distill_epochs} epoch(s), T={opts.temperature}, alpha={opts.alpha} ...")
    loss_fn = distillation_loss(teacher, get_task(meta["task"]), opts.temperature, opts.alpha, CPU, precision)
    info = _train_variant(student, train_enc, report.held, meta, cfg, tmp / "student-train", loss_fn)
    info.update(layers=opts.distill, teacher_layers=n_teacher, kept=kept_layers(n_teacher, opts.distill),
                temperature=opts.temperature, alpha=opts.alpha, augment_copies=opts.distill_augment,
                train_rows=len(train_enc), parameters=parameter_count(student),
                teacher_parameters=parameter_count(teacher))
    folder = tmp / "student"
    save_model(student, tokenizer, folder, {**meta, "distilled_from": str(run_dir), "student_layers": opts.distill})
    report.add("student", student, file_mb(*folder.glob("*.safetensors")), distillation=info)


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=float), encoding="utf-8")


def print_summary(parity: dict) -> None:
    """One row per variant: quality, size, latency and throughput, with ratios to the PyTorch original."""
    from rich.console import Console
    from rich.table import Table

    metric = parity["primary_metric"]
    table = Table(title=f"export of {parity['run']} ({parity['held_data']['examples']} held examples)")
    for col in ("variant", metric, "change", "MB", "p50 ms", "p95 ms", "x p50", "ex/s bs32", "x thr", "agree"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, v in parity["variants"].items():
        timed = "latency_ms_p50" in v
        table.add_row(name, f"{v[metric]:.4f}", f"{v[f'{metric}_change']:+.4f}", f"{v['size_mb']:.1f}",
                      f"{v['latency_ms_p50']:.2f}" if timed else "-", f"{v['latency_ms_p95']:.2f}" if timed else "-",
                      f"{v['latency_p50_ratio']:.2f}" if timed else "-", f"{v['throughput_bs32']:.0f}" if timed else "-",
                      f"{v['throughput_ratio']:.2f}" if timed else "-",
                      f"{v['agreement']:.3f}" if v["agreement"] is not None else "-")
    Console(stderr=True, width=max(140, Console(stderr=True).width)).print(table)
