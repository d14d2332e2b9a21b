"""Full fine-tuning vs LoRA vs AdaLoRA vs bottleneck adapters vs freezing on SST-2, same data, epochs and seed.

    python bench/peft_sst2.py                       # all five methods on configs/sst2.yaml
    python bench/peft_sst2.py --methods none,lora   # a subset
    python bench/peft_sst2.py --epochs 0.05         # smoke check
    python bench/peft_sst2.py --threads 1           # one thread per run: CPU seconds stay comparable on a busy machine

Each method runs as strop would for a user (configs/sst2.yaml: bf16 autocast where the CPU has it, early stopping
with patience 2, best weights restored) in its own child process, one after the other, with the per-method overrides
in METHODS (the usual learning rates: PEFT methods train few parameters and want ~10x full fine-tuning's lr).
Reported per method: dev/test accuracy, trainable parameters and fraction, wall and CPU seconds per epoch (training
loop incl. its evaluations, over the epochs actually run), peak RSS of the child. Results: bench/results/peft_sst2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import REPO, RESULTS, machine, peak_rss_mb, run_child

METHODS = {
    "none": {"peft.method": "none"},
    "lora": {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16, "train.lr": 5e-4},
    "adalora": {"peft.method": "adalora", "peft.init_r": 12, "peft.r": 8, "train.lr": 5e-4},
    "adapter": {"peft.method": "adapter", "peft.adapter_size": 64, "train.lr": 5e-4},
    "freeze": {"peft.method": "freeze", "peft.unfrozen_layers": 2, "train.lr": 1e-4},
    # variants measured for speed: LoRA's input dropout costs a mask over every adapted layer's input
    "lora-nodrop": {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16, "peft.dropout": 0.0, "train.lr": 5e-4},
    "lora-qv": {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16, "peft.dropout": 0.0,
                "peft.target_modules": ["query", "value"], "train.lr": 5e-4},
    "lora-qv-lr1e3": {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16, "peft.dropout": 0.0,
                      "peft.target_modules": ["query", "value"], "train.lr": 1e-3},
    # session 4: learning rates closer to the PEFT papers' for small encoders (AdaLoRA: lr 8e-4, orth. reg. 0.1 on
    # SST-2 in Zhang et al. 2023)
    "lora-lr1e3": {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16, "peft.dropout": 0.0, "train.lr": 1e-3},
    "adalora-lr1e3": {"peft.method": "adalora", "peft.init_r": 12, "peft.r": 8, "peft.orth_reg_weight": 0.1,
                      "train.lr": 1e-3},
    # session 5: closing the gap to full fine-tuning at the same 3 epochs: LoRA+ (B learns faster), LayerNorms and
    # biases trained too (frozen ones keep the pretrained activation statistics), and a higher lr
    "lora-plus": {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16, "peft.lr_ratio": 16, "train.lr": 2.5e-4},
    "lora-norms": {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16, "peft.train_norms": True,
                   "train.lr": 5e-4},
    "lora-norms-plus": {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16, "peft.train_norms": True,
                        "peft.lr_ratio": 16, "train.lr": 2.5e-4},
    "lora-lr2e3": {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16, "train.lr": 2e-3},
    # what limits LoRA at 3 epochs: the same LoRA given twice the steps (not the same-epochs comparison)
    # session 6: the same recipe without the backbone's hidden dropout (a cheaper step), a constant schedule, rank 10
    "lora-norms-hd0": {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16, "peft.train_norms": True,
                       "train.lr": 5e-4, "model.hidden_dropout": 0.0},
    "lora-norms-const": {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16, "peft.train_norms": True,
                         "train.lr": 5e-4, "train.scheduler": "constant"},
    "lora-norms-r10": {"peft.method": "lora", "peft.r": 10, "peft.alpha": 20, "peft.train_norms": True,
                       "train.lr": 5e-4},
    "lora-norms-6ep": {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16, "peft.train_norms": True,
                       "train.lr": 5e-4, "train.epochs": 6},
}


def _order(key: str) -> tuple[int, str]:
    """Table order: METHODS order, then seed; methods since removed from METHODS (their results stay) last."""
    names = list(METHODS)
    base = key.split("@")[0]
    return (names.index(base) if base in names else len(names)), key


def run_one(method: str, over: dict) -> dict:
    """One method in this (child) process."""
    import resource

    import torch

    import strop

    cpu0, wall0 = time.process_time(), time.perf_counter()
    run = strop.train(REPO / "configs" / "sst2.yaml", over, overwrite=True)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    r = run.results
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"method": method, "overrides": over, "validation": r["validation"], "test": r.get("test"),
            "trainable_params": r["trainable_params"], "total_params": r["total_params"],
            "trainable_fraction": r["trainable_params"] / r["total_params"], "epochs": r["epochs"],
            "steps": r["steps"], "best_step": r["best_step"], "stopped_early": r["stopped_early"],
            "train_seconds": r["train_seconds"], "seconds_per_epoch": r["train_seconds"] / r["epochs"],
            # CPU time of the whole child (load + train + final eval + save), per epoch run; with one thread it
            # barely moves when other work shares the machine, unlike wall time
            "cpu_seconds_per_epoch": cpu / r["epochs"], "wall_seconds": wall,
            "user_sys_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mb": peak_rss_mb(),
            "precision": r["precision"], "threads": torch.get_num_threads(), "run_dir": str(run.run_dir)}


def probe_one(method: str, over: dict, steps: int) -> dict:
    """Training speed and memory of one method, without evaluation or saving: `steps` optimizer steps on SST-2
    train batches (batch 16, max length 128, length-grouped, the shipped precision), in this (child) process."""
    import torch

    from strop.bench import training_probe

    torch.set_num_threads(over.get("train.threads") or os.cpu_count() or 1)
    keep = {k: v for k, v in over.items() if k.startswith(("peft.", "model."))}
    result = training_probe(steps, batch_size=16, overrides=keep, data="../shared/datasets/sst2/train.jsonl",
                            max_length=128)
    return {**result, "method": method, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=float, help="override train.epochs for every method (smoke checks)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run; 0 = all cores")
    p.add_argument("--probe", type=int, default=0, metavar="STEPS",
                   help="instead of full runs: time STEPS training steps per method (speed and memory only)")
    p.add_argument("--seed", type=int, help="train.seed for every method; results are keyed METHOD@seedN "
                   "(default: the config's seed, keyed METHOD)")
    p.add_argument("--fresh", action="store_true", help="start a new results file instead of merging into it")
    p.add_argument("--table", action="store_true", help="only recompute the ratios and print the table of the "
                   "results file")
    p.add_argument("--method", help=argparse.SUPPRESS)  # internal: one method, in a child
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.chdir(REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.method:
        over = json.loads(args.overrides)
        result = probe_one(args.method, over, args.probe) if args.probe else run_one(args.method, over)
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
        return

    command = "python bench/peft_sst2.py " + " ".join(sys.argv[1:])
    # probes write their own file: full runs of other methods may be writing peft_sst2.json at the same time
    path = RESULTS / ("peft_sst2_probe.json" if args.probe else "peft_sst2.json")
    if args.table:
        return finish(path, json.loads(path.read_text(encoding="utf-8")))
    # methods can run as separate invocations (e.g. in parallel with --threads 1); their results are merged
    previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not args.fresh else {}
    report = {"task": "sst2", "config": "configs/sst2.yaml", "machine": machine(), "command": command,
              "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "methods": previous.get("methods", {}),
              "commands": previous.get("commands", []) + [command]}
    ran: set[str] = set()
    for base in args.methods.split(","):
        method = base if args.seed is None else f"{base}@seed{args.seed}"
        ran.add(method)
        over = {"name": f"bench-peft-{method}", "track": ["none"], "train.threads": args.threads, **METHODS[base]}
        if args.seed is not None:
            over["train.seed"] = args.seed
        if args.epochs is not None:
            over["train.epochs"] = args.epochs
        child = ["--method", method, "--overrides", json.dumps(over), "--probe", str(args.probe)]
        result = run_child(__file__, child, f"sst2: peft.method={method}", f"{method} run")
        if args.probe:  # speed/memory probes go to their own key; nothing else of the report changes
            report.setdefault("probe", {})[method] = {**result, "machine": machine(), "command": command}
            report = merge_latest(path, report, ran)
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2), encoding="utf-8")
            print(json.dumps(result))
            continue
        report["methods"][method] = result
        report["methods"][method]["machine"] = machine()  # load average when it finished
        report["methods"][method]["command"] = command
        RESULTS.mkdir(parents=True, exist_ok=True)
        report = merge_latest(path, report, ran)
        path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finish(path, merge_latest(path, report, ran))


def finish(path: Path, report: dict) -> None:
    """Ratios against full fine-tuning, the results file and the table."""
    base = report.get("probe", {}).get("none")
    for r in report.get("probe", {}).values():
        if base:
            r["vs_full"] = {"cpu_s_per_step ratio": r["cpu_s_per_step"] / base["cpu_s_per_step"],
                            "wall_s_per_step ratio": r["wall_s_per_step"] / base["wall_s_per_step"],
                            "peak_rss ratio": r["peak_rss_mb"]["vmhwm"] / base["peak_rss_mb"]["vmhwm"]}
    for m, r in report["methods"].items():
        # against full fine-tuning on the same seed when it ran (side by side: the same load), else the plain run
        full = report["methods"].get("none@" + m.split("@")[1]) if "@" in m else None
        full = full or report["methods"].get("none")
        if not full or "cpu_seconds_per_epoch" not in r:  # an early run recorded wall time only
            continue
        r["vs_full"] = {
            "dev accuracy (points)": 100 * (r["validation"]["accuracy"] - full["validation"]["accuracy"]),
            "seconds_per_epoch ratio": r["seconds_per_epoch"] / full["seconds_per_epoch"],
            "cpu_seconds_per_epoch ratio": r["cpu_seconds_per_epoch"] / full["cpu_seconds_per_epoch"],
            "peak_rss ratio": r["peak_rss_mb"]["vmhwm"] / full["peak_rss_mb"]["vmhwm"]}
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print_table(report)
    print(f"wrote {path.relative_to(REPO)}")


def merge_latest(path: Path, report: dict, ran: set[str]) -> dict:
    """What another invocation wrote meanwhile is kept; ours wins only for the methods this invocation ran (our copy
    of the others was read at our start and may be stale: two runs side by side would undo each other's results)."""
    if path.is_file():
        on_disk = json.loads(path.read_text(encoding="utf-8"))
        for key in ("methods", "probe"):
            report[key] = {**report.get(key, {}), **on_disk.get(key, {}),
                           **{m: r for m, r in report.get(key, {}).items() if m in ran}}
    return report


def print_table(report: dict) -> None:
    m = report["machine"]
    if report.get("probe"):
        print(f"\nspeed/memory probe (SST-2 train batches of 16, max length 128):")
        print(f"{'method':10}{'trainable':>12}{'cpu s/step':>12}{'wall s/step':>12}{'peak MiB':>10}{'cpu ×':>8}"
              f"{'rss ×':>8}{'load avg':>20}")
        for name, r in sorted(report["probe"].items(), key=lambda kv: _order(kv[0])):
            v = r.get("vs_full", {})
            print(f"{name:10}{r['trainable_params']:12,}{r['cpu_s_per_step']:12.3f}{r['wall_s_per_step']:12.3f}"
                  f"{r['peak_rss_mb']['vmhwm']:10.0f}{v.get('cpu_s_per_step ratio', 1):8.2f}"
                  f"{v.get('peak_rss ratio', 1):8.2f}{str(r['machine']['loadavg_at_start']):>20}")
    print(f"\nSST-2, configs/sst2.yaml | {m['cpu']}, {m['cores']} cores, torch {m['torch']}; "
          f"load average {m['loadavg_at_start']} -> {report['loadavg_at_end']}")
    print(f"{'method':10}{'dev acc':>9}{'test acc':>9}{'trainable':>12}{'%':>7}{'epochs':>8}{'s/epoch':>9}"
          f"{'cpu s/ep':>10}{'peak MiB':>10}{'Δdev':>7}{'s/ep ×':>8}{'cpu ×':>7}{'rss ×':>7}")
    for name, r in sorted(report["methods"].items(), key=lambda kv: _order(kv[0])):
        v = r.get("vs_full", {})
        if "validation" not in r or "cpu_seconds_per_epoch" not in r:
            continue
        print(f"{name:10}{100 * r['validation']['accuracy']:9.2f}{100 * (r['test'] or {}).get('accuracy', 0):9.2f}"
              f"{r['trainable_params']:12,}{100 * r['trainable_fraction']:7.2f}{r['epochs']:8.2f}"
              f"{r['seconds_per_epoch']:9.1f}{r['cpu_seconds_per_epoch']:10.1f}{r['peak_rss_mb']['vmhwm']:10.0f}"
              f"{v.get('dev accuracy (points)', 0):+7.2f}{v.get('seconds_per_epoch ratio', 1):8.2f}"
              f"{v.get('cpu_seconds_per_epoch ratio', 1):7.2f}{v.get('peak_rss ratio', 1):7.2f}")


if __name__ == "__main__":
    main()
