"""`strop bench`: this machine's peak matmul FLOP/s and a short training-throughput probe, to compare machines."""

from __future__ import annotations

import math
import time


def measure_peak_flops(dtype=None, n: int = 4096, reps: int = 5, threads: int | None = None) -> float:
    """Best-of-`reps` FLOP/s of one (n, n) @ (n, n) matmul in `dtype` (default torch.float32) on the CPU.

    A large square matmul is the most FLOP-efficient thing the machine does, so it is the ceiling that training
    throughput is measured against (model-FLOPs utilisation). Counts 2*n^3 FLOPs per matmul; one untimed warm-up
    call first (oneDNN picks and caches kernels on first use). `threads`: torch threads for the measurement (set
    and restored); None = the current setting. n between 2048 and 4096 is large enough to saturate a CPU.
    """
    import torch

    dtype = dtype or torch.float32
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up
        best = math.inf
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
        return 2 * n ** 3 / best
    finally:
        torch.set_num_threads(before)


def training_probe(steps: int = 20, batch_size: int = 32, precision: str = "auto", overrides: dict | None = None,
                   data: str | None = None, max_length: int = 64) -> dict:
    """Train for `steps` steps and time the last `steps - 5` (the first steps warm up kernels).

    Defaults: the packaged default model on the shipped demo set. `overrides` (config keys, e.g. {'peft.method':
    'lora'}) and `data` (a training file) change what is trained. Returns samples/s, real tokens/s, wall and CPU
    seconds per step (CPU time of this process: on a shared machine it moves far less than wall time) and the
    trainable parameter count."""
    import numpy as np
    import torch

    from strop.config import load_config, resolve_method_defaults
    from strop.data.batching import epoch_batches
    from strop.device import resolve_device, resolve_precision
    from strop.models.backbone import load_tokenizer, resolve_model_path
    from strop.models.peft import apply_peft, count_parameters
    from strop.tasks import build_model, get_task, prepare
    from strop.training.loop import accumulate_gradients, speed_ups
    from strop.training.optim import build_optimizer, clip_grad_norm, sparse_embeddings_in

    demo = __import__("pathlib").Path(__file__).parent / "demo" / "support_tickets.csv"
    cfg = load_config(None, {"data.train": str(data or demo), "model.max_length": max_length,
                             "train.batch_size": batch_size, "data.validation_ratio": 0, "data.test_ratio": 0,
                             **(overrides or {})})
    resolve_method_defaults(cfg)
    ds = prepare(cfg)
    task = get_task(ds.task)
    enc = task.encode(load_tokenizer(resolve_model_path(cfg.model.path)), ds.splits["train"],
                      {"max_length": cfg.model.max_length, "labels": ds.labels})
    device = resolve_device("auto")
    precision = resolve_precision(precision, device)
    torch.manual_seed(0)
    model, hook = apply_peft(build_model(task, cfg, ds.labels), cfg.peft, max(steps, 100))
    model = model.to(device).train()
    optimizer = build_optimizer(model, cfg.train, hook.lr_scales)
    batches = [b for e in range(math.ceil(steps * batch_size / len(enc)) + 1)
               for b in epoch_batches(enc.lengths, batch_size, 0, e)][:steps]
    warm = min(5, steps - 1)
    examples = tokens = 0
    params = [p for p in model.parameters() if p.requires_grad]
    # the same speed settings and step (clipping included) as the training loop
    with sparse_embeddings_in(model, cfg.model.sparse_embeddings), speed_ups(model, cfg.train, device):
        for i, idx in enumerate(batches):
            if i == warm:
                start, cpu_start = time.perf_counter(), time.process_time()
            accumulate_gradients(model, enc, idx, batch_size, task, device, precision, hook.regularizer)
            clip_grad_norm(params, cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else math.inf)
            optimizer.step()
            hook(i + 1)
            optimizer.zero_grad(set_to_none=True)
            if i >= warm:
                examples += len(idx)
                tokens += int(np.sum(enc.lengths[idx]))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    timed = len(batches) - warm
    return {"samples_per_s": examples / seconds, "tokens_per_s": tokens / seconds, "precision": precision,
            "steps_timed": timed, "batch_size": batch_size, "wall_s_per_step": seconds / timed,
            "cpu_s_per_step": cpu / timed, "trainable_params": count_parameters(model)[0]}
