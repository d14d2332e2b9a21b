"""Quality and speed of strop against the Hugging Face Trainer, same settings on both sides.

    python bench/quality.py --task sst2            # HF Trainer vs strop on SST-2 (configs/sst2.yaml)
    python bench/quality.py --task all             # sst2 comparison, then strop alone on trec, stsb, mrpc
    python bench/quality.py --task sst2 --epochs 0.05   # smoke check: a tiny fraction of an epoch

Both sides read their hyperparameters from one resolved strop config (configs/<task>.yaml plus the overrides below) and
use the same model folder, train/dev files, seed, step count, warmup steps, batch size and max length. strop runs its
shipped config as a user would (bf16 autocast where the CPU has it, early stopping, best weights restored); the HF
Trainer runs fp32 as most users run it. `--match-hf` makes strop train exactly like the HF side instead. They run
as child processes of this script one after the other (one process tree, never concurrently). Each side's
"train seconds" is its training loop plus one evaluation on dev, which is what strop's `train_seconds` measures.
Results go to bench/results/quality_<task>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TASKS = ("sst2", "trec", "stsb", "mrpc")
HF_TASKS = ("sst2",)  # tasks compared with the HF Trainer; the others run strop alone

# Differences that same settings cannot remove; stored with the results so a reader can weigh the gap.
KNOWN_DIFFERENCES = [
    "initial weights are identical (torch seeded the same before from_pretrained, so the new head matches), but "
    "the RNG streams differ after that: batch order and dropout masks are not the same on the two sides, so "
    "accuracies differ by seed-level noise; a gap is only meaningful against the spread over several seeds",
    "length grouping: strop sorts windows of 64 batches by length; the HF side uses Trainer's "
    "train_sampling_strategy='group_by_length' (LengthGroupedSampler, megabatches of 50)",
    "warmup: strop ramps lr as (step+1)/(warmup+1), HF as step/warmup over the same number of warmup steps",
    "end-to-end wall seconds include strop saving its model folder; the HF side saves nothing (save_strategy='no')",
]


# ---------------------------------------------------------------------------------------------------------------
# settings shared by both sides


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


def strop_overrides(task: str, epochs: float | None, compare: bool) -> dict:
    """Overrides applied to configs/<task>.yaml for the benchmark run.

    compare=True (a run measured against the HF Trainer) also makes strop train like the HF side is set up: fp32,
    all steps (no early stopping, no best-weights restore), one dev evaluation at the end, no TensorBoard.
    """
    from strop.config import load_config
    from strop.data.prepare import prepare

    over: dict = {"name": f"bench-{task}"}  # never overwrite a user's runs/<task>
    if epochs is not None:
        over["train.epochs"] = epochs
    if compare:
        over.update({"train.precision": "fp32", "train.early_stopping_patience": 0, "train.restore_best": False,
                     "track": ["none"]})
        cfg = load_config(REPO / "configs" / f"{task}.yaml", over)
        over["train.eval_every"] = total_steps(cfg, len(prepare(cfg).splits["train"]))  # dev eval at the last step
    return over


# ---------------------------------------------------------------------------------------------------------------
# the two sides; each runs in its own child process


def run_strop(task: str, over: dict) -> dict:
    import torch

    import strop

    start = time.perf_counter()
    run = strop.train(REPO / "configs" / f"{task}.yaml", over, overwrite=True)
    wall = time.perf_counter() - start
    r = run.results
    return {"validation": r.get("validation"), "test": r.get("test"), "train_seconds": r["train_seconds"],
            "train_samples_per_s": r["train_samples_per_s"], "wall_seconds": wall, "steps": r["steps"],
            "epochs": r["epochs"], "precision": r["precision"], "best_step": r["best_step"],
            "threads": torch.get_num_threads(), "run_dir": str(run.run_dir)}


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
    """TrainingArguments equal to strop's resolved config `cfg` (fails on settings the HF side cannot match)."""
    from transformers import TrainingArguments

    from strop.training.optim import warmup_steps

    t = cfg.train
    if t.head_lr is not None or cfg.model.pooling != "cls":
        raise SystemExit("the HF side matches only train.head_lr=None and model.pooling=cls")
    micro = t.micro_batch_size or t.batch_size
    schedule = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[t.scheduler]
    return TrainingArguments(
        output_dir=out_dir, use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
        seed=t.seed, data_seed=t.seed, bf16=False, fp16=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=t.batch_size // micro,
        per_device_eval_batch_size=cfg.eval.batch_size,
        learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
        adam_epsilon=t.eps, max_grad_norm=t.max_grad_norm, lr_scheduler_type=schedule,
        warmup_steps=warmup_steps(t.warmup, steps),  # the same integer number of steps as strop
        max_steps=steps, num_train_epochs=t.epochs, logging_steps=t.log_every,
        train_sampling_strategy="group_by_length" if t.batching == "length_grouped" else "random",
        dataloader_num_workers=0)


