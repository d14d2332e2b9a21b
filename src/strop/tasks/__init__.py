"""The task registry: task names (config.yaml's `task`, strop.json's `task`) -> task objects (strop.tasks.base).

Every stage asks here instead of comparing task names. Adding a task: a module beside these with one object that
implements `Task`, listed in TASKS (DECISIONS.md walks through it; tests/test_tasks_contract.py checks it).
"""

from __future__ import annotations

from pathlib import Path

from strop.compress.onnx import export_file_of, load_export
from strop.compress.prune import load_head_pruned
from strop.device import resolve_device
from strop.errors import ConfigError
from strop.models.classifier import apply_freezing, read_meta
from strop.models.layers import mark_heads
from strop.models.peft import load_adapter, load_bottleneck
from strop.runs import open_run
from strop.tasks.base import ExportSignature, Task
from strop.tasks.classification import MULTI_LABEL, REGRESSION, SINGLE_LABEL
from strop.tasks.generation import GENERATION
from strop.tasks.image_classification import IMAGE_CLASSIFICATION, IMAGE_MULTI_LABEL
from strop.tasks.masked_lm import MASKED_LM
from strop.tasks.token_classification import TOKEN_CLASSIFICATION

# the order matters for task=auto: the first task whose `detects` says yes reads the data; single_label is the
# fallback, and its reader infers single / multi-label / regression from a table's labels; masked_lm is
# chosen by name only
TASKS: dict[str, Task] = {t.name: t for t in (TOKEN_CLASSIFICATION, IMAGE_CLASSIFICATION, IMAGE_MULTI_LABEL,
                                              GENERATION, SINGLE_LABEL, MULTI_LABEL, REGRESSION, MASKED_LM)}
FALLBACK = SINGLE_LABEL

__all__ = ["TASKS", "ExportSignature", "Task", "build_model", "detect_task", "get_task", "load_predictor",
           "load_trained", "prepare", "task_names"]


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def get_task(name: str) -> Task:
    """The task called `name`; an unknown name is a ConfigError that lists the known ones."""
    task = TASKS.get(name)
    if task is None:
        raise ConfigError(f"task={name!r} is not a task strop knows; choose from {['auto', *TASKS]}")
    return task


def detect_task(cfg) -> Task:
    """The task that reads cfg.data.train: cfg.task if set, else the first whose data it looks like."""
    if cfg.task != "auto":
        return get_task(cfg.task)
    return next((t for t in TASKS.values() if t.detects(cfg)), FALLBACK)


def prepare(cfg, carve: bool = True):
    """The validated Dataset the config names, read by the task whose data it is; `ds.task` names the task it
    turned out to be (task=auto on a table: single / multi-label / regression by its labels). Settings the
    task fills from the model (image.size) are filled first, as a run fills them (Task.resolve_defaults)."""
    task = detect_task(cfg)
    task.resolve_defaults(cfg)
    return task.prepare(cfg, carve)


def build_model(task: Task, cfg, labels: list[str]):
    """A fresh model of `task` on the configured backbone, its head flagged (models/layers.py) and the model
    section's freezing applied."""
    model = mark_heads(task.build_model(cfg, labels), task.head_names)
    return apply_freezing(model, cfg.model)


def load_trained(folder: str | Path):
    """(model in eval mode, processor, meta, task) from a `model/` folder (or a run's `adapter/`) that strop wrote.

    Adapters, head-pruned models and bottleneck adapters are the same for every task: the task builds its
    architecture, these put the saved weights in it."""
    folder = Path(folder)
    meta = read_meta(folder)
    task = get_task(meta["task"])
    if (folder / "adapter_config.json").is_file():  # a run's adapter/: the base it names + this small adapter
        model = load_adapter(folder, lambda base: task.load_model(base, meta, head=False), task.model_folder)
        return model.eval(), task.load_processor(folder), meta, task
    task.model_folder(folder)
    if meta.get("attention_heads_kept"):  # head-pruned (strop export --prune heads=...): shapes the config can't say
        model = load_head_pruned(folder, meta, task.num_outputs(meta["labels"]))
        return model.eval(), task.load_processor(folder), meta, task
    model = task.load_model(folder, meta)
    if (meta.get("peft") or {}).get("method") == "adapter":  # bottleneck adapters cannot be merged: re-apply them
        load_bottleneck(model, folder, meta["peft"])
    return model.eval(), task.load_processor(folder), meta, task


def load_predictor(path: str | Path, device: str = "cpu", precision: str = "fp32"):
    """The task's predictor for a run folder, its model/ folder, or an export folder (RUN/export, or one of its
    .onnx files: ONNX Runtime behind the same interface, CPU, fp32 graph or int8)."""
    onnx_file = export_file_of(path)
    if onnx_file is not None:
        model, meta = load_export(onnx_file)
        task = get_task(meta["task"])
        processor = task.load_processor(onnx_file.parent)  # saved beside the graph: tokenizer, image normalisation
    else:
        model, processor, meta, task = load_trained(open_run(path))
    return task.predictor(model, processor, meta, resolve_device(device), precision)
