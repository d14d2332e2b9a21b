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
from strop.data.prepare import Dataset
from strop.data.split import too_small_to_score
from strop.device import resolve_device, resolve_precision
from strop.errors import ConfigError, DataError, RunError
from strop.models.backbone import read_model_config
from strop.models.peft import apply_peft, count_parameters, save_trained
from strop.runs import write_atomic
from strop.tasks import Task, build_model, detect_task, get_task
from strop.tasks import prepare as prepare_task_data
from strop.track import NoTracker, Trackers, check_trackers
from strop.training.checkpoint import complete_checkpoints, latest_checkpoint
from strop.training.distributed import init_distributed, is_sharded, unshard
from strop.training.fast import release_memory
from strop.training.fast_lora import fused_lora_in
from strop.training.fewshot import check_fewshot, resolve_mode, train_fewshot
from strop.training.loop import count_steps, fit
from strop.training.progress import console


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
    task = detect_task(cfg)
    # before the resume check: config.yaml holds the resolved values
    for note in resolve_method_defaults(cfg, task.default_peft, task.name, task.method_lr,
                                        task.default_epochs) + task.resolve_defaults(cfg):
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


def check_correlation_defined(ds: Dataset, metric: str) -> None:
    """A correlation against constant validation targets is undefined: it would read 0.0 at every validation and
    early stopping and best-model choice would act on noise."""
    if metric not in ("pearson", "spearman") or "validation" not in ds.splits:  # correlations: regression
        return
    targets = np.asarray(ds.splits["validation"].labels, dtype=np.float64)
    if len(targets) and np.all(targets == targets[0]):
        raise DataError(f"every validation target is {targets[0]:g}, so {metric} (the model-selection metric) is "
                        "undefined; set train.metric=mse (or rmse, mae), or give a validation set whose targets vary")


def prepare_data(cfg: Config, tuning: bool = False) -> tuple[Dataset, Task, str]:
    """(the run's data, its task, its training mode: 'standard' or 'fewshot'). The mode is decided on the whole
    training file, before anything is held out, because it decides how much is: an empty data.validation_ratio is 0
    in few-shot mode (resolve_validation_ratio); config.yaml, written later, keeps the resolved value."""
    ds = prepare_task_data(cfg, carve=False)
    task = get_task(ds.task)
    train_rows = ds.splits["train"]
    mode = resolve_mode(cfg, task, getattr(train_rows, "labels", None), ds.labels)  # tags: no labels
    notes = resolve_validation_ratio(cfg, mode == "fewshot", len(train_rows))
    if "validation" not in ds.splits:  # with a validation file the ratio carves nothing: nothing to say
        for note in notes:
            console.print(escape(note))
    ds.carve_missing(cfg.data)
    if tuning and mode == "fewshot" and "validation" not in ds.splits:  # refused before the first trial trains
        raise ConfigError("strop tune scores a few-shot trial on its validation split, and this run has none "
                          "(few-shot mode keeps every labelled row for training unless told otherwise): give "
                          "data.validation or set data.validation_ratio, e.g. 0.2")
    return ds, task, mode


def small_splits(ds: Dataset, task: Task, final: dict) -> dict:
    """{split: why} for each evaluated split too small for its metrics to mean anything (data/split.py): results.json
    keeps their numbers, the printed summary and report.html show the reason instead."""
    classes = len(ds.labels) if task.class_per_row else None
    why = {s: too_small_to_score(len(ds.splits[s]), classes) for s in final}
    return {s: reason for s, reason in why.items() if reason}


def data_summary(ds: Dataset, task: Task, encoded: dict) -> dict:
    out = {"task": ds.task, "labels": ds.labels, "columns": vars(ds.columns), "splits": {}}
    for split, ex in ds.splits.items():
        enc = encoded[split]
        info = {"examples": len(ex), "truncated": enc.n_truncated, "mean_tokens": float(enc.lengths.mean()),
                "max_tokens": int(enc.lengths.max()), **task.split_summary(ds, split, enc)}
        out["splits"][split] = info
    return out


def run_meta(cfg: Config, ds: Dataset, task: Task, mode: str) -> dict:
    """strop.json of the run's model: what every task records, plus the task's own fields. The data are encoded
    with it during training, as predict and serve encode with the saved copy."""
    meta = {"strop_version": __version__, "task": ds.task, "labels": ds.labels, "pooling": cfg.model.pooling,
            "label_column": ds.columns.label, "base_model": str(cfg.model.path), "train_mode": mode,
            **task.meta(cfg, ds)}
    if mode == "fewshot":
        meta["normalize"] = True  # the head reads the unit-length embeddings that contrastive training shapes
    return meta


