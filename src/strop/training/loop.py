"""The training loop: one function, read top to bottom. Guards (signals, NaN, OOM) live in guards.py."""

from __future__ import annotations

import contextlib

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from strop.data.batching import Encoded, epoch_batches
from strop.device import autocast
from strop.models.cls_only import first_token_only
from strop.models.peft import PeftHook
from strop.training.checkpoint import (COMPLETE, PREFIX, TrainState, load_best_weights, load_checkpoint, load_weights,
                                       prune_checkpoints, save_checkpoint)
from strop.training.distributed import (Dist, full_tensors, gather_full_state, is_sharded, load_full_state, shard,
                                        trainable_snapshot, training_engine)
from strop.training.fast import fast_dropout_in, tuned_allocator
from strop.training.fast_lora import fused_lora_in
from strop.training.fused_layer import fused_layers_in
from strop.training.guards import MicroBatchSize, NonFiniteError, StopSignals, TrainingInterrupted, is_finite
from strop.training.optim import clip_grad_norm, sparse_embeddings_in
from strop.training.progress import TrainProgress


@dataclass
class FitResult:
    state: TrainState
    steps_per_epoch: int
    history: list[dict] = field(default_factory=list)  # validation records
    train_seconds: float = 0.0  # this process's share of the run (a resumed run counts from the resume)
    train_cpu_seconds: float = 0.0  # CPU time of this process (all its threads) over the same span


