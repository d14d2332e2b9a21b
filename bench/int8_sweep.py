"""Which ONNX Runtime dynamic int8 settings keep accuracy? SST-2 dev accuracy, agreement with fp32 and p50 latency
at batch 1 of one fp32 ONNX export quantised several ways (the sweep behind quantize.DYNAMIC_INT8, DECISIONS.md).

    flock /tmp/strop-bench.lock python bench/int8_sweep.py --run ../main/runs/seed-1 --work /tmp/int8-sweep

Writes WORK/*.onnx (nothing into the run) and bench/results/int8_sweep.json. Latency is forward-pass only, one
thread, 100 dev sentences, on a shared machine: compare variants within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

DEV = "../shared/datasets/sst2/dev.jsonl"


def _feeds_from(node, producers: dict, op: str, depth: int = 4) -> bool:
    """Whether `node`'s first input comes from an `op` node within `depth` hops (any input path)."""
    frontier = [node.input[0]]
    for _ in range(depth):
        ps = [producers[x] for x in frontier if x in producers]
        if any(p.op_type == op for p in ps):
            return True
        frontier = [i for p in ps for i in p.input]
    return False


def variants(graph) -> dict:
    """name -> quantize_dynamic keyword arguments."""
    from onnxruntime.quantization import QuantType

    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    weight_mm = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    ffn_down = [n.name for n in graph.node if n.op_type == "MatMul" and _feeds_from(n, producers, "Erf")]
    gemms = [n.name for n in graph.node if n.op_type == "Gemm"]
    head = gemms + [g + "_MatMul" for g in gemms]  # ORT rewrites Gemm into <name>_MatMul + Add before quantising
    per_layer = len(weight_mm) // max(1, len(ffn_down))
    base = dict(per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    return {"per_channel_qint8 (default)": base,
            "per_tensor_qint8": {**base, "per_channel": False},
            "per_channel_qint8_reduce_range": {**base, "reduce_range": True},
            "per_channel_quint8_weights": {**base, "weight_type": QuantType.QUInt8},
            "pooler_classifier_fp32": {**base, "nodes_to_exclude": head},
            "ffn_down_fp32": {**base, "nodes_to_exclude": ffn_down},
            "first_last_layer_fp32": {**base, "nodes_to_exclude": weight_mm[:per_layer] + weight_mm[-per_layer:]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="finished single-label run (only read)")
    ap.add_argument("--data", default=DEV)
    ap.add_argument("--work", default="/tmp/int8-sweep", help="folder for the exported and quantised graphs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mach = machine()
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    from strop.compress.export import _held_file, logits_of
    from strop.compress.onnx import OnnxModel, export_onnx
    from strop.compress.timing import latency_ms
    from strop.tasks import load_trained

    logging.getLogger().setLevel(logging.ERROR)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tok, meta, _ = load_trained(Path(args.run) / "model")
    enc = _held_file(args.data, meta, tok)
    gold, ref = np.asarray(enc.labels), logits_of(model, enc)
    export_onnx(model, tok, work / "model.onnx", meta["max_length"])
    fp32 = OnnxModel(work / "model.onnx", args.threads)
    rows = {"torch_fp32": {"accuracy": float((ref.argmax(1) == gold).mean()), "agreement": 1.0,
                           "latency_ms_p50": latency_ms(model, enc, 100)["p50"]},
            "onnx_fp32": {"accuracy": float((logits_of(fp32, enc).argmax(1) == gold).mean()),
                          "agreement": float((logits_of(fp32, enc).argmax(1) == ref.argmax(1)).mean()),
                          "latency_ms_p50": latency_ms(fp32, enc, 100)["p50"]}}
    for name, kwargs in variants(onnx.load(str(work / "model.onnx")).graph).items():
        path = work / (name.split()[0] + ".onnx")
        quantize_dynamic(str(work / "model.onnx"), str(path), **kwargs)
        q = OnnxModel(path, args.threads)
        logits = logits_of(q, enc)
        rows[name] = {"accuracy": float((logits.argmax(1) == gold).mean()),
                      "agreement": float((logits.argmax(1) == ref.argmax(1)).mean()),
                      "max_abs_logit_diff": float(np.abs(logits - ref).max()),
                      "latency_ms_p50": latency_ms(q, enc, 100)["p50"], "size_mb": path.stat().st_size / 2**20}
    for name, r in rows.items():
        r["accuracy_change_points"] = 100 * (r["accuracy"] - rows["torch_fp32"]["accuracy"])
        print(f"{name:<34} acc {100 * r['accuracy']:.2f} ({r['accuracy_change_points']:+.2f})  agree "
              f"{r['agreement']:.3f}  p50 {r['latency_ms_p50']:.2f} ms", flush=True)
    report = {"command": "flock /tmp/strop-bench.lock python bench/int8_sweep.py " + " ".join(sys.argv[1:]),
              "machine": mach, "run": args.run, "dev": args.data, "dev_examples": len(enc), "threads": args.threads,
              "variants": rows, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "int8_sweep.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