@dataclass
class RunSetup:
    """Everything a run has checked and built before its folder exists (bad input leaves nothing behind)."""

    cfg: Config
    run_dir: Path
    ckpt: Path | None  # the checkpoint to resume from
    dist: object  # training/distributed.Dist: this process's rank
    ds: Dataset
    task: Task
    mode: str  # standard | fewshot
    model_folder: Path
    tokenizer: object
    device: torch.device
    precision: str
    metric: str  # the validation metric that picks the best step
    model: torch.nn.Module
    peft_hook: object


def setup_run(config, overrides, overwrite: bool, resume, tuning: bool) -> RunSetup:
    """Resolve the config and check the data, model, settings and trackers; build the model (PEFT applied).
    Creates nothing on disk."""
    dist = init_distributed()  # rank 0 of 1 unless started by torchrun / accelerate launch
    console.quiet = not dist.main  # one voice: rank 0 prints, logs and writes the run folder
    cfg, run_dir, ckpt = resolve_run(config, overrides, overwrite, resume)
    run_dir = Path(dist.from_main(str(run_dir)))  # a name from the clock could differ by a second between ranks
    cfg.name = run_dir.name
    set_threads(cfg.train.threads)
    ds, task, mode = prepare_data(cfg, tuning=tuning)
    model_folder = task.model_folder(task.model_path(cfg), cfg.model.allow_pickle)
    tokenizer = task.load_processor(model_folder, cfg.model.trust_remote_code)
    check_max_length(cfg, model_folder)
    task.check_settings(cfg, ds, tokenizer)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    metric = task.primary_metric if cfg.train.metric == "auto" else cfg.train.metric
    if metric not in task.metrics:
        raise ConfigError(f"train.metric={metric!r} is not a {task.name} metric; choose from {list(task.metrics)}")
    check_correlation_defined(ds, metric)
    check_mode(cfg, ds, task, mode, dist.world)

    torch.manual_seed(cfg.train.seed)  # the new head's initial weights (and the adapters')
    model = build_model(task, cfg, ds.labels)  # before the run folder: broken weights leave nothing behind
    if mode == "fewshot":
        model.normalize = True  # the head reads the unit-length embeddings that contrastive training shapes
    model, peft_hook = apply_peft(model, cfg.peft, count_steps(cfg.train, len(ds.splits["train"]))[1])
    check_trackers(cfg.track)
    if cfg.train.distributed == "deepspeed":
        from strop.training.ds_engine import read_ds_config

        read_ds_config(cfg.train.deepspeed, cfg.train, dist.world)  # a bad DeepSpeed JSON stops here
    return RunSetup(cfg, run_dir, ckpt, dist, ds, task, mode, model_folder, tokenizer, device, precision, metric,
                    model, peft_hook)


def check_mode(cfg: Config, ds: Dataset, task: Task, mode: str, world: int) -> None:
    """What the training mode needs of the data and settings (few-shot: its own checks and mean pooling)."""
    if cfg.train.early_stopping_patience and "validation" not in ds.splits and mode != "fewshot":
        raise ConfigError(f"train.early_stopping_patience={cfg.train.early_stopping_patience} needs a validation "
                          "split to watch, and this run has none; give data.validation, keep data.validation_ratio "
                          "> 0, or set train.early_stopping_patience=0")
    if mode == "fewshot":
        train_labels = getattr(ds.splits["train"], "labels", None)
        check_fewshot(cfg, task, train_labels, ds.labels, world)
        if cfg.model.pooling != "mean":
            console.print("[dim]train.mode=fewshot: model.pooling=mean (the sentence encoder's own pooling)[/dim]")
            cfg.model.pooling = "mean"


