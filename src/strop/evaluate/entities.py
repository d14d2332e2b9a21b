"""Token classification: decoding word logits into IOB2 tags, and entity-level metrics.

Entities are compared exactly (same words, same type), as conlleval and seqeval's default mode do; tests check the
numbers against seqeval. Token accuracy counts words (a word's tag is that of its first subword).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from strop.data.tags import allowed_transitions, spans
from strop.data.tokens import collate_tokens, word_logits
from strop.evaluate.evaluator import batched_logits


def viterbi(log_probs: np.ndarray, allowed: np.ndarray, allowed_start: np.ndarray) -> np.ndarray:
    """Best tag sequence under the transition mask. log_probs: (n_words, L); allowed: (L, L) bool; -> (n_words,)."""
    n, num = log_probs.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    forbid = np.where(allowed, 0.0, -np.inf)
    score = log_probs[0] + np.where(allowed_start, 0.0, -np.inf)
    back = np.zeros((n, num), dtype=np.int64)
    for t in range(1, n):
        total = score[:, None] + forbid  # (prev, cur)
        back[t] = total.argmax(0)
        score = total.max(0) + log_probs[t]
    best = np.empty(n, dtype=np.int64)
    best[-1] = int(score.argmax())
    for t in range(n - 1, 0, -1):
        best[t - 1] = back[t, best[t]]
    return best


class TagDecoder:
    """Word logits -> (tag ids, per-word probability of the chosen tag); constrained = only valid IOB2 sequences."""

    def __init__(self, labels: list[str], decoding: str = "constrained"):
        self.labels, self.decoding = labels, decoding
        allowed, start = allowed_transitions(labels)
        self.allowed, self.start = np.asarray(allowed), np.asarray(start)

    def __call__(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = logits.astype(np.float64)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        if self.decoding == "constrained" and log_probs.shape[-1] == len(self.labels):
            ids = viterbi(log_probs, self.allowed, self.start)
        else:
            ids = log_probs.argmax(-1)
        return ids, np.exp(log_probs[np.arange(len(ids)), ids]) if len(ids) else np.zeros(0)


class EntityMetrics:
    """Streamed entity counts per type: update with (gold tag names, predicted tag names) per sentence."""

    def __init__(self):
        self.true, self.pred, self.hit = Counter(), Counter(), Counter()
        self.words = self.correct_words = 0

    def update(self, gold: list[str], pred: list[str]) -> None:
        g, p = set(spans(gold)), set(spans(pred))
        self.true.update(t for _, _, t in g)
        self.pred.update(t for _, _, t in p)
        self.hit.update(t for _, _, t in g & p)
        self.words += len(gold)
        self.correct_words += sum(a == b for a, b in zip(gold, pred))

    def compute(self) -> dict:
        """precision/recall/f1 (micro over entities), macro_f1 (mean over types), token_accuracy, per_type."""
        def prf(hit, pred, true):
            p = hit / pred if pred else 0.0
            r = hit / true if true else 0.0
            return p, r, 2 * p * r / (p + r) if p + r else 0.0

        per_type = {}
        for t in sorted(set(self.true) | set(self.pred)):
            p, r, f = prf(self.hit[t], self.pred[t], self.true[t])
            per_type[t] = {"precision": p, "recall": r, "f1": f, "support": self.true[t]}
        p, r, f = prf(sum(self.hit.values()), sum(self.pred.values()), sum(self.true.values()))
        macro = float(np.mean([v["f1"] for v in per_type.values()])) if per_type else 0.0
        return {"f1": f, "precision": p, "recall": r, "macro_f1": macro,
                "token_accuracy": self.correct_words / self.words if self.words else 0.0,
                "entities": sum(self.true.values()), "per_type": per_type}


def evaluate_tokens(model, enc, label_names: list[str], batch_size: int, device, precision: str = "fp32",
                    keep_outputs: bool = False) -> tuple[dict, list | None]:
    """Entity metrics and mean token loss on a labelled `TokenEncoded` split; with keep_outputs also the predicted
    tag ids per sentence."""
    loss_sum, scored = 0.0, 0

    def stream():
        nonlocal loss_sum, scored
        for idx, logits, batch in batched_logits(model, enc, batch_size, device, precision, collate_tokens):
            labels = batch["labels"]
            n = int((labels != -100).sum())
            if n:
                loss_sum += float(torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"))
                scored += n
            yield idx, logits.numpy()

    decode = TagDecoder(label_names, enc.decoding)
    metrics, kept = EntityMetrics(), []
    for i, logits in enumerate(word_logits(enc, stream())):
        ids, _ = decode(logits)
        metrics.update([label_names[t] for t in enc.tags[i]], [label_names[t] for t in ids])
        if keep_outputs:
            kept.append(ids)
    result = metrics.compute()
    result["loss"] = loss_sum / max(1, scored)
    return result, kept if keep_outputs else None