def count_steps(t, n_train: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) of a run with train config `t` on n_train examples."""
    steps_per_epoch = math.ceil(n_train / t.batch_size)
    return steps_per_epoch, t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)


@contextlib.contextmanager
def speed_ups(model: nn.Module, t, device: torch.device):
    """The training loop's speed settings that keep the math (cfg.train `t`; `strop bench` uses the same): the
    allocator, fast dropout masks, fused LoRA, the first-token last layer, fused CPU kernels. The order matters:
    the fused kernels take over every dropout the earlier ones left and skip the layer first_token_only runs."""
    with tuned_allocator(t.tune_allocator), fast_dropout_in(model, t.fast_dropout), \
            fused_lora_in(model, t.fused_lora), first_token_only(model), \
            fused_layers_in(model, t.fused_kernels and device.type == "cpu"):
        yield


def accumulate_gradients(model: nn.Module, enc: Encoded, idx: np.ndarray, micro_batch_size: int, task,
                         device: torch.device, precision: str, regularizer=None, loss_fn=None,
                         batch_examples: float | None = None, backward=None,
                         rng: np.random.Generator | None = None) -> torch.Tensor:
    """Forward + backward over the examples `idx` in micro-batches; returns the batch's mean loss (detached).

    `task` (strop.tasks) builds the batches (`collate`), names the model inputs and gives the loss. Each
    micro-batch loss is weighted by its share of the batch (`task.batch_weight`: examples, or supervised tokens
    for generation), so the summed gradients equal those of one forward/backward over the whole batch (also when
    the last micro-batch is smaller). `regularizer()` (e.g.
    AdaLoRA's orthogonality penalty) returns a term added once per batch, or None.
    loss_fn(logits, batch) -> mean loss replaces the task loss (distillation uses it); None = task.loss.
    `batch_examples`: what the loss is averaged over, task.batch_weight(enc, idx) by default; with several processes
    the global batch's weight / world (distributed.shard). `backward(loss)`: DeepSpeed's engine.backward; None = loss.backward.
    `rng`: what a task draws per batch (masks, augmentation), seeded by the caller from the batch's position.
    """
    total = torch.zeros((), device=device)
    for start in range(0, len(idx), micro_batch_size):
        part = idx[start:start + micro_batch_size]
        batch = {k: v.to(device, non_blocking=True) for k, v in task.collate(enc, part, rng).items()}
        with autocast(device, precision):
            logits = task.forward(model, batch)
        loss = loss_fn(logits, batch) if loss_fn else task.loss(logits, batch)
        penalty = regularizer() if regularizer else None
        whole = batch_examples or task.batch_weight(enc, idx)
        loss = (loss if penalty is None else loss + penalty) * (task.batch_weight(enc, part) / whole)
        loss.backward() if backward is None else backward(loss)
        total += loss.detach()
    return total


def fit(model: nn.Module, train: Encoded, val: Encoded | None, cfg, *args, dist: Dist | None = None,
        **kwargs) -> FitResult:
    """Train `model` in place on `train`, evaluating on `val` and checkpointing into run_dir/checkpoints (the
    arguments of _fit). The word embeddings give sparse gradients during it (model.sparse_embeddings; set before
    DDP wraps the model, which must know which parameters have them)."""
    dist = dist or Dist()
    with sparse_embeddings_in(model, cfg.model.sparse_embeddings, cfg.train.distributed, dist.world):
        return _fit(model, train, val, cfg, *args, dist=dist, **kwargs)


def _fit(model: nn.Module, train: Encoded, val: Encoded | None, cfg, task, label_names: list[str],
         device: torch.device, precision: str, tracker, metric: str, run_dir: Path,
         resume_from: Path | None = None, peft_hook: PeftHook | None = None, loss_fn=None, on_eval=None,
         dist: Dist | None = None) -> FitResult:
    """Train `model` in place on `train`, evaluating on `val` and checkpointing into run_dir/checkpoints.
    `task` (strop.tasks) builds batches, gives the loss and evaluates.
    `peft_hook` (models/peft.py) adds its regulariser to the loss and runs after each optimizer step.
    loss_fn(logits, batch): a training loss other than the task loss (e.g. distillation); evaluation is unchanged.
    `on_eval(step, value)` sees each validation metric; it may raise to stop the run (tune.py's pruning).
    `dist` (training/distributed.py): this process's rank when a launcher started several; only rank 0 writes."""
    t = cfg.train
    peft_hook = peft_hook or PeftHook()
    dist = dist or Dist()
    steps_per_epoch, total_steps = count_steps(t, len(train))
    eval_every = t.eval_every or steps_per_epoch
    save_every = eval_every if t.save_every == 0 else t.save_every
    model.to(device).train()
    ddp_model, optimizer, scheduler, engine = training_engine(model, t, dist, device, peft_hook.lr_scales,
                                                              total_steps)
    sharded = is_sharded(model)  # then saving and loading state gathers/splits it over the ranks
    step = optimizer.step if engine is None else engine.step  # the engine's step also clips (gradient_clipping)
    params = [p for p in model.parameters() if p.requires_grad]
    micro = MicroBatchSize(t.micro_batch_size or t.batch_size, t.auto_batch_size)
    torch.manual_seed(t.seed + dist.rank)  # dropout masks (each rank its own)
    state = (load_checkpoint(resume_from, model, optimizer, scheduler, load_full_state if sharded else None)
             if resume_from else TrainState())
    if resume_from and dist.rank:  # the checkpoint holds rank 0's RNG; the other ranks keep their own masks
        torch.manual_seed(t.seed + dist.rank + state.step)
    result = FitResult(state, steps_per_epoch)
    # the best evaluation's weights; after a resume, those the checkpoint carries when the best step has none of its own
    best_state = load_best_weights(resume_from) if resume_from and t.restore_best else None
    window_loss = torch.tensor(state.window[0], device=device)  # summed on-device; read once per log line
    window_start = time.perf_counter()
    start, cpu_start = time.perf_counter(), time.process_time()

    def checkpoint():
        state.window = [float(window_loss), state.window[1], state.window[2]]
        gathered = {}
        # eval_every != save_every: when the best step was never checkpointed, this checkpoint carries its weights
        carry_best = (t.restore_best and best_state is not None and state.best_step != state.step and dist.main
                      and not (run_dir / "checkpoints" / f"{PREFIX}{state.best_step}" / COMPLETE).is_file())
        if sharded:  # every rank takes part; rank 0 gets the full state dicts
            gathered["weights"], gathered["optimizer_state"] = gather_full_state(model, optimizer)
            if dist.from_main(carry_best):  # rank 0 decides (it holds the run folder); gathering is collective
                gathered["best_weights"] = full_tensors(best_state)
        elif carry_best:
            gathered["best_weights"] = best_state
        if not dist.main:
            return
        save_checkpoint(run_dir, model, optimizer, scheduler, state, **gathered)
        prune_checkpoints(run_dir, t.keep_checkpoints, {state.best_step} if state.best_step else set())

    with TrainProgress(total_steps, state.step) as progress, StopSignals() as signals, speed_ups(model, t, device):
        while state.step < total_steps and not state.stopped_early:
            batches = epoch_batches(train.lengths, t.batch_size, t.seed, state.epoch, t.batching == "length_grouped")
            for idx in batches[state.batch_in_epoch:]:
                # this process's slice of the global batch (all of it with one) and what its loss is averaged over
                part, share = shard(idx, dist, task.batch_weight(train, idx))
                # what the task draws for this batch depends on its position only, so a resumed run draws the same
                rng = np.random.default_rng([t.seed, dist.rank, state.epoch, state.batch_in_epoch])
                loss = micro.run(lambda m: accumulate_gradients(ddp_model, train, part, m, task, device, precision,
                                                                  peft_hook.regularizer, loss_fn, share,
                                                                  engine.backward if engine else None, rng),
                                 model, progress.note)
                loss = dist.mean(loss)  # the global batch's loss on every rank: same logs, same NaN decision
                # clip_grad_norm_ returns the total norm: one pass that both clips and checks for NaN/Inf gradients
                if engine is None:
                    norm = clip_grad_norm(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
                    norm = norm.full_tensor() if sharded else norm  # FSDP: a DTensor, the global norm on every rank
                else:  # ZeRO holds the reduced gradients in its partitions: it clips in its step, checked after it
                    norm = torch.zeros(())
                if not is_finite(loss, norm):
                    optimizer.zero_grad(set_to_none=True)
                    skip_nonfinite(state, t, loss, norm, idx, progress.note)  # or stop, as train.nonfinite says
                    state.batch_in_epoch += 1
                    continue
                lr = scheduler.get_last_lr()[0]  # the lr this step used
                state.step += 1
                step(); scheduler.step(); peft_hook(state.step); optimizer.zero_grad(set_to_none=True)  # noqa: E702
                if engine is not None and not math.isfinite(engine.get_global_grad_norm() or 0.0):
                    raise NonFiniteError(f"non-finite gradient norm at step {state.step} (DeepSpeed applied it); "
                                         "lower train.lr or check the data")
                state.batch_in_epoch += 1
                state.train_tokens += int(train.lengths[idx].sum())
                window_loss += loss
                state.window[1] += 1
                state.window[2] += len(idx)

                if state.step % t.log_every == 0 or state.step == total_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4), "split": "train",
                              "loss": float(window_loss) / state.window[1], "lr": lr,
                              "samples_per_s": state.window[2] / elapsed}
                    tracker.log(record)
                    progress.update(state.step, record)
                    window_loss.zero_()
                    state.window, window_start = [0.0, 0, 0], time.perf_counter()
                else:
                    progress.advance(state.step)

                if val is not None and (state.step % eval_every == 0 or state.step == total_steps):
                    metrics, _ = task.evaluate(model, val, label_names, cfg.eval.batch_size, device, precision)
                    improved = track_best(state, metrics[metric], metrics.get("loss"), task.greater_is_better(metric))
                    if improved and t.restore_best:
                        # only what training changes: with PEFT a few MB instead of a second copy of the model
                        best_state = trainable_snapshot(model)
                    record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
                              "split": "validation", **metrics}
                    tracker.log(record)
                    result.history.append(record)
                    after_validation(state, t, metric, metrics, improved, progress.note, on_eval)

                done = state.stopped_early or state.step >= total_steps
                if signals.requested or (save_every > 0 and state.step % save_every == 0 and not done):
                    checkpoint()
                if signals.requested:
                    raise TrainingInterrupted(run_dir, state.step, signals.requested)
                if done:
                    break
            else:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    result.train_seconds, result.train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if t.restore_best and state.best_step is not None and state.best_step != state.step:
        if best_state is None:  # the best step came before a resume: its checkpoint is kept for this
            best_state = load_weights(run_dir / "checkpoints" / f"step-{state.best_step}" / "model.safetensors")
        if sharded:
            load_full_state(model, optimizer, best_state, None)
        else:
            model.load_state_dict(best_state, strict=False)
        progress.note(f"restored the best weights (step {state.best_step}, {metric}={state.best_metric:.4f})")
    return result


