"""Speed of a model on real inputs: latency at batch 1 (p50/p95) and throughput at a larger batch.

Both time `model(**inputs)` only (tokenisation, image decoding and batching excluded) on the first examples
of a split in input order, so every variant sees the same inputs. Batches are token ids by default; pass the
task's `collate` and model `inputs` for others (images). Works for PyTorch models and `OnnxModel`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from strop.data.batching import INPUT_NAMES, Encoded, collate_inputs


def model_batch(enc: Encoded, idx, collate=collate_inputs, inputs: tuple[str, ...] = INPUT_NAMES) -> dict:
    """The model inputs of examples `idx` as `collate` builds them (labels left out)."""
    return {k: v for k, v in collate(enc, np.asarray(idx)).items() if k in inputs}


@torch.inference_mode()
def latency_samples(model, enc: Encoded, n: int = 100, warmup: int = 10, collate=collate_inputs,
                    inputs: tuple[str, ...] = INPUT_NAMES) -> list[float]:
    """Wall time (ms) of one forward pass at batch 1 for each of the first `n` examples, after `warmup` calls."""
    model.eval()
    batches = [model_batch(enc, [i], collate, inputs) for i in range(min(n, len(enc)))]
    for b in batches[:warmup]:
        model(**b)
    times = []
    for b in batches:
        start = time.perf_counter()
        model(**b)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def latency_ms(model, enc: Encoded, n: int = 100, warmup: int = 10, collate=collate_inputs,
               inputs: tuple[str, ...] = INPUT_NAMES) -> dict:
    """p50 / p95 / mean wall time (ms) of one forward pass at batch 1 over the first `n` examples."""
    times = latency_samples(model, enc, n, warmup, collate, inputs)
    n = len(times)
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95)),
            "mean": float(np.mean(times)), "n": n}


@torch.inference_mode()
def throughput(model, enc: Encoded, batch_size: int = 32, n: int = 512, warmup: int = 1,
               collate=collate_inputs, inputs: tuple[str, ...] = INPUT_NAMES) -> float:
    """Examples per second at `batch_size` over the first `n` examples (each batch padded to its longest)."""
    model.eval()
    n = min(n, len(enc))
    batches = [model_batch(enc, range(i, min(i + batch_size, n)), collate, inputs)
               for i in range(0, n, batch_size)]
    for b in batches[:warmup]:
        model(**b)
    start = time.perf_counter()
    for b in batches:
        model(**b)
    return n / (time.perf_counter() - start)
