"""Test-split accuracy over several shared sets and seeds: strop's defaults, its PEFT methods at candidate learning
rates, ablations of what strop does differently by default, and the Hugging Face Trainer.

    python bench/heldout.py --sets sst2,trec,emotion --variants strop,lora@5e-4,lora@1e-3 --seeds 42,1,2
    python bench/heldout.py --sets all --variants strop,hf --seeds 42,1,2
    python bench/heldout.py --summary                 # the tables from bench/results/heldout.json, nothing run

Every set is written once as train / validation / test JSONL files (text, label) under --data-dir (outside the
repository; read from ../shared/datasets). Sets without an official validation split get a seeded, stratified one
carved from train (10%); sms_spam, which has no split at all, gets a seeded stratified 80/10/10. Both sides get the
same train file; strop also gets the validation file (it picks its best step there); the Trainer trains the same rows
and keeps its last weights. Scores are on the test file only, never on the set that picked the best step.

Variants (everything else at strop's code defaults: 3 epochs, batch 32, max length 128, warmup 0.06):
  strop              the defaults a user gets (`strop train data.train=... data.validation=... data.test=...`)
  <method>@<lr>      peft.method=<method> with train.lr=<lr> (lora, adalora, adapter, freeze); <method> alone = its
                     default lr
  hf                 Transformers' Trainer: same model, files, epochs, batch, lr, seed; bf16 autocast, length-grouped
  strop-<ablation>   one default changed: norestore (last weights), warmup0, nofused, dense (dense embeddings), fp32
Each (set, variant, seed) runs in its own child process; results are added to bench/results/heldout.json as they
finish, and runs already there are skipped, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, RESULTS, hf_trainer, load_runs, machine, run_child, save_runs

SHARED = REPO.parent / "shared" / "datasets"
OUT = RESULTS / "heldout.json"
SETS = ("sst2", "trec", "emotion", "ag_news", "sms_spam")
ABLATIONS = {"norestore": {"train.restore_best": False}, "warmup0": {"train.warmup": 0},
             "nofused": {"train.fused_kernels": False}, "dense": {"model.sparse_embeddings": False},
             "fp32": {"train.precision": "fp32"}}
PEFT_METHODS = ("lora", "adalora", "adapter", "freeze")


# ---------------------------------------------------------------------------------------------------------------
# data: each set as train / validation / test JSONL with text + label


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _semicolon(path: Path) -> list[dict]:  # emotion: `text;label`, a header line first
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        text, _, label = line.rpartition(";")
        rows.append({"text": text, "label": label})
    return rows


def _carve(rows: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(rest, carved): a seeded split that keeps each label's share."""
    rng, by_label = random.Random(seed), {}
    for row in rows:
        by_label.setdefault(str(row["label"]), []).append(row)
    rest, carved = [], []
    for group in by_label.values():
        rng.shuffle(group)
        k = max(1, round(share * len(group)))
        carved += group[:k]
        rest += group[k:]
    rng.shuffle(rest)
    rng.shuffle(carved)
    return rest, carved


def read_set(name: str) -> dict[str, list[dict]]:
    d = SHARED / name
    if name == "sst2":
        return {"train": _jsonl(d / "train.jsonl"), "validation": _jsonl(d / "dev.jsonl"),
                "test": _jsonl(d / "test.jsonl")}
    if name == "trec":
        rows = [{"text": r["text"], "label": r["coarse_label"]} for r in _jsonl(d / "train.jsonl")]
        train, val = _carve(rows, 0.1, 13)
        return {"train": train, "validation": val,
                "test": [{"text": r["text"], "label": r["coarse_label"]} for r in _jsonl(d / "test.jsonl")]}
    if name == "emotion":
        return {s: _semicolon(d / f) for s, f in (("train", "train.txt"), ("validation", "val.txt"),
                                                  ("test", "test.txt"))}
    if name == "ag_news":
        rows = [{"text": r["text"], "label": r["label_name"]} for r in _jsonl(d / "train_subset_5k.jsonl")]
        train, val = _carve(rows, 0.1, 13)
        return {"train": train, "validation": val,
                "test": [{"text": r["text"], "label": r["label_name"]} for r in _jsonl(d / "test.jsonl")]}
    if name == "sms_spam":
        rows = []
        for line in (d / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()[1:]:
            label, _, text = line.partition("\t")
            if text.strip():
                rows.append({"text": text, "label": label})
        rest, test = _carve(rows, 0.1, 13)
        train, val = _carve(rest, 1 / 9, 13)
        return {"train": train, "validation": val, "test": test}
    raise SystemExit(f"unknown set {name!r}; choose from {SETS}")


def write_set(name: str, data_dir: Path) -> dict[str, str]:
    folder = data_dir / name
    if not (folder / "test.jsonl").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in read_set(name).items():
            (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": r["label"]})
                                                         + "\n" for r in rows), encoding="utf-8")
    return {split: str(folder / f"{split}.jsonl") for split in ("train", "validation", "test")}


# ---------------------------------------------------------------------------------------------------------------
# one run, in a child process


