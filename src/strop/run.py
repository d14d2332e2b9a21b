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
from rich.markup import escape

from strop import __version__
from strop.config import (Config, check_run_name, dump_yaml, load_config, load_run_config,
                          resolve_method_defaults, resolve_validation_ratio)
from strop.data.batching import collate, encode
from strop.data.prepare import Dataset, prepare
from strop.data.split import too_small_to_score
from strop.device import resolve_device, resolve_precision
from strop.errors import ConfigError, DataError, RunError
from strop.evaluate.evaluator import MODEL_INPUTS, evaluate
from strop.evaluate.metrics import primary_metric, tune_threshold
from strop.models.backbone import load_tokenizer, read_model_config, resolve_model_path
from strop.models.classifier import build_model
from strop.models.peft import apply_peft, count_parameters, save_trained
from strop.track import NoTracker, Trackers, check_trackers
from strop.training.checkpoint import complete_checkpoints, latest_checkpoint
from strop.training.distributed import init_distributed, is_sharded, unshard
from strop.training.fast import release_memory
from strop.training.fast_lora import fused_lora_in
from strop.training.fewshot import check_fewshot, resolve_mode, train_fewshot
from strop.training.loop import count_steps, fit
from strop.training.progress import console


TASK_METRICS = {"single_label": ["accuracy", "macro_f1", "micro_f1", "weighted_f1", "mcc", "loss"],
                "multi_label": ["micro_f1", "macro_f1", "micro_precision", "micro_recall", "exact_match",
                                "hamming_loss", "loss"],
                "regression": ["pearson", "spearman", "mse", "rmse", "mae", "loss"],
                "token_classification": ["f1", "precision", "recall", "macro_f1", "token_accuracy", "loss"]}


@dataclass
class RunResult:
    run_dir: Path
    results: dict  # what results.json holds

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads or os.cpu_count() or 1)


def _run_dir_of(cfg: Config) -> Path:
    if not cfg.name:
        cfg.name = f"{Path(cfg.data.train).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_run_name(cfg.name)  # a Config built in code skips validate()
    return Path(cfg.output_dir) / cfg.name


def holds_results(run_dir: Path) -> bool:
    """Whether a run folder holds a complete checkpoint or a model: what no failure or restart may delete."""
    return bool(complete_checkpoints(run_dir)) or any((run_dir / d).exists() for d in ("model", "adapter"))


def _existing_run_error(run_dir: Path) -> RunError:
    found = complete_checkpoints(run_dir)
    if found:
        return RunError(f"run folder {run_dir} already exists and holds checkpoint {found[-1].name}; continue it "
                        f"with: strop train --resume {run_dir} (or train.resume=auto), choose another name "
                        "(name=...), or pass --overwrite to start it again")
    held = "a model" if holds_results(run_dir) else "no checkpoint to resume"
    return RunError(f"run folder {run_dir} already exists and holds {held}; choose another name (name=...) or pass "
                    "--overwrite to replace it")


