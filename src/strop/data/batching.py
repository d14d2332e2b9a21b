"""Tokenize once, then build batches: dynamic padding, length-grouped order, deterministic per (seed, epoch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from strop.data.examples import Examples


@dataclass
class Encoded:
    """A tokenized split. input_ids[i]: list of token ids of example i (special tokens included, truncated)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: np.ndarray | list | None  # list of (len,) arrays for token classification
    lengths: np.ndarray  # (n,) tokens per example after truncation
    n_truncated: int  # examples that were longer than max_length
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer, examples: Examples, max_length: int, chunk: int = 4096) -> Encoded:
    """Tokenize all examples once (fast tokenizer, batched); truncation is counted, not silent."""
    ids, types, n_truncated = [], [] if examples.pairs is not None else None, 0
    for start in range(0, len(examples), chunk):
        texts = examples.texts[start:start + chunk]
        pairs = examples.pairs[start:start + chunk] if examples.pairs is not None else None
        full = tokenizer(texts, pairs, truncation=False, verbose=False, return_attention_mask=False,
                         return_token_type_ids=False)["input_ids"]
        long = [j for j, x in enumerate(full) if len(x) > max_length]
        n_truncated += len(long)
        if long or pairs is not None:
            # re-tokenize with the tokenizer's own truncation so special tokens and pair handling stay right
            out = tokenizer(texts, pairs, truncation=True, max_length=max_length, return_attention_mask=False,
                            return_token_type_ids=pairs is not None)
            full = out["input_ids"]
            if types is not None:
                types += out["token_type_ids"]
        ids += full
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    return Encoded(ids, types, examples.labels, lengths, n_truncated, pad_id)


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, grouped: bool = True,
                  group_size: int = 64) -> list[np.ndarray]:
    """Batches of example indices for one epoch; the same (seed, epoch) always gives the same batches.

    grouped: shuffle, then sort windows of `group_size` batches by length so each batch holds similar lengths
    (little padding) while the epoch order stays random.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if grouped:
        window = batch_size * group_size
        order = np.concatenate([w[np.argsort(-lengths[w], kind="stable")]
                                for w in np.array_split(order, max(1, -(-len(order) // window)))])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if grouped:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def eval_batches(lengths: np.ndarray, batch_size: int, max_padding: float = 0.25) -> list[np.ndarray]:
    """Batches for inference, longest first; callers scatter results back to input order.

    Sorted by length, each batch takes at most `batch_size` examples and is cut early when padding would exceed
    `max_padding` of its real tokens. In a large set neighbours in length order are nearly equal, so this rarely
    cuts; in a small mixed one (a serving batch of 32 sentences of 3 to 60 tokens) it makes a few batches of similar
    length instead of one padded to the longest, which is about half padding.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest, real, end = int(lengths[order[start]]), 0, start
        while end < len(order) and end - start < batch_size:
            n = int(lengths[order[end]])
            if end > start and longest * (end - start + 1) > (1 + max_padding) * (real + n):
                break
            real, end = real + n, end + 1
        batches.append(order[start:end])
        start = end
    return batches


# what collate_inputs gives: the model inputs of the encoder tasks (a task's `model_inputs` may differ)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def collate_inputs(enc: Encoded, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """Pad the examples `idx` to the longest among them: input_ids, attention_mask (and token_type_ids)
    LongTensors of shape (batch, seq_len). Labels are the task's business (`Task.collate`)."""
    width = int(enc.lengths[idx].max())
    input_ids = np.full((len(idx), width), enc.pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    types = np.zeros((len(idx), width), dtype=np.int64) if enc.token_type_ids is not None else None
    for row, i in enumerate(idx):
        n = enc.lengths[i]
        input_ids[row, :n] = enc.input_ids[i]
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = enc.token_type_ids[i]
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
    if types is not None:
        batch["token_type_ids"] = torch.from_numpy(types)
    return batch


def pad_token_labels(labels: list, lengths: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """One label per token of each example `idx`, padded with -100 (not scored): (batch, seq_len) LongTensor."""
    out = np.full((len(idx), int(lengths[idx].max())), -100, dtype=np.int64)
    for row, i in enumerate(idx):
        out[row, :lengths[i]] = labels[i]
    return torch.from_numpy(out)
