"""The training loop: one function, read top to bottom."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from strop.data.batching import Encoded, collate, epoch_batches
from strop.device import autocast
from strop.errors import StropError
from strop.evaluate.evaluator import MODEL_INPUTS, evaluate
from strop.evaluate.metrics import greater_is_better
from strop.models.classifier import task_loss
from strop.training.optim import build_optimizer, build_scheduler, warmup_steps
from strop.training.progress import TrainProgress


class NonFiniteLossError(StropError):
    """The loss became NaN or Inf."""


@dataclass
class FitResult:
    steps: int
    epochs_run: float
    best_metric: float | None
    best_step: int | None
    history: list[dict] = field(default_factory=list)  # validation records
    train_seconds: float = 0.0
    train_tokens: int = 0  # real (unpadded) tokens seen


def accumulate_gradients(model: nn.Module, enc: Encoded, idx: np.ndarray, micro_batch_size: int, task: str,
                         device: torch.device, precision: str) -> torch.Tensor:
    """Forward + backward over the examples `idx` in micro-batches; returns the batch's mean loss (detached).

    Each micro-batch loss is weighted by its share of the batch, so the summed gradients equal those of one
    forward/backward over the whole batch (also when the last micro-batch is smaller).
    """
    total = torch.zeros((), device=device)
    for start in range(0, len(idx), micro_batch_size):
        part = idx[start:start + micro_batch_size]
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(enc, part).items()}
        with autocast(device, precision):
            logits = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits
        loss = task_loss(logits, batch["labels"], task) * (len(part) / len(idx))
        loss.backward()
        total += loss.detach()
    return total


def fit(model: nn.Module, train: Encoded, val: Encoded | None, cfg, task: str, label_names: list[str],
        device: torch.device, precision: str, tracker, metric: str) -> FitResult:
    """Train `model` in place on `train`, evaluating on `val`; restores the best weights if configured."""
    t = cfg.train
    micro = t.micro_batch_size or t.batch_size
    steps_per_epoch = math.ceil(len(train) / t.batch_size)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    eval_every = t.eval_every or steps_per_epoch
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t.scheduler, warmup_steps(t.warmup, total_steps), total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    higher = greater_is_better(metric)
    result = FitResult(0, 0.0, None, None)
    best_state, bad_evals = None, 0
    torch.manual_seed(t.seed)  # dropout masks
    model.to(device).train()
    progress = TrainProgress(total_steps)
    window_loss, window_steps, window_examples = torch.zeros((), device=device), 0, 0
    window_start = time.perf_counter()
    start = time.perf_counter()
    step, epoch, stop = 0, 0, False
    with progress:
        while step < total_steps and not stop:
            for idx in epoch_batches(train.lengths, t.batch_size, t.seed, epoch, t.batching == "length_grouped"):
                loss = accumulate_gradients(model, train, idx, micro, task, device, precision)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"loss is {float(loss)} at step {step + 1} (epoch {epoch}, batch of "
                                             f"examples {idx[:8].tolist()}...); lower train.lr, or use "
                                             "train.precision=fp32")
                if t.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                lr = scheduler.get_last_lr()[0]  # the lr this step used
                optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)  # noqa: E702
                step += 1
                window_loss += loss  # summed on-device; read once per log line, not every step
                window_steps += 1
                window_examples += len(idx)
                result.train_tokens += int(train.lengths[idx].sum())

                if step % t.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "split": "train",
                              "loss": float(window_loss) / window_steps,
                              "lr": lr, "samples_per_s": window_examples / elapsed}
                    tracker.log(record)
                    progress.update(step, record)
                    window_loss.zero_(); window_steps, window_examples, window_start = 0, 0, time.perf_counter()  # noqa
                else:
                    progress.advance(step)

                if val is not None and (step % eval_every == 0 or step == total_steps):
                    metrics, _ = evaluate(model, val, task, label_names, cfg.eval.batch_size, device, precision)
                    value = metrics[metric]
                    improved = result.best_metric is None or (value > result.best_metric if higher
                                                              else value < result.best_metric)
                    if improved:
                        result.best_metric, result.best_step, bad_evals = value, step, 0
                        if t.restore_best:
                            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    else:
                        bad_evals += 1
                    record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "split": "validation",
                              **metrics}
                    tracker.log(record)
                    result.history.append(record)
                    progress.note(f"step {step}: validation {metric}={value:.4f}"
                                  f"{' (best)' if improved else ''} loss={metrics['loss']:.4f}")
                    if t.early_stopping_patience and bad_evals >= t.early_stopping_patience:
                        progress.note(f"early stopping: no improvement in {bad_evals} evaluations")
                        stop = True
                if stop or step >= total_steps:
                    break
            epoch += 1
    result.steps = step
    result.epochs_run = step / steps_per_epoch
    result.train_seconds = time.perf_counter() - start
    if best_state is not None and result.best_step != step:
        model.load_state_dict(best_state)
        progress.note(f"restored the best weights (step {result.best_step}, {metric}={result.best_metric:.4f})")
    return result
