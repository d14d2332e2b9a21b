"""Which ONNX Runtime int8 settings suit a CNN? Test accuracy, ROC AUC, agreement with PyTorch, p50 latency
at batch 1 and throughput at batch 32 of one image run's fp32 export quantised several ways (the sweep behind
quantize.STATIC_INT8_CONV, DECISIONS.md).

    flock /tmp/strop-bench.lock python bench/int8_images.py --run /tmp/breastmnist-224

RUN is a finished image-classification run (only read; its config.yaml's data must be readable from here:
the training split calibrates, the test split scores). Writes WORK/*.onnx and --out. Timings are forward
passes only, one thread, on a shared machine: compare variants within one run.
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

BASE = {"format": "QDQ", "weight_type": "QInt8", "activation_type": "QUInt8", "per_channel": True,
        "op_types_to_quantize": None, "calibration": "MinMax"}
STATIC = {"qdq_all_ops (default)": BASE,
          "qoperator_all_ops": {**BASE, "format": "QOperator"},
          "qdq_conv_gemm_only": {**BASE, "op_types_to_quantize": ["Conv", "Gemm", "MatMul"]},
          "qdq_per_tensor": {**BASE, "per_channel": False},
          "qdq_s8_activations": {**BASE, "activation_type": "QInt8"},
          "qdq_percentile": {**BASE, "calibration": "Percentile"},
          "qdq_entropy": {**BASE, "calibration": "Entropy"}}


def scores(logits: np.ndarray, ref: np.ndarray, gold: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    probs = torch.from_numpy(logits).softmax(-1).numpy()
    auc = roc_auc_score(gold, probs[:, 1]) if probs.shape[1] == 2 else roc_auc_score(gold, probs,
                                                                                      multi_class="ovr")
    return {"accuracy": float((logits.argmax(1) == gold).mean()), "roc_auc": float(auc),
            "agreement": float((logits.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(logits - ref).max())}


def speed(model, enc, task) -> dict:
    from strop.compress.timing import latency_ms, throughput

    batches = {"collate": task.collate, "inputs": task.model_inputs}
    return {"latency_ms_p50": latency_ms(model, enc, 50, 5, **batches)["p50"],
            "throughput_bs32": throughput(model, enc, 32, 128, **batches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="finished image-classification run (only read)")
    ap.add_argument("--work", default="/tmp/int8-images", help="folder for the exported, quantised graphs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration", type=int, default=256, help="training images that calibrate")
    ap.add_argument("--out", default=str(RESULTS / "int8_images.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mach = machine()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from strop.compress.export import task_logits
    from strop.compress.onnx import OnnxModel, export_graph
    from strop.compress.quantize import quantize_onnx_static
    from strop.config import load_config
    from strop.tasks import load_trained, prepare

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, processor, meta, task = load_trained(Path(args.run) / "model")
    ds = prepare(load_config(Path(args.run) / "config.yaml"))
    test, train = (task.encode(processor, ds.splits[s], meta) for s in ("test", "train"))
    # whole batches of 16: ORT's histogram calibrators (percentile, entropy) fail on a shorter last batch
    n_calibration = max(16, min(args.calibration, len(train)) // 16 * 16)
    gold, ref = np.asarray(test.labels), task_logits(model, test, task)
    fp32 = work / "model.onnx"
    export_graph(model, task.onnx_inputs(processor, meta), fp32)
    rows = {"torch_fp32": {**scores(ref, ref, gold), **speed(model, test, task)}, "onnx_fp32": {}}
    graphs = {"onnx_fp32": fp32}
    for name, settings in STATIC.items():
        graphs[name] = work / (name.split()[0] + ".onnx")
        start = time.perf_counter()
        quantize_onnx_static(fp32, graphs[name], train, ["pixel_values"], n_calibration,
                             collate=task.collate, settings=settings)
        rows[name] = {"quantize_seconds": round(time.perf_counter() - start, 1)}
    graphs["dynamic_conv"] = work / "dynamic_conv.onnx"  # ConvInteger: what dynamic int8 makes of a CNN
    quantize_dynamic(str(fp32), str(graphs["dynamic_conv"]), weight_type=QuantType.QUInt8, per_channel=True,
                     op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    for name, path in graphs.items():
        q = OnnxModel(path, args.threads)
        measured = {**scores(task_logits(q, test, task), ref, gold), **speed(q, test, task)}
        rows.setdefault(name, {}).update(**measured, size_mb=path.stat().st_size / 2**20)
    for name, r in rows.items():
        print(f"{name:<24} acc {r['accuracy']:.4f} auc {r['roc_auc']:.4f} agree {r['agreement']:.3f} "
              f"p50 {r['latency_ms_p50']:.2f} ms  bs32 {r['throughput_bs32']:.0f}/s", flush=True)
    report = {"command": "flock /tmp/strop-bench.lock python bench/int8_images.py " + " ".join(sys.argv[1:]),
              "machine": mach, "run": args.run, "test_images": len(test),
              "image_size": meta["image"]["size"], "calibration_images": n_calibration,
              "threads": args.threads,
              "variants": rows, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
