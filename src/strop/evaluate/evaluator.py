"""Streamed inference over an encoded split: logits -> task outputs -> metrics, in input order."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from strop.data.batching import Encoded, collate, eval_batches
from strop.device import autocast
from strop.evaluate.metrics import ClassificationMetrics, MultiLabelMetrics, RegressionMetrics
from strop.models.classifier import task_loss
from strop.models.cls_only import computing_first_token, first_token_layer

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@torch.inference_mode()
def batched_logits(model, enc: Encoded, batch_size: int, device: torch.device, precision: str = "fp32"
                   ) -> Iterator[tuple[np.ndarray, torch.Tensor, dict]]:
    """Yield (indices, logits (batch, num_labels) float32 on CPU, batch) in length-sorted order."""
    was_training = model.training
    model.eval()
    fast_layer = first_token_layer(model)  # found once, swapped in per batch (the generator may be left unfinished)
    try:
        for idx in eval_batches(enc.lengths, batch_size):
            batch = collate(enc, idx)
            inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
            with autocast(device, precision), computing_first_token(fast_layer):
                logits = model(**inputs).logits
            yield idx, logits.float().cpu(), batch
    finally:
        model.train(was_training)


def outputs(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Logits -> probabilities (softmax / sigmoid) or values (regression), (batch, num_labels) or (batch,)."""
    if task == "single_label":
        return logits.softmax(-1)
    if task == "multi_label":
        return logits.sigmoid()
    return logits.squeeze(-1)


def evaluate(model, enc: Encoded, task: str, label_names: list[str], batch_size: int, device: torch.device,
             precision: str = "fp32", threshold: float = 0.5, keep_outputs: bool = False) -> tuple[dict, np.ndarray | None]:
    """Metrics (plus mean `loss`) on a labelled split; with keep_outputs also the outputs in input order
    ((n, L) probabilities or (n,) values), which multi-label threshold tuning needs."""
    if task == "token_classification":  # entity metrics over words, windows merged back into sentences
        from strop.evaluate.entities import evaluate_tokens

        return evaluate_tokens(model, enc, label_names, batch_size, device, precision, keep_outputs)
    metrics = {"single_label": lambda: ClassificationMetrics(label_names),
               "multi_label": lambda: MultiLabelMetrics(label_names, threshold),
               "regression": RegressionMetrics}[task]()
    kept = None
    loss_sum = 0.0
    for idx, logits, batch in batched_logits(model, enc, batch_size, device, precision):
        labels = batch["labels"]
        loss_sum += float(task_loss(logits, labels, task)) * len(idx)
        out = outputs(logits, task)
        metrics.update(out.argmax(-1) if task == "single_label" else out, labels)
        if keep_outputs:
            if kept is None:
                kept = np.zeros((len(enc),) + tuple(out.shape[1:]), dtype=np.float32)
            kept[idx] = out.numpy()
    result = metrics.compute()
    result["loss"] = loss_sum / max(1, len(enc))
    return result, kept
