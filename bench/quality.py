"""Quality and speed of strop against the Hugging Face Trainer, same settings on both sides.

    python bench/quality.py --task sst2            # HF Trainer vs strop on SST-2 (configs/sst2.yaml)
    python bench/quality.py --task all             # sst2 comparison, then strop alone on trec, stsb, mrpc
    python bench/quality.py --task sst2 --epochs 0.05   # smoke check: a tiny fraction of an epoch
    python bench/quality.py --task sst2 --seeds 42,1,2  # both sides on each seed: mean and spread of dev accuracy

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
import sys
import tempfile
import time
from pathlib import Path

from common import HF_ARGS_SHOWN, REPO, RESULTS, hf_trainer, machine, run_child as _run_child, total_steps

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


def strop_overrides(task: str, epochs: float | None, compare: bool) -> dict:
    """Overrides applied to configs/<task>.yaml for the benchmark run.

    compare=True (a run measured against the HF Trainer) also makes strop train like the HF side is set up: fp32,
    all steps (no early stopping, no best-weights restore), one dev evaluation at the end, no TensorBoard.
    """
    from strop.config import load_config
    from strop.tasks import prepare

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


def run_hf(task: str, over: dict, n_train: int) -> dict:
    import torch

    from strop.config import load_config

    start = time.perf_counter()
    cfg = load_config(REPO / "configs" / f"{task}.yaml", over)
    steps = total_steps(cfg, n_train)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer, data = hf_trainer(cfg, n_train, out_dir)
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


# ---------------------------------------------------------------------------------------------------------------
# the parent: run each side in a child process, compare, report


def run_child(side: str, task: str, over: dict, n_train: int = 0) -> dict:
    """Run one side in a fresh Python process (no shared allocator/thread state); returns its result dict."""
    return _run_child(__file__, ["--side", side, "--task", task, "--overrides", json.dumps(over),
                                 "--n-train", str(n_train)],
                      f"{task}: {'Hugging Face Trainer' if side == 'hf' else 'strop'}", f"{side} side of {task}")


def bench_task(task: str, args, mach: dict, command: str) -> dict:
    from strop.config import load_config, resolve_method_defaults, to_dict
    from strop.tasks import prepare

    compare = task in HF_TASKS and not args.skip_hf
    # by default strop runs its shipped config as a user would (bf16 where the CPU has it, early stopping with the
    # best weights restored); --match-hf makes strop train exactly like the HF side (fp32, all steps, last weights)
    over = strop_overrides(task, args.epochs, compare=task in HF_TASKS and args.match_hf)
    cfg = load_config(REPO / "configs" / f"{task}.yaml", over)
    resolve_method_defaults(cfg)  # train.lr left empty: the method's default, as strop's run uses
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


def bench_seeds(task: str, seeds: list[int], args, mach: dict, command: str) -> dict:
    """The comparison once per seed (each side in its own child, one after the other); mean and spread per side."""
    import statistics

    compare = task in HF_TASKS and not args.skip_hf
    runs = []
    for seed in seeds:
        over = strop_overrides(task, args.epochs, compare=task in HF_TASKS and args.match_hf)
        from strop.config import parse_override

        over.update(dict(map(parse_override, args.set)))
        over["train.seed"] = seed
        from strop.config import load_config
        from strop.tasks import prepare

        n_train = len(prepare(load_config(REPO / "configs" / f"{task}.yaml", over)).splits["train"])
        one = {"seed": seed, "overrides": over}
        if compare and args.only != "strop":
            one["hf"] = run_child("hf", task, over, n_train)
        if args.only != "hf":
            one["strop"] = run_child("strop", task, over, n_train)
        runs.append(one)
        print(f"seed {seed}: " + ", ".join(f"{side} dev {one[side]['validation']['accuracy']:.4f}"
                                           for side in ("hf", "strop") if side in one))
    summary = {}
    for side in ("hf", "strop") if compare else ("strop",):
        for split in ("validation", "test"):
            accs = [r[side][split]["accuracy"] for r in runs if side in r and r[side].get(split)]
            if accs:
                summary[f"{side} {split} accuracy"] = {
                    "per_seed": accs, "mean": statistics.mean(accs),
                    "stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0, "min": min(accs), "max": max(accs)}
    report = {"task": task, "seeds": seeds, "machine": mach, "command": command, "runs": runs, "summary": summary,
              "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"quality_{task}_seeds{'_' + args.only if args.only else ''}.json"
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    for name, st in summary.items():
        print(f"{name:28} mean {100 * st['mean']:.2f}  stdev {100 * st['stdev']:.2f}  "
              f"per seed {', '.join(f'{100 * a:.2f}' for a in st['per_seed'])}")
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
    p.add_argument("--seeds", help="comma-separated seeds: run the comparison once per seed and report mean/spread "
                                   "(writes quality_<task>_seeds.json)")
    p.add_argument("--only", choices=("hf", "strop"), help="with --seeds: run one side only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for both sides, e.g. --set train.threads=1")
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
        if args.seeds:
            bench_seeds(task, [int(x) for x in args.seeds.split(",")], args, mach, command)
        else:
            bench_task(task, args, mach, command)


if __name__ == "__main__":
    main()
