"""Compression benchmark on SST-2 dev: fp32 PyTorch eager vs ONNX fp32 vs ONNX int8 vs PyTorch int8 vs pruned vs
distilled — accuracy, size on disk, p50/p95 latency at batch 1 and throughput at batch 32, with ratios.

    strop train configs/sst2.yaml name=sst2-export          # the run (about 4-5 min on 2 idle cores)
    flock /tmp/strop-bench.lock python bench/compress.py --run runs/sst2-export

With an existing run that must stay untouched (e.g. a longer-trained teacher), `--copy-run-to DIR` copies its model,
config and results to DIR and exports there; `--quantisation-only` stops after the ONNX/int8 phase:

    flock /tmp/strop-bench.lock python bench/compress.py --run ../main/runs/seed-1 --copy-run-to /tmp/seed-1 \
        --quantisation-only --threads 1 --out compress_int8.json

Step 1 is `strop export` itself (ONNX parity-checked, int8, structured pruning + recovery fine-tune, distilled
student), which writes RUN/export/. Step 2 re-times every variant round-robin (rounds interleave the variants, so a
burst of load on the machine hits all of them alike) and sweeps pruning strength without recovery for the
accuracy-vs-sparsity curve. Writes bench/results/compress.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

DEV = "../shared/datasets/sst2/dev.jsonl"


def timed_round_robin(models: dict, enc, rounds: int, n_latency: int, n_throughput: int) -> dict:
    """{name: {latency p50/p95 ms at batch 1, throughput at batch 32}} from `rounds` interleaved rounds."""
    from strop.compress.timing import latency_samples, throughput

    lat = {k: [] for k in models}
    thr = {k: [] for k in models}
    for r in range(rounds):
        for name, model in models.items():
            lat[name] += latency_samples(model, enc, n_latency, warmup=5)
            thr[name].append(throughput(model, enc, 32, n_throughput))
        print(f"  timing round {r + 1}/{rounds} done (load {os.getloadavg()[0]:.2f})", flush=True)
    return {k: {"latency_ms_p50": float(np.percentile(lat[k], 50)), "latency_ms_p95": float(np.percentile(lat[k], 95)),
                "latency_samples": len(lat[k]), "throughput_bs32": float(np.median(thr[k])),
                "throughput_rounds": [round(x, 1) for x in thr[k]]} for k in models}


def sparsity_sweep(model_dir: Path, enc, meta: dict) -> list[dict]:
    """Accuracy on dev vs pruning strength, without recovery: magnitude, FFN-neuron and head pruning."""
    from strop.compress.prune import magnitude_prune, parameter_count, prune_ffn, prune_heads
    from strop.tasks import get_task, load_trained

    out = []
    for kind, values in (("magnitude", (0.5, 0.7)), ("ffn", (0.25, 0.5)), ("heads", (0.25, 0.5))):
        for value in values:
            model = load_trained(model_dir)[0]
            before = parameter_count(model)
            {"magnitude": magnitude_prune, "ffn": prune_ffn, "heads": prune_heads}[kind](model, value)
            metrics, _ = get_task(meta["task"]).evaluate(model, enc, meta["labels"], 64, torch.device("cpu"))
            out.append({"kind": kind, "fraction": value, "accuracy": metrics["accuracy"],
                        "parameters": parameter_count(model), "parameters_before": before})
            print(f"  sweep {kind}={value}: accuracy {metrics['accuracy']:.4f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/sst2-export")
    ap.add_argument("--data", default=DEV, help="labelled held-out file (default: SST-2 dev)")
    ap.add_argument("--prune", default="heads=0.25,ffn=0.5")
    ap.add_argument("--recover-epochs", type=float, default=1.0)
    ap.add_argument("--distill", type=int, default=3)
    ap.add_argument("--distill-epochs", type=float, default=2.0)
    ap.add_argument("--distill-augment", type=int, default=0, help="augmented copies per training example that the "
                    "teacher labels for the student (strop export --distill-augment)")
    ap.add_argument("--distill-lr", type=float, default=None, help="learning rate of recovery and distillation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-examples", type=int, default=100, help="dev examples timed at batch 1 per round")
    ap.add_argument("--skip-export", action="store_true", help="reuse RUN/export from an earlier run of this script")
    ap.add_argument("--copy-run-to", default=None, help="copy RUN's model/, config.yaml and results.json here and "
                    "export the copy (RUN itself is not written)")
    ap.add_argument("--quantisation-only", action="store_true", help="only the ONNX fp32/int8 phase (no pruning or "
                    "distillation, which train)")
    ap.add_argument("--out", default="compress.json", help="results file name in bench/results/")
    ap.add_argument("--markdown", action="store_true", help="print bench/results/OUT as a markdown table")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads((RESULTS / args.out).read_text())))
        return
    torch.set_num_threads(args.threads)
    mach = machine()
    command = "flock /tmp/strop-bench.lock python bench/compress.py " + " ".join(sys.argv[1:])

    from strop.compress.export import ExportOptions, export_run
    from strop.compress.onnx import OnnxModel
    from strop.compress.prune import parse_prune
    from strop.compress.quantize import torch_dynamic_int8
    from strop.tasks import load_trained

    run = Path(args.run)
    if args.copy_run_to:
        run = _copy_run(run, Path(args.copy_run_to))
    teacher, tokenizer, meta, task = load_trained(run / "model")
    predictor = task.predictor(teacher, tokenizer, meta, torch.device("cpu"))
    _, dev = predictor.file_examples(args.data, need_label=True)
    enc = task.encode(tokenizer, dev, meta)
    base_opts = dict(data=args.data, timing=False, threads=args.threads)
    # phase 1 (minutes): ONNX + int8 only, timed and written, so a slow machine still yields these numbers
    # phase 2: pruning with recovery and the distilled student (training), everything timed again together
    phases = [("quantisation", ExportOptions(**base_opts)),
              ("all", ExportOptions(prune=parse_prune(args.prune), recover_epochs=args.recover_epochs,
                                    distill=args.distill, distill_epochs=args.distill_epochs,
                                    distill_augment=args.distill_augment, lr=args.distill_lr, **base_opts))]
    if args.quantisation_only:
        phases = phases[:1]
    elif args.skip_export:  # RUN/export already holds every variant: time them once, together
        phases = phases[1:]
    for phase, opts in phases:
        started = time.time()
        if not args.skip_export:
            export_run(run, opts)
        export_seconds = time.time() - started
        parity = json.loads((run / "export" / "parity.json").read_text())
        models = {"torch_fp32": teacher,
                  "onnx_fp32": OnnxModel(run / "export" / "model.onnx", args.threads),
                  "onnx_int8": OnnxModel(run / "export" / "model.int8.onnx", args.threads),
                  "torch_int8": torch_dynamic_int8(teacher)}
        if phase == "all":
            models.update(pruned=load_trained(run / "export" / "pruned")[0],
                          student=load_trained(run / "export" / "student")[0])
        print(f"[{phase}] timing {list(models)} on {len(enc)} dev examples (mean {enc.lengths.mean():.1f} "
              f"tokens), {args.threads} threads", flush=True)
        timing = timed_round_robin(models, enc, args.rounds, args.latency_examples, len(enc))
        table = _table(models, parity, timing)
        report = {"command": command, "machine": mach, "run": args.run, "run_results": json.loads(
                  (run / "results.json").read_text()), "dev": args.data, "dev_examples": len(enc),
                  "dev_mean_tokens": float(enc.lengths.mean()), "threads": args.threads, "rounds": args.rounds,
                  "complete": phase == "all" or args.quantisation_only, "phases": [p for p, _ in phases],
                  "int8_settings": parity["variants"]["onnx_int8"].get("quantization"), "onnx_parity": parity["onnx"], "variants": table,
                  "export_seconds": round(export_seconds, 1), "targets": _targets(table)}
        if phase == "all":
            print("sparsity sweep (no recovery) ...", flush=True)
            report.update(pruning=parity["variants"]["pruned"]["pruning"],
                          distillation=parity["variants"]["student"]["distillation"],
                          sparsity_sweep=sparsity_sweep(run / "model", enc, meta))
        report.update(time=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                      loadavg_at_end=[round(x, 2) for x in os.getloadavg()])
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / args.out).write_text(json.dumps(report, indent=2))
        _print(table, report, mach)


def _copy_run(run: Path, dst: Path) -> Path:
    """A copy of the finished run `run` at `dst` (model/, config.yaml, results.json) to export without touching it."""
    import shutil

    if not (run / "model" / "strop.json").is_file():
        sys.exit(f"{run} is not a finished strop run (no model/strop.json)")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(run / "model", dst / "model")
    for name in ("config.yaml", "results.json"):
        shutil.copy2(run / name, dst / name)
    return dst


def _table(models: dict, parity: dict, timing: dict) -> dict:
    base, table = timing["torch_fp32"], {}
    for name in models:
        v, t = parity["variants"][name], timing[name]
        table[name] = {"accuracy": v["accuracy"], "accuracy_change_points": 100 * v["accuracy_change"],
                       "size_mb": v["size_mb"], "agreement_with_fp32": v["agreement"], **t,
                       "latency_p50_ratio": t["latency_ms_p50"] / base["latency_ms_p50"],
                       "throughput_ratio": t["throughput_bs32"] / base["throughput_bs32"],
                       "speedup_p50": base["latency_ms_p50"] / t["latency_ms_p50"]}
    return table


def _targets(table: dict) -> dict:
    out = {"onnx_int8_p50_le_0.33x_fp32_eager": table["onnx_int8"]["latency_p50_ratio"] <= 0.33,
           "onnx_int8_accuracy_drop_le_0.5_points": table["onnx_int8"]["accuracy_change_points"] >= -0.5}
    if "student" in table:
        out.update({"student_ge_1.8x_faster_p50": table["student"]["speedup_p50"] >= 1.8,
                    "student_within_1.5_points": table["student"]["accuracy_change_points"] >= -1.5})
    return out


def markdown(report: dict) -> str:
    """The variants table of a compress.json report, as in BENCHMARKS.md."""
    names = {"torch_fp32": "PyTorch fp32 eager", "onnx_fp32": "ONNX fp32", "onnx_int8": "ONNX int8 (dynamic)",
             "torch_int8": "PyTorch int8 (dynamic)", "pruned": "pruned (structured) + recovery",
             "student": "distilled student"}
    lines = ["| variant | dev accuracy | change (points) | size MB | p50 ms (bs 1) | p95 ms | p50 vs fp32 | "
             "ex/s (bs 32) | throughput vs fp32 | agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["variants"].items():
        lines.append(f"| {names.get(name, name)} | {100 * r['accuracy']:.2f} | {r['accuracy_change_points']:+.2f} | "
                     f"{r['size_mb']:.1f} | {r['latency_ms_p50']:.2f} | {r['latency_ms_p95']:.2f} | "
                     f"{r['latency_p50_ratio']:.2f}x | {r['throughput_bs32']:.0f} | {r['throughput_ratio']:.2f}x | "
                     f"{r['agreement_with_fp32']:.3f} |")
    return "\n".join(lines)


def _print(table: dict, report: dict, mach: dict) -> None:
    print(f"{'variant':<12} {'acc':>7} {'d pts':>7} {'MB':>7} {'p50 ms':>8} {'p95 ms':>8} {'x p50':>6} "
          f"{'ex/s@32':>8} {'x thr':>6}")
    for name, r in table.items():
        print(f"{name:<12} {100 * r['accuracy']:7.2f} {r['accuracy_change_points']:+7.2f} {r['size_mb']:7.1f} "
              f"{r['latency_ms_p50']:8.2f} {r['latency_ms_p95']:8.2f} {r['latency_p50_ratio']:6.2f} "
              f"{r['throughput_bs32']:8.1f} {r['throughput_ratio']:6.2f}")
    print("targets:", json.dumps(report["targets"]))
    print(f"load average at start / end: {mach['loadavg_at_start']} / {report['loadavg_at_end']}", flush=True)


if __name__ == "__main__":
    main()
