"""Few-shot text classification: the SetFit library vs strop's train.mode=fewshot vs naive full fine-tuning.

    python bench/fewshot.py                                   # 8 shots, seeds 0-4, all five datasets, all methods
    python bench/fewshot.py --shots 64 --seeds 0,1 --datasets sst2,trec
    python bench/fewshot.py --test-limit 1000                 # evaluate on a fixed random 1,000 test texts per set
    python bench/fewshot.py --summarize bench/results/fewshot_8shot.json   # tables for BENCHMARKS.md
    python bench/fewshot.py --shots 64 --resume               # continue a stopped run: only the missing runs
    python bench/fewshot.py --merge ALL.json A.json B.json    # one file from runs done in parallel (other seeds)

For every (dataset, seed) the same k examples per class are drawn from the training set (numpy default_rng([seed,
k]) per class, seeds printed) and each method trains on exactly those and is scored on the same test texts:

- setfit: the SetFit library (PyPI `setfit`) with its default TrainingArguments and logistic-regression head, on the
  same local all-MiniLM-L6-v2 folder strop's `model.path: default` resolves to. Only `report_to="none"` (no
  tracker logins), `output_dir` (a temp folder) and `seed` (the sample's seed) are set. It runs in its own venv
  (bench/.venv-setfit, see SETFIT_PYTHON) because it is not a strop dependency.
- setfit20: the same, with `num_iterations=20`: 20 positive and 20 negative pairs per training example, the recipe
  of the SetFit paper and of SetFit before 1.0. The default (sampling_strategy="oversampling") trains on every pair
  the classes allow, which grows with the square of the sample: at 64 shots that is 8,320 pairs for a 2-class set
  (about 830 CPU-s here) but 122,880 for a 6-class one (about 3.4 CPU-hours per run); setfit20 makes the 4- and
  6-class sets at 64 shots affordable. Not in the default --methods.
- strop: `strop train` with train.mode=fewshot and its defaults (plus --set overrides), through the Python API.
- naive: `strop train` with train.mode=standard (full fine-tuning, pooling=cls) on the same sample, NAIVE_OVERRIDES.

Each (method, dataset, seed) runs in a fresh child process, one after another (never concurrently), with one thread
(OMP_NUM_THREADS=1, torch.set_num_threads(1)). Training time is the training call only (SetFit: trainer.train();
strop: results.json train_seconds / train_cpu_seconds: contrastive loop + head), in wall and process-CPU seconds;
model loading and test-set prediction are timed apart. Results are appended to the JSON file after every child, so a
partial run still has numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" if (REPO.parent / "shared").is_dir() else Path("/work/shared/datasets")
SETFIT_PYTHON = Path(os.environ.get("SETFIT_PYTHON", REPO / "bench" / ".venv-setfit" / "bin" / "python"))
DATASETS = ("sst2", "emotion", "ag_news", "trec", "sms_spam")
METHODS = ("setfit", "strop", "naive")  # the default --methods; setfit20 is also accepted
ALL_METHODS = METHODS + ("setfit20",)
NAIVE_OVERRIDES = {"train.epochs": 10, "train.batch_size": 8}  # strop's standard recipe, enough steps to move
SMS_TEST_SHARE = 0.2  # sms_spam has no official split: a stratified 80/20 split with seed 0


# ---------------------------------------------------------------------------------------------------------------
# data: (texts, label names) per split, read as each folder's README describes


def _jsonl(path: Path, text: str, label: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r[text], str(r[label])) for r in rows]


def _emotion(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]  # first line is a header
    return [tuple(line.rsplit(";", 1)) for line in lines if line.strip()]


def _sms() -> tuple[list, list]:
    lines = (DATA / "sms_spam" / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()[1:]  # header
    rows = [(m, lab) for lab, m in (line.split("\t", 1) for line in lines if line.strip())]
    rng = np.random.default_rng(0)
    train, test = [], []
    for label in sorted({lab for _, lab in rows}):
        idx = [i for i, (_, lab) in enumerate(rows) if lab == label]
        idx = rng.permutation(idx)
        n_test = round(len(idx) * SMS_TEST_SHARE)
        test += [rows[i] for i in sorted(idx[:n_test])]
        train += [rows[i] for i in sorted(idx[n_test:])]
    return train, test


def load_splits(name: str) -> tuple[list, list]:
    """(train, test) lists of (text, label name)."""
    d = DATA / name
    if name == "sst2":
        return _jsonl(d / "train.jsonl", "text", "label"), _jsonl(d / "test.jsonl", "text", "label")
    if name == "emotion":
        return _emotion(d / "train.txt"), _emotion(d / "test.txt")
    if name == "ag_news":
        return (_jsonl(d / "train_subset_5k.jsonl", "text", "label_name"),
                _jsonl(d / "test.jsonl", "text", "label_name"))
    if name == "trec":
        return _jsonl(d / "train.jsonl", "text", "coarse_label"), _jsonl(d / "test.jsonl", "text", "coarse_label")
    if name == "sms_spam":
        return _sms()
    raise SystemExit(f"unknown dataset {name!r}; choose from {DATASETS}")


def sample_shots(train: list, shots: int, seed: int) -> list:
    """`shots` examples of every class, drawn without replacement; the same (seed, shots) gives the same sample."""
    out = []
    for k, label in enumerate(sorted({lab for _, lab in train})):
        idx = [i for i, (_, lab) in enumerate(train) if lab == label]
        rng = np.random.default_rng([seed, shots, k])
        out += [train[i] for i in rng.choice(idx, size=min(shots, len(idx)), replace=False)]
    return out


def limit_test(test: list, limit: int) -> list:
    """The full test set, or a fixed uniform random `limit` of it (seed 0, the same for every method and seed)."""
    if not limit or limit >= len(test):
        return test
    keep = np.sort(np.random.default_rng(0).permutation(len(test))[:limit])
    return [test[i] for i in keep]


def scores(gold: list[str], pred: list[str]) -> dict:
    labels = sorted(set(gold))
    gold_a, pred_a = np.array(gold), np.array(pred)
    f1s = []
    for lab in labels:
        tp = int(((pred_a == lab) & (gold_a == lab)).sum())
        fp, fn = int(((pred_a == lab) & (gold_a != lab)).sum()), int(((pred_a != lab) & (gold_a == lab)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": float((gold_a == pred_a).mean()), "macro_f1": float(np.mean(f1s))}


# ---------------------------------------------------------------------------------------------------------------
# the three sides, each in its own child process


def child_setfit(train: list, test: list, seed: int, model_path: str, num_iterations: int | None = None) -> dict:
    import torch

    torch.set_num_threads(1)
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    t0 = time.perf_counter()
    model = SetFitModel.from_pretrained(model_path)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"num_iterations": num_iterations} if num_iterations else {}  # None: the library's own default
        args = TrainingArguments(output_dir=tmp, report_to="none", seed=seed, **extra)
        data = Dataset.from_dict({"text": [t for t, _ in train], "label": [lab for _, lab in train]})
        trainer = Trainer(model=model, args=args, train_dataset=data)
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    t0 = time.perf_counter()
    pred = [str(p) for p in model.predict([t for t, _ in test])]
    return {"train_wall_s": wall, "train_cpu_s": cpu, "load_s": load_s, "predict_s": time.perf_counter() - t0,
            **scores([lab for _, lab in test], pred)}


def child_strop(train: list, test: list, seed: int, overrides: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from strop.run import train as strop_train

    with tempfile.TemporaryDirectory() as tmp:
        for split, rows in (("train", train), ("test", test)):
            with open(Path(tmp) / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows)
        over = {"data.train": f"{tmp}/train.jsonl", "data.test": f"{tmp}/test.jsonl", "data.validation_ratio": 0,
                "train.threads": 1, "train.seed": seed, "eval.report": False, "track": ["none"],
                "output_dir": f"{tmp}/runs", "name": "bench", **overrides}
        t0 = time.perf_counter()
        result = strop_train(overrides=over).results
        total = time.perf_counter() - t0
    test_scores = result["test"]
    return {"train_wall_s": result["train_seconds"], "train_cpu_s": result["train_cpu_seconds"],
            "total_wall_s": total, "accuracy": test_scores["accuracy"], "macro_f1": test_scores["macro_f1"],
            "precision": result["precision"], "steps": result["steps"], "train_mode": result.get("train_mode")}


def run_child(args: argparse.Namespace) -> None:
    train_all, test = load_splits(args.dataset)
    train = sample_shots(train_all, args.shots, args.seed)
    test = limit_test(test, args.test_limit)
    if args.child in ("setfit", "setfit20"):
        out = child_setfit(train, test, args.seed, args.model_path, 20 if args.child == "setfit20" else None)
    elif args.child == "strop":
        out = child_strop(train, test, args.seed, {"train.mode": "fewshot", **json.loads(args.overrides)})
    else:
        out = child_strop(train, test, args.seed, {"train.mode": "standard", **NAIVE_OVERRIDES})
    out.update(n_train=len(train), n_test=len(test))
    Path(args.out).write_text(json.dumps(out), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# the parent: runs children in sequence, appends results, summarises


def spawn(method: str, dataset: str, shots: int, seed: int, test_limit: int, overrides: dict,
          model_path: str) -> dict:
    python = str(SETFIT_PYTHON) if method.startswith("setfit") else sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO / "src"), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [python, str(Path(__file__).resolve()), "--child", method, "--dataset", dataset, "--shots", str(shots),
               "--seed", str(seed), "--test-limit", str(test_limit), "--overrides", json.dumps(overrides),
               "--model-path", model_path, "--out", str(out)]
        log = Path(tmp) / "log.txt"
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            print(log.read_text()[-3000:], flush=True)
            return {"error": f"exit code {proc.returncode}"}
        return json.loads(out.read_text())


def complete_seeds(records: list[dict]) -> dict[str, list[int]]:
    """Per dataset, the seeds on which every method that ran on it has a result: the seeds a fair comparison on that
    dataset averages over (while a run is in progress, datasets can have different numbers of finished seeds)."""
    ok = [r for r in records if "error" not in r]
    have = {(r["dataset"], r["method"], r["seed"]) for r in ok}
    out = {}
    for ds in {r["dataset"] for r in ok}:
        methods = {r["method"] for r in ok if r["dataset"] == ds}
        out[ds] = sorted(s for s in {r["seed"] for r in ok if r["dataset"] == ds}
                         if all((ds, m, s) in have for m in methods))
    return out


def summarize(records: list[dict]) -> dict:
    """{shots: {per_dataset: {dataset: {method: {accuracy_mean, accuracy_std, ..., train_wall_s, seeds}}}, average}},
    each dataset over the seeds all its methods finished (complete_seeds)."""
    out: dict = {}
    seeds = complete_seeds(records)
    for r in records:
        if "error" in r or r["seed"] not in seeds.get(r["dataset"], ()):
            continue
        cell = out.setdefault(str(r["shots"]), {}).setdefault(r["dataset"], {}).setdefault(r["method"], [])
        cell.append(r)
    summary: dict = {}
    for shots, by_ds in out.items():
        table: dict = {}
        for ds, by_m in by_ds.items():
            for m, rs in by_m.items():
                acc, f1 = [x["accuracy"] for x in rs], [x["macro_f1"] for x in rs]
                table.setdefault(ds, {})[m] = {
                    "accuracy_mean": statistics.mean(acc), "accuracy_std": statistics.pstdev(acc),
                    "macro_f1_mean": statistics.mean(f1), "macro_f1_std": statistics.pstdev(f1),
                    "train_wall_s": sum(x["train_wall_s"] for x in rs), "train_cpu_s": sum(x["train_cpu_s"] for x in rs),
                    "seeds": sorted(x["seed"] for x in rs)}
        # averages over the datasets every method has the same seeds on; a method that ran on only some datasets
        # (setfit's default recipe where setfit20 stands in for it) is averaged apart, with the others on its datasets
        everywhere = sorted(m for m in {m for d in table.values() for m in d} if all(m in d for d in table.values()))
        common = [ds for ds, d in table.items() if len({tuple(d[m]["seeds"]) for m in everywhere}) == 1]
        summary[shots] = {"per_dataset": table, "average_over": common, "average": _average(table, everywhere, common)}
        partial = sorted({m for d in table.values() for m in d} - set(everywhere))
        for m in partial:
            on = [ds for ds, d in table.items() if m in d and len({tuple(v["seeds"]) for v in d.values()}) == 1]
            if on:
                summary[shots].setdefault("partial", {})[m] = {"average_over": on,
                                                               "average": _average(table, [m, *everywhere], on)}
    return summary


def _average(table: dict, methods: list[str], datasets: list[str]) -> dict:
    if not datasets:
        return {}
    return {m: {"accuracy": statistics.mean(table[ds][m]["accuracy_mean"] for ds in datasets),
                "macro_f1": statistics.mean(table[ds][m]["macro_f1_mean"] for ds in datasets),
                "train_wall_s": sum(table[ds][m]["train_wall_s"] for ds in datasets),
                "train_cpu_s": sum(table[ds][m]["train_cpu_s"] for ds in datasets)} for m in methods}


def markdown(summary: dict) -> str:
    lines = []
    for shots, s in summary.items():
        lines += [f"\n**{shots} examples per class**\n",
                  "| dataset | method | seeds | accuracy (mean ± std) | macro F1 (mean ± std) | train wall s | "
                  "train CPU s |", "|---|---|---|---|---|---|---|"]
        for ds, by_m in s["per_dataset"].items():
            for m, v in by_m.items():
                lines.append(f"| {ds} | {m} | {','.join(map(str, v['seeds']))} | {100 * v['accuracy_mean']:.1f} ± "
                             f"{100 * v['accuracy_std']:.1f} | {100 * v['macro_f1_mean']:.1f} ± "
                             f"{100 * v['macro_f1_std']:.1f} | {v['train_wall_s']:.0f} | {v['train_cpu_s']:.0f} |")
        for over, avg in [(s["average_over"], s["average"])] + [
                (p["average_over"], p["average"]) for p in s.get("partial", {}).values()]:
            if not avg:
                continue
            lines += [f"\nAverage over {', '.join(over)}:\n",
                      "| method | accuracy | macro F1 | total train wall s | total train CPU s |", "|---|---|---|---|---|"]
            for m, v in avg.items():
                lines.append(f"| {m} | {100 * v['accuracy']:.1f} | {100 * v['macro_f1']:.1f} | "
                             f"{v['train_wall_s']:.0f} | {v['train_cpu_s']:.0f} |")
    return "\n".join(lines)


def merge_files(out: Path, inputs: list[Path]) -> None:
    """One results file from several (parallel processes on different seeds write different files)."""
    docs = [json.loads(f.read_text(encoding="utf-8")) for f in ([out] if out.is_file() else []) + inputs]
    if not docs:
        raise SystemExit("--merge: nothing to merge")
    merged, seen = dict(docs[0]), set()
    merged["runs"], merged["commands"] = [], []
    for f, d in zip(([out] if out.is_file() else []) + inputs, docs):
        for key in ("shots", "test_limit", "strop_overrides", "naive_overrides"):
            if d.get(key) != merged.get(key):
                raise SystemExit(f"--merge: {f} has {key}={d.get(key)!r}, the first file {merged.get(key)!r}")
        for r in d["runs"]:
            if "error" not in r and (r["dataset"], r["seed"], r["method"]) not in seen:
                seen.add((r["dataset"], r["seed"], r["method"]))
                merged["runs"].append(r)
        merged["commands"] += d.get("commands", [d.get("command")])
    merged["command"] = "bench/fewshot.py --merge " + " ".join(map(str, [out, *inputs]))
    for key in ("seeds", "datasets", "methods"):
        merged[key] = sorted({r[key[:-1]] for r in merged["runs"]}, key=str)
    merged["summary"] = summarize(merged["runs"])
    out.write_text(json.dumps(merged, indent=2), encoding="utf-8")
    print(f"{out}: {len(merged['runs'])} runs from {len(docs)} files")
    print(markdown(merged["summary"]))


def machine() -> dict:
    import platform

    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "threads_per_process": 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--test-limit", type=int, default=0, help="0 = full test sets")
    p.add_argument("--set", nargs="*", default=[], help="strop overrides for the fewshot side, e.g. fewshot.epochs=8")
    p.add_argument("--results", default=None, help="JSON file; default bench/results/fewshot_<shots>shot.json")
    p.add_argument("--resume", action="store_true", help="keep the finished runs of an existing results file (same "
                   "shots, test limit and overrides) and run only the missing ones")
    p.add_argument("--summarize", default=None, help="print the tables of an existing results file and exit")
    p.add_argument("--merge", nargs="+", metavar=("OUT", "IN"), help="write OUT with the runs of OUT (if it exists) and "
                   "every IN (same shots, test limit and overrides; a (dataset, seed, method) run twice keeps the "
                   "first), then exit")
    # child-process arguments
    p.add_argument("--child", choices=ALL_METHODS)
    p.add_argument("--dataset")
    p.add_argument("--seed", type=int)
    p.add_argument("--overrides", default="{}")
    p.add_argument("--model-path")
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        return run_child(args)
    if args.merge:
        return merge_files(Path(args.merge[0]), [Path(f) for f in args.merge[1:]])
    if args.summarize:
        data = json.loads(Path(args.summarize).read_text())
        return print(markdown(summarize(data["runs"])))

    sys.path.insert(0, str(REPO / "src"))
    from strop.config import parse_override
    from strop.models.backbone import default_model_path

    overrides = dict(parse_override(o) for o in args.set)
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets = args.datasets.split(",")
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(ALL_METHODS)}")
    if any(m.startswith("setfit") for m in methods) and not SETFIT_PYTHON.is_file():
        raise SystemExit(f"{SETFIT_PYTHON} not found: create the SetFit venv (see BENCHMARKS.md) or set SETFIT_PYTHON")
    results = Path(args.results or REPO / "bench" / "results" / f"fewshot_{args.shots}shot.json")
    model_path = str(default_model_path())
    doc = {"benchmark": "fewshot", "command": " ".join(sys.argv), "machine": machine(), "shots": args.shots,
           "seeds": seeds, "datasets": datasets, "methods": methods, "test_limit": args.test_limit,
           "strop_overrides": overrides, "naive_overrides": NAIVE_OVERRIDES, "model_path": model_path, "runs": []}
    done = set()
    if args.resume and results.is_file():  # long runs (64 shots) span sessions: keep what an earlier run finished
        old = json.loads(results.read_text(encoding="utf-8"))
        for key in ("shots", "test_limit", "strop_overrides", "naive_overrides"):
            if old.get(key) != doc[key]:
                raise SystemExit(f"--resume: {results} has {key}={old.get(key)!r}, this run {doc[key]!r}")
        doc["runs"] = [r for r in old["runs"] if "error" not in r]
        doc["commands"] = old.get("commands", [old.get("command")]) + [doc["command"]]
        done = {(r["dataset"], r["seed"], r["method"]) for r in doc["runs"]}
        print(f"--resume: {len(done)} finished runs kept from {results}", flush=True)
    print(f"shots={args.shots} seeds={seeds} datasets={datasets} methods={methods} test_limit={args.test_limit}",
          flush=True)
    for seed in seeds:  # seed by seed: a run stopped early still has every dataset and method on its first seeds
        for ds in datasets:
            for method in methods:
                if (ds, seed, method) in done:
                    continue
                t0 = time.perf_counter()
                r = spawn(method, ds, args.shots, seed, args.test_limit, overrides, model_path)
                r.update(dataset=ds, seed=seed, method=method, shots=args.shots,
                         child_wall_s=time.perf_counter() - t0)
                doc["runs"].append(r)
                doc["summary"] = summarize(doc["runs"])
                results.write_text(json.dumps(doc, indent=2), encoding="utf-8")
                shown = (f"acc {100 * r['accuracy']:.1f} f1 {100 * r['macro_f1']:.1f} train {r['train_wall_s']:.1f}"
                         f" s wall {r['train_cpu_s']:.1f} s CPU" if "error" not in r else r["error"])
                print(f"{ds} seed={seed} {method}: {shown} (child {r['child_wall_s']:.0f} s)", flush=True)
    print(markdown(doc["summary"]))


if __name__ == "__main__":
    main()