def train(config: Config | str | Path | None = None, overrides: list[str] | dict | None = None,
          overwrite: bool = False, resume: bool | str | Path = False, on_eval=None) -> RunResult:
    """Fine-tune a model as the config says; returns the run folder and its results.

    `config`: a Config, a YAML path, or None for defaults; `overrides`: ['train.lr=3e-4', ...] or {'train.lr': 3e-4};
    `resume`: True to continue the run the config names from its newest complete checkpoint, or a run folder path;
    `on_eval(step, value)`: called after each validation with the validation metric (hyperparameter search prunes
    there by raising).
    """
    s = setup_run(config, overrides, overwrite, resume, tuning=on_eval is not None)
    s.dist.barrier()  # every rank has checked the run folder before rank 0 (re)creates it
    if not s.dist.main:
        return _train_other_rank(s)
    start_step = open_run_dir(s.run_dir, s.ckpt)
    caller_stopped = False

    def report(step: int, value: float) -> None:
        nonlocal caller_stopped
        try:
            on_eval(step, value)
        except BaseException:
            caller_stopped = True  # a deliberate stop (tune's pruning): the partial folder is the trial's record
            raise

    try:
        results, tracker = _train_in_folder(s, start_step, report if on_eval else None)
    except BaseException:
        if s.ckpt is None and not caller_stopped:
            discard_failed_run(s.run_dir)
        raise
    write_atomic(s.run_dir / "results.json", json.dumps(results, indent=2))
    s.model = s.peft_hook = None  # the report loads model/ itself: free the training copy (and its optimizer) first
    release_memory()  # and give the pages back, so the report's peak does not stack on training's high-water mark
    if s.cfg.eval.report:
        _write_report(s.run_dir, s.cfg.eval.report_explain)
    tracker.finish(s.run_dir)  # after model/, results.json and the report: MLflow logs them; then trackers close
    _print_summary(s.run_dir, results, s.metric)
    return RunResult(s.run_dir, results)


def _train_in_folder(s: RunSetup, start_step: int, on_eval) -> tuple[dict, Trackers]:
    """config.yaml, data.json, training, the final evaluation and model/ in the run folder; (results, tracker)."""
    cfg, ds, task, run_dir = s.cfg, s.ds, s.task, s.run_dir
    write_atomic(run_dir / "config.yaml", dump_yaml(cfg))  # first file of a new run: the resolved config
    for note in ds.notes:
        console.print(f"[dim]{escape(note)}[/dim]")
    meta = run_meta(cfg, ds, task, s.mode)
    encoded = {split: task.encode(s.tokenizer, ex, meta) for split, ex in ds.splits.items()}
    for split, enc in encoded.items():
        task.check_encoded(enc, ds.splits[split], split, s.tokenizer)
    write_atomic(run_dir / "data.json", json.dumps(data_summary(ds, task, encoded), indent=2))
    for split, enc in encoded.items():
        if enc.n_truncated:
            console.print(f"[yellow]{split}: {enc.n_truncated} of {len(enc)} examples are longer than "
                          f"model.max_length={cfg.model.max_length} tokens and were truncated[/yellow]")
    trainable, total = count_parameters(s.model)
    model_name = f"{task.default_model} (default)" if cfg.model.path == "default" else s.model_folder.name
    labels = f" with {len(ds.labels)} label(s)" if ds.labels else ""
    console.print(f"model: {model_name}, {total / 1e6:.1f}M parameters; task {ds.task}{labels}; "
                  f"{len(ds.splits['train'])} training examples; {s.device.type} {s.precision}")
    console.print(f"peft.method={cfg.peft.method}: trainable parameters {trainable:,} of {total:,} "
                  f"({100 * trainable / total:.2f}%)")
    tracker = Trackers(run_dir, cfg.track, purge_step=start_step + 1 if start_step else None, config=cfg)
    try:
        fitted, threshold, final = _fit_and_evaluate(s, encoded, tracker, on_eval)
    except BaseException:
        tracker.close(failed=True)
        raise
    meta["threshold"] = threshold
    probe = next(iter(encoded.values()))  # a few real examples check that merging adapters changes no logits
    probe_inputs = {k: v.to(s.device) for k, v in task.collate(probe, np.arange(min(8, len(probe)))).items()
                    if k in task.model_inputs}
    save_trained(s.model, s.tokenizer, run_dir, meta, cfg.peft, probe_inputs, str(s.model_folder))
    results = run_results(fitted, len(encoded["train"]), s.metric, s.precision, threshold, final, start_step)
    results.update(trainable_params=trainable, total_params=total, train_mode=s.mode,
                   small_splits=small_splits(ds, task, final))
    return results, tracker


