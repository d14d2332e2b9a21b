"""One training run, end to end: config -> data -> model -> loop -> evaluation -> run folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from strop import __version__
from strop.config import Config, dump_yaml, load_config
from strop.data.batching import encode
from strop.data.prepare import Dataset, prepare
from strop.device import resolve_device, resolve_precision
from strop.errors import ConfigError, RunError
from strop.evaluate.evaluator import evaluate
from strop.evaluate.metrics import primary_metric, tune_threshold
from strop.models.backbone import load_tokenizer, read_model_config, resolve_model_path
from strop.models.classifier import build_model, save_model
from strop.track import Trackers
from strop.training.loop import fit
from strop.training.progress import console


TASK_METRICS = {"single_label": ["accuracy", "macro_f1", "micro_f1", "weighted_f1", "mcc", "loss"],
                "multi_label": ["micro_f1", "macro_f1", "micro_precision", "micro_recall", "exact_match",
                                "hamming_loss", "loss"],
                "regression": ["pearson", "spearman", "mse", "rmse", "mae", "loss"]}


@dataclass
class RunResult:
    run_dir: Path
    results: dict  # what results.json holds

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads or os.cpu_count() or 1)


def make_run_dir(cfg: Config, overwrite: bool) -> Path:
    name = cfg.name or f"{Path(cfg.data.train).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunError(f"run folder {run_dir} already exists; choose another name (name=...) or pass --overwrite")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.name = name
    return run_dir


def check_max_length(cfg: Config, model_folder: Path, tokenizer) -> None:
    limit = read_model_config(model_folder).get("max_position_embeddings")
    if limit and cfg.model.max_length > limit:
        raise ConfigError(f"model.max_length={cfg.model.max_length} exceeds what the model allows ({limit} "
                          f"positions); set model.max_length<={limit}")


def data_summary(ds: Dataset, encoded: dict) -> dict:
    out = {"task": ds.task, "labels": ds.labels, "columns": vars(ds.columns), "splits": {}}
    for split, ex in ds.splits.items():
        enc = encoded[split]
        info = {"examples": len(ex), "truncated": enc.n_truncated, "mean_tokens": float(enc.lengths.mean()),
                "max_tokens": int(enc.lengths.max())}
        if ds.task == "single_label":
            counts = np.bincount(ex.labels, minlength=len(ds.labels))
            info["label_counts"] = dict(zip(ds.labels, counts.tolist()))
        out["splits"][split] = info
    return out


def train(config: Config | str | Path | None = None, overrides: list[str] | dict | None = None,
          overwrite: bool = False) -> RunResult:
    """Fine-tune a model as the config says; returns the run folder and its results.

    `config`: a Config, a YAML path, or None for defaults; `overrides`: ['train.lr=3e-4', ...] or {'train.lr': 3e-4}.
    """
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    set_threads(cfg.train.threads)
    # everything a user can get wrong is checked before the run folder is created, so bad input leaves nothing
    ds = prepare(cfg)
    model_folder = resolve_model_path(cfg.model.path, cfg.model.allow_pickle)
    tokenizer = load_tokenizer(model_folder, cfg.model.trust_remote_code)
    check_max_length(cfg, model_folder, tokenizer)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    metric = primary_metric(ds.task) if cfg.train.metric == "auto" else cfg.train.metric
    if metric not in TASK_METRICS[ds.task]:
        raise ConfigError(f"train.metric={metric!r} is not a {ds.task} metric; choose from {TASK_METRICS[ds.task]}")

    run_dir = make_run_dir(cfg, overwrite)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")  # first file: the resolved config
    for note in ds.notes:
        console.print(f"[dim]{note}[/dim]")

    encoded = {split: encode(tokenizer, ex, cfg.model.max_length) for split, ex in ds.splits.items()}
    summary = data_summary(ds, encoded)
    (run_dir / "data.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    for split, enc in encoded.items():
        if enc.n_truncated:
            console.print(f"[yellow]{split}: {enc.n_truncated} of {len(enc)} examples are longer than "
                          f"model.max_length={cfg.model.max_length} tokens and were truncated[/yellow]")
    torch.manual_seed(cfg.train.seed)  # the new head's initial weights
    model = build_model(cfg.model, ds.task, ds.labels)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"model: {model_folder.name if cfg.model.path != 'default' else 'all-MiniLM-L6-v2 (default)'}, "
                  f"{n_params / 1e6:.1f}M parameters; task {ds.task} with {len(ds.labels)} label(s); "
                  f"{len(ds.splits['train'])} training examples; {device.type} {precision}")

    tracker = Trackers(run_dir, cfg.track)
    try:
        val = encoded.get("validation")
        if val is None:
            console.print("[yellow]no validation split: no evaluation during training[/yellow]")
        fitted = fit(model, encoded["train"], val, cfg, ds.task, ds.labels, device, precision, tracker, metric)
        threshold = 0.5
        final = {}
        if ds.task == "multi_label" and val is not None:
            _, probs = evaluate(model, val, ds.task, ds.labels, cfg.eval.batch_size, device, precision,
                                keep_outputs=True)
            threshold = tune_threshold(probs, val.labels)
            console.print(f"multi-label decision threshold tuned on validation: {threshold:.2f}")
        for split in ("validation", "test"):
            if split in encoded:
                final[split], _ = evaluate(model, encoded[split], ds.task, ds.labels, cfg.eval.batch_size, device,
                                           precision, threshold)
                tracker.log({"step": fitted.steps, "split": f"final_{split}", **final[split]})
    finally:
        tracker.close()

    meta = {"strop_version": __version__, "task": ds.task, "labels": ds.labels, "pooling": cfg.model.pooling,
            "max_length": cfg.model.max_length, "text_column": ds.columns.text, "text_pair_column": ds.columns.pair,
            "label_column": ds.columns.label, "label_delimiter": cfg.data.label_delimiter, "threshold": threshold,
            "base_model": str(cfg.model.path)}
    save_model(model, tokenizer, run_dir / "model", meta)
    results = {"metric": metric, "best_metric": fitted.best_metric, "best_step": fitted.best_step,
               "steps": fitted.steps, "epochs": round(fitted.epochs_run, 4), "train_seconds": fitted.train_seconds,
               "train_samples_per_s": fitted.steps and len(encoded["train"]) * fitted.epochs_run / fitted.train_seconds,
               "train_tokens_per_s": fitted.train_tokens / fitted.train_seconds if fitted.train_seconds else 0.0,
               "precision": precision, "threshold": threshold, **final}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    _print_summary(run_dir, results, metric)
    return RunResult(run_dir, results)


def _print_summary(run_dir: Path, results: dict, metric: str) -> None:
    from rich.table import Table

    keys = [metric] + [k for k in ("accuracy", "macro_f1", "mcc", "micro_f1", "exact_match", "pearson", "spearman",
                                   "rmse", "loss") if k != metric]
    table = Table(title=f"results ({results['steps']} steps, {results['train_seconds']:.0f} s, "
                        f"{results['train_samples_per_s']:.0f} samples/s)")
    table.add_column("split")
    shown = [k for k in keys if any(k in results.get(s, {}) for s in ("validation", "test"))]
    for k in shown:
        table.add_column(k, justify="right")
    for split in ("validation", "test"):
        if split in results:
            table.add_row(split, *[f"{results[split][k]:.4f}" for k in shown])
    console.print(table)
    console.print(f"run folder: [bold]{run_dir}[/bold]  (model: {run_dir / 'model'})")


def open_run(path: str | Path) -> Path:
    """A finished run's model folder from a run folder or a model folder."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path} not found; give a run folder (runs/<name>) or its model/ folder")
    if (path / "model" / "strop.json").is_file():
        return path / "model"
    if (path / "strop.json").is_file():
        return path
    raise RunError(f"{path} has no finished model (no model/strop.json); did the run finish? "
                   f"Its config.yaml and metrics.jsonl show how far it got")