def run_hf(task: str, over: dict, n_train: int) -> dict:
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              set_seed)

    from strop.config import load_config
    from strop.models.backbone import default_model_path

    start = time.perf_counter()
    cfg = load_config(REPO / "configs" / f"{task}.yaml", over)
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
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = Trainer(model=model, args=hf_arguments(cfg, steps, out_dir), train_dataset=data["train"],
                          processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                          compute_metrics=accuracy)
        train = trainer.train().metrics
        dev = trainer.evaluate(data["validation"], metric_key_prefix="validation")
        test = trainer.evaluate(data["test"], metric_key_prefix="test") if "test" in data else None
    train_seconds = train["train_runtime"] + dev["validation_runtime"]  # strop's train_seconds holds one dev eval
    epochs_run = steps / math.ceil(n_train / cfg.train.batch_size)
    strip = lambda m, p: {k[len(p) + 1:]: v for k, v in m.items() if k.startswith(p + "_")}  # noqa: E731
    return {"validation": strip(dev, "validation"), "test": test and strip(test, "test"),
            "train_seconds": train_seconds, "train_samples_per_s": n_train * epochs_run / train_seconds,
            "wall_seconds": time.perf_counter() - start, "steps": trainer.state.global_step,
            "epochs": round(epochs_run, 4), "precision": "fp32", "threads": torch.get_num_threads(),
            "train_loss": train.get("train_loss"),
            "args": {k: v for k, v in trainer.args.to_dict().items() if k in HF_ARGS_SHOWN}}


HF_ARGS_SHOWN = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
                 "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "lr_scheduler_type", "warmup_steps",
                 "max_steps", "seed", "data_seed", "optim", "bf16", "use_cpu", "train_sampling_strategy")


# ---------------------------------------------------------------------------------------------------------------
# the parent: run each side in a child process, compare, report