def variant_overrides(variant: str) -> dict:
    if variant in ("strop", "hf"):
        return {}
    if variant.startswith("strop-"):
        return dict(ABLATIONS[variant.removeprefix("strop-")])
    method, _, lr = variant.partition("@")
    if method not in PEFT_METHODS:
        raise SystemExit(f"unknown variant {variant!r}")
    return {"peft.method": method, **({"train.lr": float(lr)} if lr else {})}


def run_one(set_name: str, variant: str, seed: int, files: dict, work: Path, threads: int = 0) -> dict:
    from strop.config import load_config

    over = {"data.train": files["train"], "data.validation": files["validation"], "data.test": files["test"],
            "data.text_column": "text", "data.label_column": "label", "train.seed": seed, "eval.report": False,
            "output_dir": str(work), "name": f"{set_name}-{variant.replace('@', '-')}-{seed}",
            **variant_overrides(variant), **({"train.threads": threads} if threads else {})}
    start = time.perf_counter()
    if variant == "hf":
        return run_hf(load_config(None, {**over, "train.precision": "bf16"}), start)
    import strop

    run = strop.train(None, over, overwrite=True)
    r = run.results
    return {"test": r["test"], "validation": r["validation"], "best_step": r["best_step"], "steps": r["steps"],
            "lr": run_config_lr(run.run_dir), "train_seconds": r["train_seconds"],
            "train_samples_per_s": r["train_samples_per_s"], "wall_seconds": time.perf_counter() - start}


def run_config_lr(run_dir: Path) -> float:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["train"]["lr"]


def run_hf(cfg, start: float) -> dict:
    from strop.tasks import prepare

    n_train = len(prepare(cfg).splits["train"])
    with tempfile.TemporaryDirectory() as out_dir:
        trainer, data = hf_trainer(cfg, n_train, out_dir)
        train = trainer.train().metrics
        test = trainer.evaluate(data["test"], metric_key_prefix="test")
    return {"test": {"accuracy": test["test_accuracy"]}, "steps": trainer.state.global_step, "lr": cfg.train.lr,
            "train_seconds": train["train_runtime"], "train_samples_per_s": train["train_samples_per_second"],
            "wall_seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------------------
# the parent: queue, results file, summary


def load_results() -> dict:
    return load_runs(OUT)


def save_results(results: dict) -> None:
    save_runs(OUT, results)


def summary(results: dict) -> str:
    """Markdown: test accuracy mean ± std (n seeds) per variant and set."""
    cells: dict = {}
    for key, r in results["runs"].items():
        set_name, variant, _ = key.split("/")
        cells.setdefault(variant, {}).setdefault(set_name, []).append(100 * r["test"]["accuracy"])
    sets = [s for s in SETS if any(s in v for v in cells.values())]
    lines = ["| variant | " + " | ".join(sets) + " | mean of sets |", "|---|" + "---:|" * (len(sets) + 1)]
    for variant, by_set in sorted(cells.items()):
        row, means = [], []
        for s in sets:
            xs = by_set.get(s, [])
            if not xs:
                row.append("")
                continue
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            row.append(f"{statistics.mean(xs):.2f} ± {sd:.2f} ({len(xs)})")
            means.append(statistics.mean(xs))
        full = len(means) == len(sets)
        lines.append(f"| {variant} | " + " | ".join(row) + f" | {statistics.mean(means):.2f} |" if full else
                     f"| {variant} | " + " | ".join(row) + " | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="sst2,trec,emotion")
    p.add_argument("--variants", default="strop,hf")
    p.add_argument("--seeds", default="42,1,2")
    p.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "strop-heldout-data"))
    p.add_argument("--summary", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="train.threads of both sides (0: all cores); 1 lets "
                   "two benchmarks share the 2-core machine without two-thread kernels stalling each other")
    p.add_argument("--child", help=argparse.SUPPRESS)  # set/variant/seed, run in this process
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        set_name, variant, seed = args.child.split("/")
        work = Path(tempfile.mkdtemp(prefix="heldout-run-"))
        try:
            result = run_one(set_name, variant, int(seed), write_set(set_name, Path(args.data_dir)), work,
                             args.threads)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        Path(args.out).write_text(json.dumps(result), encoding="utf-8")
        return
    results = load_results()
    if not args.summary:
        results.setdefault("machine", machine())
        results["command"] = "python bench/heldout.py " + " ".join(sys.argv[1:])
        sets = SETS if args.sets == "all" else tuple(args.sets.split(","))
        for seed in map(int, args.seeds.split(",")):
            for set_name in sets:
                for variant in args.variants.split(","):
                    key = f"{set_name}/{variant}/{seed}"
                    if key in results["runs"]:
                        continue
                    extra = ["--data-dir", args.data_dir, "--threads", str(args.threads)]
                    result = run_child(__file__, ["--child", key, *extra], key, key)
                    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
                    result["threads"] = args.threads or os.cpu_count()
                    keep = {k: results[k] for k in ("machine", "command")}
                    results = load_results()  # another process may have added runs meanwhile
                    results.update(keep)
                    results["runs"][key] = result
                    save_results(results)
                    print(f"{key}: test accuracy {100 * result['test']['accuracy']:.2f}", flush=True)
    print(summary(results))


if __name__ == "__main__":
    main()
