"""Distillation: a shallower student cut from the teacher, trained on the teacher's soft labels plus gold labels.

The student is the teacher with evenly spaced layers kept (every other layer for half the depth, last layer
included), initialised from the teacher's weights (embeddings, kept layers, pooler and head), so it starts close to
the teacher. Training reuses strop's loop (`training.loop.fit`) with a distillation loss instead of the task loss.

A small training set teaches a student little beyond what the gold labels say; the teacher can label more text. With
`augment=n`, every training example gets n perturbed copies (Tang et al. 2019, "Distilling task-specific knowledge from
BERT into simple neural networks": per word, mask it or swap in a word drawn from the training corpus, and sometimes
keep only a random n-gram); those rows carry no gold label and train on the teacher's soft labels alone.
"""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import torch
from torch import nn

from strop.compress.prune import base_of, encoder_layers
from strop.data.examples import Examples
from strop.device import autocast
from strop.errors import ExportError


def kept_layers(n_teacher: int, n_student: int) -> list[int]:
    """Indices of teacher layers the student keeps: evenly spaced, ending with the last one.
    6 -> 3 keeps [1, 3, 5] (every other layer); 12 -> 4 keeps [2, 5, 8, 11]."""
    if n_teacher < 2:
        raise ExportError(f"--distill {n_student}: the teacher has only {n_teacher} layer, so there is no shallower "
                          "student to cut from it; export without --distill")
    if not 1 <= n_student < n_teacher:
        raise ExportError(f"--distill {n_student}: the student needs fewer layers than the teacher's {n_teacher}; "
                          f"give {'1' if n_teacher == 2 else f'1 to {n_teacher - 1}'}")
    step = n_teacher / n_student
    return [round((i + 1) * step) - 1 for i in range(n_student)]


def make_student(teacher: nn.Module, n_layers: int) -> nn.Module:
    """A copy of `teacher` with only `n_layers` of its encoder layers (weights copied, not shared)."""
    layers = encoder_layers(teacher)
    keep = kept_layers(len(layers), n_layers)
    student = copy.deepcopy(teacher)
    base = base_of(student)
    base.encoder.layer = nn.ModuleList([base.encoder.layer[i] for i in keep])
    for i, layer in enumerate(base.encoder.layer):  # layer_idx indexes caches; keep it consistent with the new depth
        att = getattr(layer.attention, "self", None)
        if att is not None and hasattr(att, "layer_idx"):
            att.layer_idx = i
    for config in {id(c): c for c in (student.config, base.config)}.values():
        config.num_hidden_layers = n_layers
    return student


def check_distill_settings(temperature: float, alpha: float) -> None:
    """--temperature must be a finite number > 0 and --alpha a weight in [0, 1]."""
    if not 0 < temperature < math.inf:
        raise ExportError(f"--temperature {temperature}: the distillation temperature must be a number > 0 "
                          "(1 = the teacher's own probabilities, 2-4 is usual), e.g. --temperature 2")
    if not 0 <= alpha <= 1:
        raise ExportError(f"--alpha {alpha}: the weight of the teacher's soft labels must be in [0, 1] (1 - alpha "
                          "goes to the gold labels), e.g. --alpha 0.5")


def distillation_loss(teacher: nn.Module, task, temperature: float, alpha: float, device: torch.device,
                      precision: str):
    """loss_fn(student_logits, batch) for `fit`: alpha * soft loss + (1 - alpha) * task loss on gold labels.

    The soft loss is the task's (`task.soft_loss`: KL on softened distributions for single-label, ...); rows
    without a gold label (`task.gold_rows`: augmented copies) are trained by the soft loss alone.
    """
    check_distill_settings(temperature, alpha)
    teacher.eval().to(device)
    t = temperature

    def loss_fn(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        with torch.no_grad(), autocast(device, precision):
            target = teacher(**{k: v for k, v in batch.items() if k in task.model_inputs}).logits
        student, target = logits.float(), target.float()
        soft = task.soft_loss(student, target, t)
        labels = batch["labels"]
        gold = task.gold_rows(labels)  # augmented rows have no gold label: the soft loss alone trains them
        if bool(gold.all()):
            hard = task.loss(student, batch)
        elif bool(gold.any()):  # mean over the batch, with the rows that lack a gold label counted as 0
            hard = task.loss(student[gold], {"labels": labels[gold]}) * gold.float().mean()
        else:
            hard = student.new_zeros(())
        return alpha * soft + (1 - alpha) * hard

    return loss_fn


def augment(examples: Examples, copies: int, seed: int, mask_token: str | None, p_mask: float = 0.1,
            p_swap: float = 0.1, p_ngram: float = 0.25, max_ngram: int = 5) -> Examples:
    """`copies` perturbed versions of every example, without gold labels (-1 / NaN), for the teacher to label.

    Per word (whitespace split): with p_mask replace it by `mask_token` (dropped when the tokenizer has none), with
    p_swap by a word drawn from the training texts (by frequency). Then, with p_ngram, keep only a random n-gram
    (n = 1..max_ngram) of a single text; text pairs keep both sides whole. Exact duplicates of the original are
    redrawn (up to 5 tries). Deterministic for a given seed.
    """
    if copies < 1:
        raise ExportError(f"distillation augmentation needs at least 1 copy per example (got {copies})")
    rng = random.Random(seed)
    corpus = [w for t in examples.texts for w in t.split()]
    if examples.pairs is not None:
        corpus += [w for t in examples.pairs for w in t.split()]
    if not corpus:
        raise ExportError("distillation augmentation found no words in the training texts")

    def perturb(text: str, ngram: bool) -> str:
        words = []
        for w in text.split():
            r = rng.random()
            if r < p_mask:
                if mask_token:
                    words.append(mask_token)
            elif r < p_mask + p_swap:
                words.append(rng.choice(corpus))
            else:
                words.append(w)
        if ngram and len(words) > 1 and rng.random() < p_ngram:
            n = rng.randint(1, min(max_ngram, len(words)))
            start = rng.randint(0, len(words) - n)
            words = words[start:start + n]
        return " ".join(words) or text

    texts, pairs, rows = [], [] if examples.pairs is not None else None, []
    for i, text in enumerate(examples.texts):
        pair = examples.pairs[i] if pairs is not None else None
        for _ in range(copies):
            for _try in range(5):
                new = perturb(text, pair is None)
                new_pair = perturb(pair, False) if pair is not None else None
                if new != text or new_pair != pair:
                    break
            texts.append(new)
            if pairs is not None:
                pairs.append(new_pair)
            rows.append(examples.rows[i])
    labels = examples.labels
    if labels is None:
        none = None
    elif labels.dtype.kind in "iu":
        none = np.full((len(texts),), -1, dtype=labels.dtype)
    else:
        none = np.full((len(texts), *labels.shape[1:]), np.nan, dtype=labels.dtype)
    return Examples(texts, pairs, none, rows)


def concat(a: Examples, b: Examples) -> Examples:
    """The rows of a, then those of b (labels stacked; both labelled or both not)."""
    labels = None if a.labels is None else np.concatenate([a.labels, b.labels])
    pairs = None if a.pairs is None else a.pairs + b.pairs
    return Examples(a.texts + b.texts, pairs, labels, a.rows + b.rows)