def resolve_run(config, overrides, overwrite: bool, resume) -> tuple[Config, Path, Path | None]:
    """(config, run folder, checkpoint to resume from or None). Creates nothing.

    resume: False; True (the run folder named by the config); or a run folder path (its config.yaml is used).
    """
    if resume not in (False, True, None):
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise RunError(f"cannot resume {run_dir}: no config.yaml there; give the run folder (runs/<name>)")
        cfg = load_run_config(run_dir / "config.yaml", overrides)
        cfg.output_dir, cfg.name = str(run_dir.parent), run_dir.name
    else:
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        run_dir = _run_dir_of(cfg)
    for note in resolve_method_defaults(cfg):  # before the resume check: config.yaml holds the resolved value
        console.print(f"[dim]{escape(note)}[/dim]")
    wants_resume = bool(resume) or cfg.train.resume == "auto"
    if wants_resume and run_dir.is_dir():
        ckpt = latest_checkpoint(run_dir, log=lambda m: console.print(f"[yellow]{escape(m)}[/yellow]"))
        if ckpt is not None:
            if cfg.data.validation_ratio is None:  # resolved from the data when the run began: keep its split
                cfg.data.validation_ratio = load_run_config(run_dir / "config.yaml").data.validation_ratio
            check_resumable(cfg, run_dir)
            return cfg, run_dir, ckpt
    if resume:
        raise RunError(f"cannot resume {run_dir}: it has no complete checkpoint (checkpoints/step-N/COMPLETE); "
                       f"start it again with: strop train {run_dir / 'config.yaml'} --overwrite")
    # resume=auto starts again in the folder of a run that stopped before its first checkpoint (nothing to resume)
    restart = wants_resume and (run_dir / "config.yaml").is_file() and not holds_results(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not (overwrite or restart):
        raise _existing_run_error(run_dir)
    return cfg, run_dir, None


# settings a resumed run may change: they do not touch the optimisation, the data or its order (the run's length may
# change: stopping earlier or training on is asked for, and the schedule follows the new length)
SAFE_ON_RESUME = ("train.log_every", "train.threads", "train.keep_checkpoints", "train.save_every", "train.resume",
                  "train.eval_every", "train.max_steps", "train.epochs", "train.early_stopping_patience", "track",
                  "eval.report", "eval.report_explain", "eval.batch_size", "output_dir", "name",
                  # how the same steps are computed: engine, process layout, device and speed switches (checkpoints
                  # hold one-process state dicts, so they resume under any of them; tests/test_distributed.py)
                  "train.distributed", "train.deepspeed", "train.micro_batch_size", "train.auto_batch_size",
                  "train.device", "train.fast_dropout", "train.fused_kernels", "train.fused_lora", "train.tune_allocator",
                  "train.nonfinite", "train.max_skipped_steps")


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """A resumed run continues the same optimisation: the checkpoint's optimizer and scheduler restore the old
    learning rate whatever the config says, and its data position assumes the old batches. Refuse settings that
    differ from the run's config.yaml, except those in SAFE_ON_RESUME."""
    import dataclasses

    def flat(obj, prefix=""):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            out.update(flat(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else
                       {prefix + f.name: list(value) if isinstance(value, tuple) else value})
        return out

    saved, now = flat(load_run_config(run_dir / "config.yaml")), flat(cfg)
    changed = [k for k in now if now[k] != saved.get(k) and k not in SAFE_ON_RESUME and not k.startswith("tune.")]
    if changed:
        shown = ", ".join(f"{k}={saved.get(k)!r} -> {now[k]!r}" for k in changed[:5])
        raise RunError(f"cannot resume {run_dir} with changed settings ({shown}): the checkpoint continues the "
                       "optimisation it saved (its learning rate, schedule and data order). Resume without them, or "
                       "start a new run (another name=..., or --overwrite)")
    if cfg.peft.method == "adalora":
        raise RunError(f"cannot resume {run_dir}: an AdaLoRA run's rank allocator keeps importance statistics that "
                       "checkpoints do not hold, so a resumed run would allocate other ranks than an uninterrupted "
                       "one; start it again with --overwrite (or use peft.method=lora, which resumes exactly)")


def open_run_dir(run_dir: Path, ckpt: Path | None) -> int:
    """Create (or reopen, when resuming) the run folder; returns the step to resume from (0 for a new run)."""
    if ckpt is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        return 0
    step = int(ckpt.name.split("-")[-1])
    truncate_metrics(run_dir / "metrics.jsonl", step)
    for stale in ("model", "results.json"):  # a resumed run rewrites its final outputs
        path = run_dir / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    console.print(f"resuming {escape(str(run_dir))} from {ckpt.name}")
    return step


def discard_failed_run(run_dir: Path) -> None:
    """Remove the folder of a new run that failed before it trained (bad data, a setting found wrong late): there is
    nothing to resume or read in it, and leaving it would stop the same command from running again. A run that
    logged training steps keeps its folder, whose metrics show how it failed (a NaN loss, say); resume=auto starts
    again in it, as in any folder without a checkpoint."""
    metrics = run_dir / "metrics.jsonl"
    logged = metrics.is_file() and metrics.stat().st_size > 0
    if run_dir.is_dir() and not holds_results(run_dir) and not logged:
        shutil.rmtree(run_dir, ignore_errors=True)
        console.print(f"[dim]removed {escape(str(run_dir))}: the run stopped before it wrote a checkpoint or a "
                      "model[/dim]")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after `step` (the checkpoint), so a resumed run's metrics.jsonl has no duplicates."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
            and not json.loads(line).get("split", "").startswith("final_")]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    tmp.replace(path)


def check_max_length(cfg: Config, model_folder: Path) -> None:
    limit = read_model_config(model_folder).get("max_position_embeddings")
    if limit and cfg.model.max_length > limit:
        raise ConfigError(f"model.max_length={cfg.model.max_length} exceeds what the model allows ({limit} "
                          f"positions); set model.max_length<={limit}")


def check_room_for_text(tokenizer, max_length: int, pairs: bool) -> None:
    """model.max_length must hold the tokenizer's special tokens plus one real token of each text; below the special
    tokens alone the tokenizer does not truncate at all."""
    need = tokenizer.num_special_tokens_to_add(pair=pairs) + (2 if pairs else 1)
    if max_length < need:
        what = "a text pair" if pairs else "a text"
        raise ConfigError(f"model.max_length={max_length} leaves no room for the text: this tokenizer adds "
                          f"{need - (2 if pairs else 1)} special tokens to {what}, so the least that keeps a token of "
                          f"{'each text' if pairs else 'it'} is {need}; set model.max_length>={need} (128 is usual)")


def check_correlation_defined(ds: Dataset, metric: str) -> None:
    """A correlation against constant validation targets is undefined: it would read 0.0 at every validation and
    early stopping and best-model choice would act on noise."""
    if ds.task != "regression" or metric not in ("pearson", "spearman") or "validation" not in ds.splits:
        return
    targets = np.asarray(ds.splits["validation"].labels, dtype=np.float64)
    if len(targets) and np.all(targets == targets[0]):
        raise DataError(f"every validation target is {targets[0]:g}, so {metric} (the model-selection metric) is "
                        "undefined; set train.metric=mse (or rmse, mae), or give a validation set whose targets vary")


def prepare_data(cfg: Config, tuning: bool = False) -> tuple[Dataset, str]:
    """(the run's data, its training mode: 'standard' or 'fewshot'). The mode is decided on the whole training file,
    before anything is held out, because it decides how much is: an empty data.validation_ratio is 0 in few-shot
    mode (resolve_validation_ratio); config.yaml, written later, keeps the resolved value."""
    ds = prepare(cfg, carve=False)
    train_rows = ds.splits["train"]
    mode = resolve_mode(cfg, ds.task, getattr(train_rows, "labels", None), ds.labels)  # tags: no labels
    notes = resolve_validation_ratio(cfg, mode == "fewshot", len(train_rows))
    if "validation" not in ds.splits:  # with a validation file the ratio carves nothing: nothing to say
        for note in notes:
            console.print(escape(note))
    ds.carve_missing(cfg.data)
    if tuning and mode == "fewshot" and "validation" not in ds.splits:  # refused before the first trial trains
        raise ConfigError("strop tune scores a few-shot trial on its validation split, and this run has none "
                          "(few-shot mode keeps every labelled row for training unless told otherwise): give "
                          "data.validation or set data.validation_ratio, e.g. 0.2")
    return ds, mode


def small_splits(ds: Dataset, final: dict) -> dict:
    """{split: why} for each evaluated split too small for its metrics to mean anything (data/split.py): results.json
    keeps their numbers, the printed summary and report.html show the reason instead."""
    why = {s: too_small_to_score(len(ds.splits[s]), ds.task, len(ds.labels)) for s in final}
    return {s: reason for s, reason in why.items() if reason}


def data_summary(ds: Dataset, encoded: dict) -> dict:
    out = {"task": ds.task, "labels": ds.labels, "columns": vars(ds.columns), "splits": {}}
    for split, ex in ds.splits.items():
        enc = encoded[split]
        info = {"examples": len(ex), "truncated": enc.n_truncated, "mean_tokens": float(enc.lengths.mean()),
                "max_tokens": int(enc.lengths.max())}
        if ds.task == "token_classification":  # windows: rows the model sees; split: sentences over max_length
            info.update(sentences=enc.n_examples, windows=len(enc), split_into_windows=enc.n_split)
        if ds.task == "single_label":
            counts = np.bincount(ex.labels, minlength=len(ds.labels))
            info["label_counts"] = dict(zip(ds.labels, counts.tolist()))
        out["splits"][split] = info
    return out


def train(config: Config | str | Path | None = None, overrides: list[str] | dict | None = None,
          overwrite: bool = False, resume: bool | str | Path = False, on_eval=None) -> RunResult:
    """Fine-tune a model as the config says; returns the run folder and its results.

    `config`: a Config, a YAML path, or None for defaults; `overrides`: ['train.lr=3e-4', ...] or {'train.lr': 3e-4};
    `resume`: True to continue the run the config names from its newest complete checkpoint, or a run folder path;
    `on_eval(step, value)`: called after each validation with the validation metric (hyperparameter search prunes
    there by raising).
    """
    dist = init_distributed()  # rank 0 of 1 unless started by torchrun / accelerate launch
    console.quiet = not dist.main  # one voice: rank 0 prints, logs and writes the run folder
    cfg, run_dir, ckpt = resolve_run(config, overrides, overwrite, resume)
    run_dir = Path(dist.from_main(str(run_dir)))  # a name from the clock could differ by a second between ranks
    cfg.name = run_dir.name
    set_threads(cfg.train.threads)
    # everything a user can get wrong is checked before the run folder is created, so bad input leaves nothing
    ds, mode = prepare_data(cfg, tuning=on_eval is not None)
    model_folder = resolve_model_path(cfg.model.path, cfg.model.allow_pickle)
    tokenizer = load_tokenizer(model_folder, cfg.model.trust_remote_code)
    check_max_length(cfg, model_folder)
    if ds.task == "token_classification":
        from strop.data.tokens import window_size

        window_size(tokenizer, cfg.model.max_length, cfg.ner.stride)  # a stride too large for the windows stops here
    else:
        check_room_for_text(tokenizer, cfg.model.max_length, ds.columns.pair is not None)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    metric = primary_metric(ds.task) if cfg.train.metric == "auto" else cfg.train.metric
    if metric not in TASK_METRICS[ds.task]:
        raise ConfigError(f"train.metric={metric!r} is not a {ds.task} metric; choose from {TASK_METRICS[ds.task]}")
    check_correlation_defined(ds, metric)

    train_labels = getattr(ds.splits["train"], "labels", None)  # token classification keeps tags per sentence
    if cfg.train.early_stopping_patience and "validation" not in ds.splits and mode != "fewshot":
        raise ConfigError(f"train.early_stopping_patience={cfg.train.early_stopping_patience} needs a validation "
                          "split to watch, and this run has none; give data.validation, keep data.validation_ratio "
                          "> 0, or set train.early_stopping_patience=0")
    if mode == "fewshot":
        check_fewshot(cfg, ds.task, train_labels, ds.labels, dist.world)
        if cfg.model.pooling != "mean":
            console.print("[dim]train.mode=fewshot: model.pooling=mean (the sentence encoder's own pooling)[/dim]")
            cfg.model.pooling = "mean"

    torch.manual_seed(cfg.train.seed)  # the new head's initial weights (and the adapters')
    model = build_model(cfg.model, ds.task, ds.labels,  # before the run folder: broken weights leave nothing behind
                        cfg.ner)
    if mode == "fewshot":
        model.normalize = True  # the head reads the unit-length embeddings that contrastive training shapes
    model, peft_hook = apply_peft(model, cfg.peft, count_steps(cfg.train, len(ds.splits["train"]))[1])

    check_trackers(cfg.track)
    if cfg.train.distributed == "deepspeed":
        from strop.training.ds_engine import read_ds_config

        read_ds_config(cfg.train.deepspeed, cfg.train, dist.world)  # a bad DeepSpeed JSON stops here
    dist.barrier()  # every rank has checked the run folder before rank 0 (re)creates it
    if not dist.main:
        return _train_other_rank(model, ds, tokenizer, cfg, ckpt, run_dir, device, precision, metric, peft_hook,
                                 dist)
    start_step = open_run_dir(run_dir, ckpt)
    caller_stopped = False

    def report(step: int, value: float) -> None:
        nonlocal caller_stopped
        try:
            on_eval(step, value)
        except BaseException:
            caller_stopped = True  # a deliberate stop (tune's pruning): the partial folder is the trial's record
            raise

    try:
        write_atomic(run_dir / "config.yaml", dump_yaml(cfg))  # first file of a new run: the resolved config
        for note in ds.notes:
            console.print(f"[dim]{escape(note)}[/dim]")
        encoded = {split: encode_split(cfg, ds, tokenizer, ex) for split, ex in ds.splits.items()}
        write_atomic(run_dir / "data.json", json.dumps(data_summary(ds, encoded), indent=2))
        for split, enc in encoded.items():
            if enc.n_truncated:
                console.print(f"[yellow]{split}: {enc.n_truncated} of {len(enc)} examples are longer than "
                              f"model.max_length={cfg.model.max_length} tokens and were truncated[/yellow]")
        trainable, total = count_parameters(model)
        model_name = model_folder.name if cfg.model.path != "default" else "all-MiniLM-L6-v2 (default)"
        console.print(f"model: {model_name}, {total / 1e6:.1f}M parameters; task {ds.task} with {len(ds.labels)} "
                      f"label(s); {len(ds.splits['train'])} training examples; {device.type} {precision}")
        console.print(f"peft.method={cfg.peft.method}: trainable parameters {trainable:,} of {total:,} "
                      f"({100 * trainable / total:.2f}%)")

        tracker = Trackers(run_dir, cfg.track, purge_step=start_step + 1 if start_step else None, config=cfg)
        try:
            if "validation" not in encoded:
                console.print("[yellow]no validation split: no evaluation during training[/yellow]")
            if mode == "fewshot":
                fitted = train_fewshot(model, encoded["train"], cfg, ds.labels, device, precision, tracker, run_dir,
                                       resume_from=ckpt)
            else:
                fitted = fit(model, encoded["train"], encoded.get("validation"), cfg, ds.task, ds.labels, device,
                             precision, tracker, metric, run_dir, resume_from=ckpt, peft_hook=peft_hook,
                             on_eval=report if on_eval else None, dist=dist)
            if is_sharded(model):  # FSDP: the full weights into a plain model for the final evaluation and model/
                model = unshard(model, dist, lambda: build_model(cfg.model, ds.task, ds.labels, cfg.ner).to(device))
            # LoRA through the fused linear, as the evaluations during training ran: the same numbers, and PEFT's
            # forward would cast every frozen weight on every batch (about 100 MB more at the peak on SST-2)
            with fused_lora_in(model, cfg.train.fused_lora):
                threshold, final = final_evaluation(model, encoded, ds, cfg, device, precision)
            for split, metrics in final.items():
                tracker.log({"step": fitted.state.step, "split": f"final_{split}", **metrics})
        except BaseException:
            tracker.close(failed=True)
            raise

        meta = {"strop_version": __version__, "task": ds.task, "labels": ds.labels, "pooling": cfg.model.pooling,
                "max_length": cfg.model.max_length, "text_column": ds.columns.text,
                "text_pair_column": ds.columns.pair, "label_column": ds.columns.label,
                "label_delimiter": cfg.data.label_delimiter, "threshold": threshold,
                "base_model": str(cfg.model.path), "train_mode": mode}
        if mode == "fewshot":
            meta["normalize"] = True
        if ds.task == "token_classification":
            meta.update(ner_meta(cfg, ds))
        probe = next(iter(encoded.values()))  # a few real examples check that merging adapters changes no logits
        probe_inputs = {k: v.to(device) for k, v in collate(probe, np.arange(min(8, len(probe)))).items()
                        if k in MODEL_INPUTS}
        meta = save_trained(model, tokenizer, run_dir, meta, cfg.peft, probe_inputs, str(model_folder))
    except BaseException:
        if ckpt is None and not caller_stopped:
            discard_failed_run(run_dir)
        raise
    results = run_results(fitted, len(encoded["train"]), metric, precision, threshold, final, start_step)
    results["trainable_params"], results["total_params"], results["train_mode"] = trainable, total, mode
    results["small_splits"] = small_splits(ds, final)
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    del model, fitted, peft_hook  # the report loads model/ itself: free the training copy (and its optimizer) first
    release_memory()  # and give the pages back, so the report's peak does not stack on training's high-water mark
    if cfg.eval.report:
        from strop.evaluate.report import build_report

        try:
            build_report(run_dir, explain_k=cfg.eval.report_explain)
        except Exception as e:  # noqa: BLE001 - model/ and results.json are written: a failed report must not fail
            console.print(f"[yellow]report.html not written ({escape(type(e).__name__)}: {escape(str(e))}); the run "
                          f"itself is complete. Rebuild the report with: strop report {escape(str(run_dir))}[/yellow]")
    tracker.finish(run_dir)  # after model/, results.json and the report: MLflow logs them; then trackers close
    _print_summary(run_dir, results, metric)
    return RunResult(run_dir, results)


def _train_other_rank(model, ds: Dataset, tokenizer, cfg: Config, ckpt, run_dir: Path, device, precision, metric,
                      peft_hook, dist) -> RunResult:
    """Ranks > 0 of a multi-process run: the same loop on their slice of each batch; they write and log nothing."""
    encoded = {split: encode_split(cfg, ds, tokenizer, ex) for split, ex in ds.splits.items()}
    fit(model, encoded["train"], encoded.get("validation"), cfg, ds.task, ds.labels, device, precision, NoTracker(),
        metric, run_dir, resume_from=ckpt, peft_hook=peft_hook, dist=dist)
    if is_sharded(model):
        unshard(model, dist, rebuild=None)  # collective: rank 0 gathers the full weights
    return RunResult(run_dir, {"rank": dist.rank})


def encode_split(cfg: Config, ds: Dataset, tokenizer, examples):
    """Tokenized split: `Encoded` rows, or subword windows of sentences for token classification."""
    if ds.task != "token_classification":
        return encode(tokenizer, examples, cfg.model.max_length)
    from strop.data.tokens import encode_tokens

    n = cfg.ner
    return encode_tokens(tokenizer, examples, cfg.model.max_length, n.stride, n.label_subwords, n.casing, ds.labels,
                         n.decoding)


def ner_meta(cfg: Config, ds) -> dict:
    """strop.json fields a token-classification model needs at prediction time."""
    n = cfg.ner
    return {"text_column": "tokens", "label_column": "tags", "scheme": ds.scheme, "casing": n.casing,
            "decoding": n.decoding, "stride": n.stride, "word_split": n.word_split,
            "label_subwords": n.label_subwords, "token_column": n.token_column, "tag_column": n.tag_column,
            "tokens_key": n.tokens_key, "tags_key": n.tags_key}


def final_evaluation(model, encoded: dict, ds: Dataset, cfg: Config, device, precision) -> tuple[float, dict]:
    """(decision threshold, {split: metrics}) with the final weights; multi-label tunes the threshold on validation."""
    threshold, val = 0.5, encoded.get("validation")
    if ds.task == "multi_label" and val is not None:
        _, probs = evaluate(model, val, ds.task, ds.labels, cfg.eval.batch_size, device, precision, keep_outputs=True)
        threshold = tune_threshold(probs, val.labels)
        console.print(f"multi-label decision threshold tuned on validation: {threshold:.2f}")
    final = {}
    for split in ("validation", "test"):
        if split in encoded:
            final[split], _ = evaluate(model, encoded[split], ds.task, ds.labels, cfg.eval.batch_size, device,
                                       precision, threshold)
    return threshold, final


def run_results(fitted, n_train: int, metric: str, precision: str, threshold: float, final: dict,
                start_step: int) -> dict:
    s, secs = fitted.state, fitted.train_seconds
    steps_here = s.step - start_step
    return {"metric": metric, "best_metric": s.best_metric, "best_step": s.best_step,
            "best_loss": s.best_loss, "steps": s.step,
            "epochs": round(s.step / fitted.steps_per_epoch, 4), "resumed_from_step": start_step or None,
            "skipped_steps": s.skipped_steps, "stopped_early": s.stopped_early, "train_seconds": secs,
            "train_cpu_seconds": fitted.train_cpu_seconds,
            "train_samples_per_s": steps_here * n_train / fitted.steps_per_epoch / secs if secs else 0.0,
            "train_tokens": s.train_tokens, "precision": precision, "threshold": threshold, **final}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _print_summary(run_dir: Path, results: dict, metric: str) -> None:
    from rich.table import Table

    keys = [metric] + [k for k in ("accuracy", "token_accuracy", "macro_f1", "mcc", "micro_f1", "exact_match",
                                   "pearson", "spearman", "rmse", "loss") if k != metric]
    title = (f"results ({results['steps']} steps, {results['train_seconds']:.0f} s, "
             f"{results['train_samples_per_s']:.0f} samples/s)")
    small = results.get("small_splits", {})
    scored = [s for s in ("validation", "test") if s in results and s not in small]
    if scored:
        table = Table(title=title)
        table.add_column("split")
        shown = [k for k in keys if any(k in results[s] for s in scored)]
        for k in shown:
            table.add_column(k, justify="right")
        for split in scored:
            table.add_row(split, *[f"{results[split][k]:.4f}" for k in shown])
        console.print(table)
    else:
        console.print(title)
    for split, why in small.items():
        console.print(f"[yellow]{split} metrics not shown: {escape(why)}, too few for the numbers to mean anything "
                      f"(results.json keeps them)[/yellow]")
    console.print(f"run folder: [bold]{escape(str(run_dir))}[/bold]  (model: {escape(str(run_dir / 'model'))})")
    if (run_dir / "report.html").is_file():
        console.print(f"report: {escape(str(run_dir / 'report.html'))}")


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