def skip_nonfinite(state: TrainState, t, loss, norm, idx: np.ndarray, note) -> None:
    """A step whose loss or gradient norm is NaN/Inf: counted and noted (train.nonfinite=skip), or the run stops
    with where it happened (stop, or more skips than train.max_skipped_steps)."""
    state.skipped_steps += 1
    where = f"step {state.step + 1} (epoch {state.epoch}, batch {state.batch_in_epoch}, training " \
            f"examples {idx[:6].tolist()}{'...' if len(idx) > 6 else ''})"
    if t.nonfinite == "stop" or state.skipped_steps > t.max_skipped_steps:
        found = f"non-finite loss ({float(loss)}) or gradient norm ({float(norm)}) at {where}"
        if t.nonfinite == "skip":
            found += (f"; that makes {state.skipped_steps} skipped steps, more than "
                      f"train.max_skipped_steps={t.max_skipped_steps}")
        fix = "set train.nonfinite=skip" if t.nonfinite == "stop" else "raise train.max_skipped_steps"
        raise NonFiniteError(f"{found}; checkpoints written before it are kept. Lower train.lr, use "
                             f"train.precision=fp32, check the data, or {fix}")
    note(f"[yellow]skipped {where}: non-finite loss/gradient ({state.skipped_steps}/{t.max_skipped_steps})[/yellow]")


def after_validation(state: TrainState, t, metric: str, metrics: dict, improved: bool, note, on_eval) -> None:
    """Say what a validation found, let the caller see it (tune's pruning may raise), and decide early stopping."""
    note(f"step {state.step}: validation {metric}={metrics[metric]:.4f}{' (best)' if improved else ''} "
         f"loss={metrics['loss']:.4f}")
    if on_eval is not None:
        on_eval(state.step, metrics[metric])
    if t.early_stopping_patience and state.bad_evals >= t.early_stopping_patience:
        note(f"early stopping: no improvement in {state.bad_evals} evaluations")
        state.stopped_early = True


def track_best(state: TrainState, value: float, loss: float | None, higher: bool) -> bool:
    """Record an evaluation; True when it is the new best. A tie of the metric goes to the lower validation loss:
    accuracy saturates on small validation sets (1.0 at every evaluation), and the first of equal values would keep
    the least-trained weights."""
    better = state.best_metric is None or (value > state.best_metric if higher else value < state.best_metric)
    tie_won = (not better and value == state.best_metric and loss is not None
               and (state.best_loss is None or loss < state.best_loss))
    if better or tie_won:
        state.best_metric, state.best_step, state.best_loss, state.bad_evals = value, state.step, loss, 0
    else:
        state.bad_evals += 1
    return better or tie_won
