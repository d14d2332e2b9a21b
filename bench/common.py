"""Pieces shared by the benchmarks in bench/: machine description, step count, the Hugging Face Trainer side set up
from a strop config, child processes, peak memory and the machine's measured peak matmul FLOP/s.

The benchmarks run as scripts (`python bench/<name>.py`), so they import this file as `common`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def machine() -> dict:
    import torch
    import transformers

    import strop

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "strop": strop.__version__,
            "python": platform.python_version(), "os": platform.platform(),
            # other work on the machine skews the timings; the load average says how busy it was
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def total_steps(cfg, n_train: int) -> int:
    """Optimizer steps of a run, computed exactly as strop's loop does (training/loop.py)."""
    steps_per_epoch = math.ceil(n_train / cfg.train.batch_size)
    return cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(cfg.train.epochs * steps_per_epoch)


# ---------------------------------------------------------------------------------------------------------------
# the Hugging Face Trainer side, set up from one resolved strop config


def _hf_label_ids(values: list) -> dict:
    """label value -> id, in strop's order (sorted; numeric names sort numerically)."""
    names = sorted({str(v) for v in values}, key=lambda s: (0, float(s), s) if _is_number(s) else (1, 0.0, s))
    return {name: i for i, name in enumerate(names)}


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def hf_datasets(cfg, tokenizer):
    """train/validation/test as tokenized `datasets.Dataset`s with a 'labels' column (plain HF recipe)."""
    import datasets
    from datasets import load_dataset

    datasets.disable_progress_bars()
    d = cfg.data
    files = {split: path for split, path in (("train", d.train), ("validation", d.validation), ("test", d.test))
             if path}
    raw = load_dataset("json", data_files=files)
    label2id = _hf_label_ids(raw["train"][d.label_column])

    def tokenize(batch):
        pairs = batch[d.text_pair_column] if d.text_pair_column else None
        out = tokenizer(batch[d.text_column], pairs, truncation=True, max_length=cfg.model.max_length)
        out["labels"] = [label2id[str(v)] for v in batch[d.label_column]]
        return out

    return {split: ds.map(tokenize, batched=True, remove_columns=ds.column_names) for split, ds in raw.items()}, \
        label2id


def hf_arguments(cfg, steps: int, out_dir: str):
    """TrainingArguments equal to strop's resolved config `cfg` (fails on settings the HF side cannot match).

    train.precision=bf16 -> bf16 autocast on CPU; anything else (fp32, auto) -> fp32.
    train.batching=length_grouped -> train_sampling_strategy='group_by_length'; random -> 'random'.
    """
    from transformers import TrainingArguments

    from strop.config import resolve_method_defaults
    from strop.training.optim import warmup_steps

    resolve_method_defaults(cfg)  # train.lr left empty: the method's default, as strop's run uses
    t = cfg.train
    if t.head_lr is not None or cfg.model.pooling != "cls":
        raise SystemExit("the HF side matches only train.head_lr=None and model.pooling=cls")
    micro = t.micro_batch_size or t.batch_size
    schedule = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[t.scheduler]
    return TrainingArguments(
        output_dir=out_dir, use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
        seed=t.seed, data_seed=t.seed, bf16=t.precision == "bf16", fp16=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=t.batch_size // micro,
        per_device_eval_batch_size=cfg.eval.batch_size,
        learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
        adam_epsilon=t.eps, max_grad_norm=t.max_grad_norm, lr_scheduler_type=schedule,
        warmup_steps=warmup_steps(t.warmup, steps),  # the same integer number of steps as strop
        max_steps=steps, num_train_epochs=t.epochs, logging_steps=t.log_every,
        train_sampling_strategy="group_by_length" if t.batching == "length_grouped" else "random",
        dataloader_num_workers=0)


def hf_trainer(cfg, n_train: int, out_dir: str):
    """(trainer, tokenized splits) for the HF Trainer with strop's resolved config `cfg`; nothing trained yet.

    Threads, model folder, seed (so the new head's initial weights equal strop's), step count and hyperparameters
    all come from `cfg`; `n_train` (strop's count of training examples) guards against the two sides reading
    different data.
    """
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              set_seed)

    from strop.config import resolve_method_defaults
    from strop.models.backbone import default_model_path

    resolve_method_defaults(cfg)  # empty train.lr / train.epochs: the defaults strop's run fills in
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)  # as strop does
    folder = str(default_model_path()) if cfg.model.path == "default" else cfg.model.path
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data, label2id = hf_datasets(cfg, tokenizer)
    if len(data["train"]) != n_train:
        raise SystemExit(f"HF side read {len(data['train'])} training examples, strop {n_train}")
    steps = total_steps(cfg, n_train)
    set_seed(cfg.train.seed)  # the new head's initial weights
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(label2id), use_safetensors=True, dtype=torch.float32,
        id2label={i: n for n, i in label2id.items()}, label2id=label2id)

    def accuracy(pred) -> dict:
        # label_ids, not the dataset's labels: with group_by_length, evaluate/predict return rows length-grouped
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    trainer = Trainer(model=model, args=hf_arguments(cfg, steps, out_dir), train_dataset=data["train"],
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=accuracy)
    return trainer, data


HF_ARGS_SHOWN = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
                 "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "lr_scheduler_type", "warmup_steps",
                 "max_steps", "seed", "data_seed", "optim", "bf16", "use_cpu", "train_sampling_strategy")


# ---------------------------------------------------------------------------------------------------------------
# child processes, memory, peak FLOP/s


def load_runs(path: Path) -> dict:
    """A resumable benchmark's results file ({"runs": {key: result}, ...}); empty when it is not there yet."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"runs": {}}


def save_runs(path: Path, results: dict) -> None:
    """Write the results file whole, atomically, so an interrupted benchmark never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
    tmp.replace(path)


def run_child(script: str | Path, args: list[str], title: str, what: str) -> dict:
    """Run `python script *args --out FILE` in a fresh process (no shared allocator/thread state) and return the
    JSON it writes to FILE. `title` is printed before it starts; `what` names it if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(script).resolve()), *args, "--out", str(out)]
        print(f"\n=== {title} ===", flush=True)
        proc = subprocess.run(cmd, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"the {what} failed (exit code {proc.returncode})")
        return json.loads(out.read_text())


def peak_rss_mb() -> dict:
    """This process's peak resident memory in MiB: `vmhwm` from /proc/self/status (Linux) and `ru_maxrss`.

    Prefer vmhwm in a child process: Linux carries the parent's high-water mark into a child's ru_maxrss across
    fork/vfork + exec, so ru_maxrss of a small child can report the parent's peak; VmHWM belongs to the child's own
    address space only.
    """
    import resource

    out = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin"
                                                                             else 1024 * 1024)}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["vmhwm"] = int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return out


from strop.bench import measure_peak_flops  # noqa: E402,F401  (one implementation, shared with `strop bench`)


