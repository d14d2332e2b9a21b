"""Speed of a model on real texts: latency at batch 1 (p50/p95) and throughput at a larger batch.

Both time `model(**inputs)` only (tokenisation excluded) on the first examples of a split in input order, so every
variant sees the same texts. Works for PyTorch models and `OnnxModel`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from strop.data.batching import Encoded, collate_inputs


def _inputs(enc: Encoded, idx) -> dict:
    return collate_inputs(enc, np.asarray(idx))


@torch.inference_mode()
def latency_samples(model, enc: Encoded, n: int = 100, warmup: int = 10) -> list[float]:
    """Wall time (ms) of one forward pass at batch 1 for each of the first `n` examples, after `warmup` calls."""
    model.eval()
    batches = [_inputs(enc, [i]) for i in range(min(n, len(enc)))]
    for b in batches[:warmup]:
        model(**b)
    times = []
    for b in batches:
        start = time.perf_counter()
        model(**b)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def latency_ms(model, enc: Encoded, n: int = 100, warmup: int = 10) -> dict:
    """p50 / p95 / mean wall time (ms) of one forward pass at batch 1 over the first `n` examples."""
    times = latency_samples(model, enc, n, warmup)
    n = len(times)
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95)),
            "mean": float(np.mean(times)), "n": n}


@torch.inference_mode()
def throughput(model, enc: Encoded, batch_size: int = 32, n: int = 512, warmup: int = 1) -> float:
    """Examples per second at `batch_size` over the first `n` examples (each batch padded to its longest)."""
    model.eval()
    n = min(n, len(enc))
    batches = [_inputs(enc, range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    for b in batches[:warmup]:
        model(**b)
    start = time.perf_counter()
    for b in batches:
        model(**b)
    return n / (time.perf_counter() - start)