def _fit_and_evaluate(s: RunSetup, encoded: dict, tracker, on_eval):
    """(FitResult, decision threshold, final metrics per split): the training loop (or few-shot training), then the
    final evaluation with the weights it kept."""
    cfg, ds, task = s.cfg, s.ds, s.task
    if "validation" not in encoded:
        console.print("[yellow]no validation split: no evaluation during training[/yellow]")
    if s.mode == "fewshot":
        fitted = train_fewshot(s.model, encoded["train"], cfg, task, ds.labels, s.device, s.precision, tracker,
                               s.run_dir, resume_from=s.ckpt)
    else:
        fitted = fit(s.model, task.training_rows(encoded["train"], cfg), encoded.get("validation"), cfg, task,
                     ds.labels, s.device, s.precision, tracker, s.metric, s.run_dir, resume_from=s.ckpt,
                     peft_hook=s.peft_hook, on_eval=on_eval, dist=s.dist)
    if is_sharded(s.model):  # FSDP: the full weights into a plain model for the final evaluation and model/
        s.model = unshard(s.model, s.dist, lambda: build_model(task, cfg, ds.labels).to(s.device))
    # LoRA through the fused linear, as the evaluations during training ran: the same numbers, and PEFT's
    # forward would cast every frozen weight on every batch (about 100 MB more at the peak on SST-2)
    with fused_lora_in(s.model, cfg.train.fused_lora):
        threshold, final = final_evaluation(s.model, s.tokenizer, encoded, ds, task, cfg, s.device, s.precision)
    for split, metrics in final.items():
        tracker.log({"step": fitted.state.step, "split": f"final_{split}", **metrics})
    return fitted, threshold, final


def _write_report(run_dir: Path, explain_k: int) -> None:
    from strop.evaluate.report import build_report

    try:
        build_report(run_dir, explain_k=explain_k)
    except Exception as e:  # noqa: BLE001 - model/ and results.json are written: a failed report must not fail
        console.print(f"[yellow]report.html not written ({escape(type(e).__name__)}: {escape(str(e))}); the run "
                      f"itself is complete. Rebuild the report with: strop report {escape(str(run_dir))}[/yellow]")


def _train_other_rank(s: RunSetup) -> RunResult:
    """Ranks > 0 of a multi-process run: the same loop on their slice of each batch; they write and log nothing."""
    meta = run_meta(s.cfg, s.ds, s.task, "standard")
    encoded = {split: s.task.encode(s.tokenizer, ex, meta) for split, ex in s.ds.splits.items()}
    fit(s.model, s.task.training_rows(encoded["train"], s.cfg), encoded.get("validation"), s.cfg, s.task,
        s.ds.labels, s.device, s.precision, NoTracker(), s.metric, s.run_dir, resume_from=s.ckpt,
        peft_hook=s.peft_hook, dist=s.dist)
    if is_sharded(s.model):
        unshard(s.model, s.dist, rebuild=None)  # collective: rank 0 gathers the full weights
    return RunResult(s.run_dir, {"rank": s.dist.rank})


def final_evaluation(model, processor, encoded: dict, ds: Dataset, task: Task, cfg: Config, device, precision
                     ) -> tuple[float, dict]:
    """(decision threshold, {split: metrics}) with the final weights; a task that thresholds its outputs
    (multi-label; two-class images with eval.tune_threshold) has it tuned on validation. A generating task generates on test (else validation)."""
    threshold, val = 0.5, encoded.get("validation")
    if val is not None and task.tunes_threshold_for(cfg, ds.labels):
        _, probs = task.evaluate(model, val, ds.labels, cfg.eval.batch_size, device, precision, keep_outputs=True)
        threshold = task.choose_threshold(probs, val.labels)
        console.print(f"decision threshold tuned on validation: {threshold:.2f}")
    final, scored = {}, "test" if "test" in encoded else "validation"
    for split in ("validation", "test"):
        if split in encoded:
            final[split] = task.final_evaluate(model, processor, encoded[split], ds.labels, cfg, device, precision,
                                               threshold, generate=split == scored)
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


def _print_summary(run_dir: Path, results: dict, metric: str) -> None:
    from rich.table import Table

    keys = [metric] + [k for k in ("accuracy", "token_accuracy", "macro_f1", "mcc", "micro_f1", "exact_match",
                                   "pearson", "spearman", "rmse", "bleu", "rouge_l", "chrf", "stopped", "loss")
                       if k != metric]
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
            table.add_row(split, *[f"{results[split][k]:.4f}" if k in results[split] else "-" for k in shown])
        console.print(table)
    else:
        console.print(title)
    for split, why in small.items():
        console.print(f"[yellow]{split} metrics not shown: {escape(why)}, too few for the numbers to mean anything "
                      f"(results.json keeps them)[/yellow]")
    console.print(f"run folder: [bold]{escape(str(run_dir))}[/bold]  (model: {escape(str(run_dir / 'model'))})")
    if (run_dir / "report.html").is_file():
        console.print(f"report: {escape(str(run_dir / 'report.html'))}")
