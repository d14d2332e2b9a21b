"""Streamed inference over an encoded split: batches in length order, logits on the CPU, scattered back by index.

Task-free: what a batch holds besides the inputs (labels) comes from the `collate` a task passes, and what the
logits mean (probabilities, entities, metrics) is the task's (`strop.tasks`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from strop.data.batching import INPUT_NAMES, Encoded, collate_inputs, eval_batches
from strop.device import autocast
from strop.models.cls_only import computing_first_token, first_token_layer


@torch.inference_mode()
def batched_logits(model, enc: Encoded, batch_size: int, device: torch.device, precision: str = "fp32",
                   collate: Callable[[Encoded, np.ndarray], dict] = collate_inputs,
                   inputs: tuple[str, ...] = INPUT_NAMES) -> Iterator[tuple[np.ndarray, torch.Tensor, dict]]:
    """Yield (indices, logits float32 on CPU, batch) in length-sorted order; logits are (batch, num_labels) or
    (batch, seq_len, num_labels). `collate(enc, idx)` builds each batch; the model sees its `inputs` keys."""
    was_training = model.training
    model.eval()
    fast_layer = first_token_layer(model)  # found once, swapped in per batch (the generator may be left unfinished)
    try:
        for idx in eval_batches(enc.lengths, batch_size):
            batch = collate(enc, idx)
            feed = {k: v.to(device) for k, v in batch.items() if k in inputs}
            with autocast(device, precision), computing_first_token(fast_layer):
                logits = model(**feed).logits
            yield idx, logits.float().cpu(), batch
    finally:
        model.train(was_training)