def run_child(side: str, task: str, over: dict, n_train: int = 0) -> dict:
    """Run one side in a fresh Python process (no shared allocator/thread state); returns its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--task", task,
               "--overrides", json.dumps(over), "--n-train", str(n_train), "--out", str(out)]
        print(f"\n=== {task}: {'Hugging Face Trainer' if side == 'hf' else 'strop'} ===", flush=True)
        proc = subprocess.run(cmd, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"the {side} side of {task} failed (exit code {proc.returncode})")
        return json.loads(out.read_text())


def bench_task(task: str, args, mach: dict, command: str) -> dict:
    from strop.config import load_config, to_dict
    from strop.data.prepare import prepare

    compare = task in HF_TASKS and not args.skip_hf
    # by default strop runs its shipped config as a user would (bf16 where the CPU has it, early stopping with the
    # best weights restored); --match-hf makes strop train exactly like the HF side (fp32, all steps, last weights)
    over = strop_overrides(task, args.epochs, compare=task in HF_TASKS and args.match_hf)
    cfg = load_config(REPO / "configs" / f"{task}.yaml", over)
    n_train = len(prepare(cfg).splits["train"])
    report = {"task": task, "config": f"configs/{task}.yaml", "strop_overrides": over, "resolved_config": to_dict(cfg),
              "train_examples": n_train, "machine": mach, "command": command,
              "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if compare:
        report["hf"] = run_child("hf", task, over, n_train)
    report["strop"] = run_child("strop", task, over, n_train)
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if compare:
        report["known_differences"] = KNOWN_DIFFERENCES
        report["ratios"] = ratios(report["strop"], report["hf"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"quality_{task}.json"
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print_report(report)
    print(f"wrote {path.relative_to(REPO)}")
    return report


def ratios(s: dict, h: dict) -> dict:
    out = {"train_samples_per_s (strop/hf)": s["train_samples_per_s"] / h["train_samples_per_s"],
           "train_seconds (strop/hf)": s["train_seconds"] / h["train_seconds"],
           "wall_seconds (strop/hf)": s["wall_seconds"] / h["wall_seconds"],
           "dev accuracy (strop - hf, points)": 100 * (s["validation"]["accuracy"] - h["validation"]["accuracy"])}
    if s.get("test") and h.get("test"):
        out["test accuracy (strop - hf, points)"] = 100 * (s["test"]["accuracy"] - h["test"]["accuracy"])
    return out


def _fmt(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def report_rows(s: dict, h: dict | None) -> list[tuple[str, object, object, int]]:
    """(name, hf value, strop value, decimals); with no HF side, hf values are None."""
    shown = (h or s)["validation"] or {}  # in a comparison, only the metrics both sides computed
    metrics = [k for k in ("accuracy", "macro_f1", "pearson", "spearman", "rmse") if k in shown]
    get = lambda side, split, k: ((side or {}).get(split) or {}).get(k)  # noqa: E731
    rows = [(f"{split_name} {k}", get(h, split, k), get(s, split, k), 4)
            for split, split_name in (("validation", "dev"), ("test", "test")) for k in metrics]
    train_label = "train + 1 dev eval (s)" if h else "train loop incl. evals (s)"
    return rows + [(train_label, h and h["train_seconds"], s["train_seconds"], 1),
                   ("train samples/s", h and h["train_samples_per_s"], s["train_samples_per_s"], 1),
                   ("end-to-end wall (s)", h and h["wall_seconds"], s["wall_seconds"], 1),
                   ("optimizer steps", h and h["steps"], s["steps"], 0),
                   ("precision", h and h["precision"], s["precision"], 0)]


def print_report(rep: dict) -> None:
    s, h, m = rep["strop"], rep.get("hf"), rep["machine"]
    print(f"\n{rep['task']}: {rep['train_examples']} training examples, {s['epochs']} epochs"
          f"  |  {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({s['threads']} threads), "
          f"transformers {m['transformers']}, strop {m['strop']}")
    print(f"{'':28}{'HF Trainer':>12}{'strop':>12}{'strop/HF':>10}" if h else f"{'':28}{'strop':>12}")
    for name, hv, sv, digits in report_rows(s, h):
        if not h:
            print(f"{name:28}{_fmt(sv, digits):>12}")
            continue
        timed = "(s)" in name or "/s" in name
        ratio = f"{sv / hv:.2f}x" if timed and hv else ""
        print(f"{name:28}{_fmt(hv, digits):>12}{_fmt(sv, digits):>12}{ratio:>10}")
    for k, v in (rep.get("ratios") or {}).items():
        if "points" in k:
            print(f"  {k}: {v:+.2f}")
    print(f"load average at start / end: {m['loadavg_at_start']} / {rep['loadavg_at_end']}")
    print(f"strop overrides of {rep['config']}: {rep['strop_overrides']}")
    print(f"reproduce: {rep['command']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS + ("all",), default="sst2")
    p.add_argument("--epochs", type=float, help="override train.epochs on both sides (fractions allowed; smoke checks)")
    p.add_argument("--match-hf", action="store_true",
                   help="train strop like the HF side (fp32, no early stopping, last weights) instead of its shipped config")
    p.add_argument("--skip-hf", action="store_true", help="run strop only (same settings as in the comparison)")
    p.add_argument("--side", choices=("hf", "strop"), help=argparse.SUPPRESS)  # internal: one side, in a child
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    p.add_argument("--n-train", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.chdir(REPO)  # config paths (../shared/datasets/..., runs/) are relative to the repository root
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.side:
        over = json.loads(args.overrides)
        result = run_hf(args.task, over, args.n_train) if args.side == "hf" else run_strop(args.task, over)
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
        return
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    mach = machine()
    for task in TASKS if args.task == "all" else (args.task,):
        bench_task(task, args, mach, command)


if __name__ == "__main__":
    main()
