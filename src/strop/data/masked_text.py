"""Documents -> packed rows of model.max_length tokens; whole-word masks drawn per batch (masked LM).

Packing: every document is tokenized without special tokens, the documents are joined by the separator
token ([SEP]) into one stream, and the stream is cut into rows of max_length - 2 tokens, each wrapped as
[CLS] ... [SEP]. Rows are full but the last, so no compute goes to padding, and a long document is read
whole across rows instead of being truncated.

Masking (BERT's recipe on whole words): each word of a row (the fast tokenizer's `word_ids`; a word cut by
a row boundary counts once in each row) is chosen with probability `mlm.probability`, all its subword
tokens together; of the chosen tokens 80% become [MASK], 10% a random token of the vocabulary (special
tokens excluded) and 10% stay as they are; the loss reads the chosen tokens only. A row with no word chosen
gets one, so every row scores something. Training masks come from the `rng` the loop seeds from the batch's
position (a resumed run draws the same); evaluation masks (rng=None) from a generator per row seeded with
EVAL_MASK_SEED and the row's index, so the same rows get the same masks at every evaluation and in
`strop eval`: perplexities compare across steps, runs and seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from strop.data.batching import Encoded, collate_inputs

EVAL_MASK_SEED = 20_181_011  # BERT's arXiv date: any fixed number, the same for every run
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens: [MASK], a random token; the rest stay (BERT)
TOKENIZE_CHUNK = 1024  # documents per tokenizer call


@dataclass
class PackedText(Encoded):
    """Packed rows of a split. input_ids[i]: (len,) int64 token ids, [CLS] ... [SEP]; word_ids[i]: (len,)
    int64, the word of each token (ids unique within the split), -1 for special tokens (never masked)."""

    word_ids: list[np.ndarray] | None = None
    n_documents: int = 0
    n_tokens: int = 0  # tokens of the documents (separators and row specials not counted)
    mask_id: int = 0
    replacements: np.ndarray | None = None  # (V',) ids a chosen token may become: non-special vocabulary
    probability: float = 0.15  # mlm.probability: share of words chosen per row


def document_stream(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, word ids) of all documents joined by the separator: two (tokens,) int64 arrays, word ids
    numbered across documents, -1 at separators."""
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    ids, words, next_word = [], [], 0
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        out = tokenizer(texts[start:start + TOKENIZE_CHUNK], add_special_tokens=False, verbose=False,
                        return_attention_mask=False, return_token_type_ids=False)
        for i, doc in enumerate(out["input_ids"]):
            w = np.array([-1 if x is None else x for x in out.word_ids(i)], dtype=np.int64)
            if sep is not None and ids:
                ids.append(np.array([sep], dtype=np.int64))
                words.append(np.array([-1], dtype=np.int64))
            ids.append(np.asarray(doc, dtype=np.int64))
            words.append(np.where(w >= 0, w + next_word, -1))
            next_word += int(w.max()) + 1 if len(w) else 0
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(ids), np.concatenate(words)


def pack_documents(tokenizer, texts: list[str], max_length: int, probability: float) -> PackedText:
    """The documents `texts` as rows of at most `max_length` tokens (see the module doc)."""
    stream, stream_words = document_stream(tokenizer, texts)
    head = [] if tokenizer.cls_token_id is None else [tokenizer.cls_token_id]
    tail = [] if tokenizer.sep_token_id is None else [tokenizer.sep_token_id]
    room = max_length - len(head) - len(tail)
    rows, row_words = [], []
    for start in range(0, len(stream), room):
        rows.append(np.concatenate([head, stream[start:start + room], tail]).astype(np.int64))
        row_words.append(np.concatenate([[-1] * len(head), stream_words[start:start + room],
                                         [-1] * len(tail)]).astype(np.int64))
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    replacements = np.setdiff1d(np.arange(len(tokenizer), dtype=np.int64), special)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PackedText(rows, None, None, lengths, 0, pad, word_ids=row_words, n_documents=len(texts),
                      n_tokens=int((stream_words >= 0).sum()), mask_id=tokenizer.mask_token_id,
                      replacements=replacements, probability=probability)


def mask_row(ids: np.ndarray, words: np.ndarray, enc: PackedText, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of one row, each (len,) int64: whole words chosen with enc.probability (at least
    one), their tokens 80/10/10 [MASK] / random / kept; labels: the original ids there, -100 elsewhere."""
    candidates = np.unique(words[words >= 0])
    chosen = candidates[rng.random(len(candidates)) < enc.probability]
    if not len(chosen) and len(candidates):
        chosen = candidates[rng.integers(len(candidates), size=1)]
    picked = np.isin(words, chosen)
    labels = np.where(picked, ids, -100)
    roll = rng.random(len(ids))
    inputs = ids.copy()
    inputs[picked & (roll < MASK_SHARE)] = enc.mask_id
    swap = picked & (roll >= MASK_SHARE) & (roll < MASK_SHARE + RANDOM_SHARE)
    inputs[swap] = enc.replacements[rng.integers(len(enc.replacements), size=int(swap.sum()))]
    return inputs, labels


def collate_masked(enc: PackedText, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict:
    """A padded batch of rows `idx` with masks drawn: input_ids (masked), attention_mask and labels, each
    (batch, seq_len) LongTensor, labels -100 where nothing is scored. rng=None: the fixed evaluation
    masks."""
    batch = collate_inputs(enc, idx)
    inputs = batch["input_ids"].numpy()  # shares memory with the tensor: filled in place
    labels = np.full(inputs.shape, -100, dtype=np.int64)
    for row, i in enumerate(idx):
        n = int(enc.lengths[i])
        gen = rng if rng is not None else np.random.default_rng([EVAL_MASK_SEED, int(i)])
        inputs[row, :n], labels[row, :n] = mask_row(enc.input_ids[i], enc.word_ids[i], enc, gen)
    batch["labels"] = torch.from_numpy(labels)
    return batch
