"""Per-step A/B of one training-speed change, robust to a busy machine (issue 6).

    python bench/step_ab.py fast_dropout          # strop's fast dropout masks vs torch's dropout
    python bench/step_ab.py freeze_embeddings     # frozen word embeddings vs trained
    python bench/step_ab.py sparse_embeddings     # word embeddings trained through sparse rows (lazy AdamW) vs dense
    python bench/step_ab.py attention_dropout_0   # no attention dropout (sdpa's fused kernel) vs 0.1
    python bench/step_ab.py fused_lora            # LoRA through strop's fused linear vs PEFT's forward
    python bench/step_ab.py lora_vs_full          # a LoRA step (strop's default settings) vs a full fine-tuning step
    python bench/step_ab.py lora_norms_hd0_vs_full  # LoRA + trained norms without hidden dropout vs full
    python bench/step_ab.py compile               # torch.compile(dynamic=True) vs eager (both with fast dropout)
    python bench/step_ab.py fused_kernels --threads 2  # the fused C++ kernels (train.fused_kernels) vs without
    python bench/step_ab.py fast_dropout --steps 40 --threads 1

Two copies of the default model train on the same SST-2 batches (configs/sst2.yaml data, batch 32, bf16 autocast where
the CPU has it), their steps interleaved in one process: A (strop as before the change), then B (with it), then A...
Other work on the machine slows both alike, so the median of the per-step CPU-time ratio B/A is a fair number even when
wall-clock timing is not. The first 3 steps of each (kernel warm-up; for `compile`, compilation, timed separately) are
not counted. Results are appended to bench/results/step_ab.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

from common import REPO, RESULTS, machine

CHANGES = {  # name: (overrides of side A, overrides of side B); "compile": that side runs torch.compile(model)
    "fast_dropout": ({"train.fast_dropout": False}, {"train.fast_dropout": True}),
    "lora_vs_full": ({}, {"peft.method": "lora"}),  # LoRA's step (fused, the default) against full fine-tuning's
    # the LoRA recipe of bench/peft_sst2.py (norms trained), and the same without the backbone's hidden dropout
    "lora_norms_vs_full": ({}, {"peft.method": "lora", "peft.train_norms": True}),
    "lora_norms_hd0_vs_full": ({}, {"peft.method": "lora", "peft.train_norms": True, "model.hidden_dropout": 0.0}),
    "fused_lora": ({"peft.method": "lora", "train.fused_lora": False}, {"peft.method": "lora", "train.fused_lora": True}),
    "freeze_embeddings": ({}, {"model.freeze_embeddings": True}),
    "sparse_embeddings": ({"model.sparse_embeddings": False}, {"model.sparse_embeddings": True}),
    "attention_dropout_0": ({}, {"model.attention_dropout": 0.0}),
    "compile": ({}, {"compile": True}),
    "fused_kernels": ({"train.fused_kernels": False}, {"train.fused_kernels": True}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("change", choices=sorted(CHANGES))
    p.add_argument("--steps", type=int, default=30, help="timed steps per side")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    os.chdir(REPO)

    import numpy as np
    import torch

    from strop.config import load_config, resolve_method_defaults
    from strop.data.batching import epoch_batches
    from strop.device import resolve_precision
    from strop.models.backbone import load_tokenizer, resolve_model_path
    from strop.models.peft import apply_peft
    from strop.tasks import build_model, get_task, prepare
    from strop.training.fast import tune_allocator
    from strop.training.loop import accumulate_gradients, speed_ups
    from strop.training.optim import build_optimizer, clip_grad_norm, sparse_embeddings_in

    torch.set_num_threads(args.threads)
    tune_allocator()
    config = REPO / "configs" / "sst2.yaml"
    base = load_config(config, {"train.batch_size": 32})
    ds = prepare(base)
    task = get_task(ds.task)
    enc = task.encode(load_tokenizer(resolve_model_path(base.model.path)), ds.splits["train"],
                      {"max_length": base.model.max_length, "labels": ds.labels})
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)
    batches = epoch_batches(enc.lengths, 32, 42, 0, True)

    sides, contexts = {}, []
    for side, over in zip("AB", CHANGES[args.change]):
        over = dict(over)
        compiled = over.pop("compile", False)
        cfg = load_config(config, {"train.batch_size": 32, **over})
        resolve_method_defaults(cfg)  # train.lr left empty: the method's default, as strop's run uses
        torch.manual_seed(0)
        model, hook = apply_peft(build_model(task, cfg, ds.labels), cfg.peft, 1000)
        model.train()
        ctx = contextlib.ExitStack()
        ctx.enter_context(sparse_embeddings_in(model, cfg.model.sparse_embeddings))
        ctx.enter_context(speed_ups(model, cfg.train, cpu))  # the training loop's own speed settings
        contexts.append(ctx)
        params = [q for q in model.parameters() if q.requires_grad]
        sides[side] = (torch.compile(model, dynamic=True) if compiled else model,
                       build_optimizer(model, cfg.train, hook.lr_scales), params, cfg)

    def step(side: str, i: int) -> None:
        model, optimizer, params, cfg = sides[side]
        accumulate_gradients(model, enc, batches[i], 32, task, cpu, precision)
        clip_grad_norm(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warm = {}
    for side in "AB":
        start = time.perf_counter()
        for i in range(3):
            step(side, i)
        warm[side] = time.perf_counter() - start
    times = {"A": [], "B": []}
    for i in range(3, 3 + args.steps):
        for side in "AB":
            start = time.process_time()
            step(side, i)
            times[side].append(time.process_time() - start)
    for ctx in contexts:
        ctx.__exit__(None, None, None)
    ratio = float(np.median(np.array(times["B"]) / np.array(times["A"])))
    result = {"change": args.change, "A": CHANGES[args.change][0], "B": CHANGES[args.change][1],
              "steps": args.steps, "threads": args.threads, "precision": precision,
              "cpu_ms_per_step": {s: 1000 * float(np.median(v)) for s, v in times.items()},
              "median_ratio_B_over_A": ratio, "warmup_seconds_3_steps": warm,
              "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
              "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    print(f"{args.change}: A {result['cpu_ms_per_step']['A']:.0f} ms, B {result['cpu_ms_per_step']['B']:.0f} ms CPU "
          f"per step (medians of {args.steps}); B/A per-step ratio median {ratio:.3f}; warm-up (3 steps) "
          f"A {warm['A']:.1f} s, B {warm['B']:.1f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "step_ab.json"
    rows = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    path.write_text(json.dumps(rows + [result], indent=2), encoding="utf-8")
    print(f"appended to {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
