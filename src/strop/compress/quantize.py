"""int8 quantisation: ONNX Runtime dynamic and static (calibrated) int8, and PyTorch dynamic int8.

Dynamic int8 stores Linear/MatMul weights as int8 and quantises activations per batch at run time (VNNI kernels on
CPUs that have them); static int8 also fixes activation ranges from a calibration set drawn from training
data (transformers: `strop export --static-int8`; CNNs: their model.int8.onnx, STATIC_INT8_CONV).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from strop.compress.onnx import onnxruntime
from strop.data.batching import Encoded, collate_inputs
from strop.errors import ExportError


# ONNX Runtime dynamic int8 settings, chosen by measurement on SST-2 dev (DECISIONS.md, BENCHMARKS.md):
# - weights QInt8 with activations QUInt8 is the u8s8 pair the VNNI kernels run; QUInt8 weights (u8u8) were 35% slower
#   at batch 1 for no accuracy gain.
# - per_channel: one scale per output column; per-tensor scales lost 1.6 points instead of 0.5.
# - MatMul: the 36 encoder projections carry the time. ORT rewrites the pooler's and classifier's Gemm nodes into
#   MatMul + Add and quantises them too; keeping those two in fp32 (nodes_to_exclude) changed no prediction on SST-2 dev.
#   The embedding tables (Gather) stay fp32: int8 embeddings would save disk but no time. reduce_range (7-bit weights,
#   for CPUs without VNNI) changed nothing on accuracy.
# - Leaving the FFN down-projections (the matmuls after GELU) or the first and last layers in fp32 raised prediction
#   agreement slightly (98.6% -> 99.2%) but cost 30-70% latency and did not raise accuracy: not worth it by default.
DYNAMIC_INT8 = {"weight_type": "QInt8", "activation_type": "QUInt8", "per_channel": True, "reduce_range": False,
                "op_types_to_quantize": ["MatMul"],
                "kept_fp32": "embeddings (Gather), LayerNorm, attention scores (activation x activation MatMul)"}
# ONNX Runtime static int8 of transformers (strop export --static-int8): the projections only, as dynamic
STATIC_INT8 = {"format": "QDQ", "weight_type": "QInt8", "activation_type": "QUInt8", "per_channel": True,
               "op_types_to_quantize": ["MatMul", "Gemm"], "calibration": "MinMax"}
# ... and of CNNs (image classifiers' model.int8.onnx), chosen on EfficientNet-Lite0 BreastMNIST runs (224
# and 112 px, 156 test images, 256 calibration images, one thread; bench/int8_images.py, DECISIONS.md):
# - static, not dynamic: ORT's dynamic int8 runs convolutions as ConvInteger, 7x slower than fp32 at 224 px,
#   and lost 15 points of accuracy.
# - QDQ, not QOperator: the same predictions (identical logits), throughput at batch 32 1.1-1.2x QOperator's.
# - every op ORT quantises (None), not Conv/Gemm alone: with the ReLU6 (Clip) and Add nodes quantised too,
#   each convolution's output range is the activation's; Conv/Gemm alone agreed with fp32 on 78-82% of
#   images, all ops on 96-97% (accuracy -0.6 / +0.6 points, AUC -1.7 / +0.2), 1.7-1.8x fp32's speed.
# - per-channel weights: per-tensor agreed on 86%. u8 activations: s8 gave the same predictions 4x slower.
#   Percentile calibration agreed on 98% at 224 px but took 8x MinMax's time; entropy equalled MinMax.
STATIC_INT8_CONV = {"format": "QDQ", "weight_type": "QInt8", "activation_type": "QUInt8",
                    "per_channel": True, "op_types_to_quantize": None, "calibration": "MinMax"}


def quantize_onnx_dynamic(src: Path, dst: Path) -> dict:
    """int8 weights for the MatMuls of the fp32 model at `src` (settings: DYNAMIC_INT8), written to `dst`.

    Returns the settings used (recorded in parity.json)."""
    onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet()
    s = DYNAMIC_INT8
    quantize_dynamic(str(src), str(dst), weight_type=QuantType[s["weight_type"]], per_channel=s["per_channel"],
                     reduce_range=s["reduce_range"], op_types_to_quantize=s["op_types_to_quantize"])
    return dict(s)


def quantize_onnx_static(src: Path, dst: Path, calibration: Encoded, input_names: list[str], n: int = 256,
                         batch_size: int = 16, seed: int = 0, collate=collate_inputs,
                         settings: dict = STATIC_INT8) -> dict:
    """int8 weights and activations (`settings`: STATIC_INT8 or STATIC_INT8_CONV), activation ranges
    calibrated on `n` examples of `calibration` drawn with `seed`; `collate(enc, idx)` builds their batches
    as evaluation does (the task's collate without an rng: images normalised, never augmented). Returns the
    settings used and the number of calibration examples (recorded in parity.json)."""
    onnxruntime()
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    _quiet()
    if "token_type_ids" in input_names and calibration.token_type_ids is None:
        calibration = _with_zero_types(calibration)  # single texts: segment ids are all zero
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(calibration), size=min(n, len(calibration)), replace=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.starts = iter(range(0, len(idx), batch_size))

        def get_next(self):  # one batch at a time: 256 images at 224 px are 150 MB as float32
            start = next(self.starts, None)
            if start is None:
                return None
            batch = collate(calibration, idx[start:start + batch_size])
            return {k: v.numpy() for k, v in batch.items() if k in input_names}

    s = settings
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat[s["format"]],
                    per_channel=s["per_channel"], activation_type=QuantType[s["activation_type"]],
                    weight_type=QuantType[s["weight_type"]], op_types_to_quantize=s["op_types_to_quantize"],
                    calibrate_method=CalibrationMethod[s.get("calibration", "MinMax")])
    return {**s, "calibration_examples": int(len(idx))}


def _with_zero_types(enc: Encoded) -> Encoded:
    return Encoded(enc.input_ids, [[0] * len(x) for x in enc.input_ids], enc.labels, enc.lengths, enc.n_truncated,
                   enc.pad_id)


def torch_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` whose nn.Linear layers run PyTorch's dynamic int8 kernels (fbgemm/onednn), CPU only."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise ExportError(f"torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic; "
                          "use the ONNX int8 model instead") from None
    return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def _quiet() -> None:
    # onnxruntime.quantization logs a warning per node it leaves in fp32; the parity report is what users read
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
