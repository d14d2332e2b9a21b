"""Words -> subword windows for token classification, and back.

Each sentence is tokenized once without special tokens; a sentence longer than the model allows is cut into windows
that overlap by `stride` subwords and end on word boundaries (a single word longer than a window is the only thing ever
cut), so every word's first subword lies in at least one window. A word's label sits on its first subword; the other
subwords get -100 (ignored by the loss) or, with label_subwords='all', the word's label (I-X after a B-X).
Predictions take each word from the window where it has the most context on both sides.

Raw text is split into words with character offsets (`split_words`), so entities map back to exact text slices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from strop.data.batching import Encoded, collate_inputs, pad_token_labels
from strop.errors import ConfigError

IGNORE = -100
# word shapes fed as token type ids with ner.casing: 0 = special token or no letters, then lower, Title, UPPER, mixed
SHAPES = ("none", "lower", "title", "upper", "mixed")
WORD_PATTERNS = {"simple": re.compile(r"\w+(?:[-'’.]\w+)*|[^\w\s]", re.UNICODE), "whitespace": re.compile(r"\S+")}


def word_shape(word: str) -> int:
    """Index into SHAPES: 'paris' -> 1, 'Paris' -> 2, 'EU' -> 3, 'McDonald' -> 4, '1996' -> 0."""
    letters = [c for c in word if c.isalpha()]
    if not letters:
        return 0
    if all(c.islower() for c in letters):
        return 1
    if all(c.isupper() for c in letters):
        return 2 if len(letters) == 1 else 3
    if letters[0].isupper() and all(c.islower() for c in letters[1:]):
        return 2
    return 4


def split_words(text: str, how: str = "simple") -> list[tuple[str, int, int]]:
    """Raw text -> [(word, start, end)] with text[start:end] == word; 'simple' keeps punctuation apart."""
    return [(m.group(), m.start(), m.end()) for m in WORD_PATTERNS[how].finditer(text)]


@dataclass
class TokenEncoded(Encoded):
    """Windows of subword ids (rows of `input_ids`) and how they map back to sentences and words.

    labels[w]: (len,) int64 label per position of window w (IGNORE where no label). example[w]: its sentence.
    words[w]: (len,) word index per position (-1 for special tokens); first[w]: True at each word's first subword.
    tags[i]: (n_words,) gold tag ids of sentence i, or None. decoding: how evaluation turns word logits into tags.
    """

    example: np.ndarray = None
    words: list = None
    first: list = None
    n_words: list = None
    tags: list | None = None
    n_split: int = 0  # sentences longer than one window
    decoding: str = "constrained"

    @property
    def n_examples(self) -> int:
        return len(self.n_words)


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) special-token ids the tokenizer puts around one sequence, e.g. ([CLS], [SEP])."""
    out = tokenizer(["x"], is_split_into_words=True, add_special_tokens=True)
    words = out.word_ids()
    first = words.index(0)
    last = len(words) - 1 - words[::-1].index(0)
    return out["input_ids"][:first], out["input_ids"][last + 1:]


def window_size(tokenizer, max_length: int, stride: int) -> int:
    """Subwords per window (max_length minus special tokens); it must exceed the stride so windows advance."""
    prefix, suffix = special_tokens(tokenizer)
    size = max_length - len(prefix) - len(suffix)
    if size <= stride:
        raise ConfigError(f"model.max_length={max_length} leaves {size} subwords per window, not more than "
                          f"ner.stride={stride}; raise model.max_length or lower ner.stride")
    return size


def windows(word_ids: list[int], size: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) subword spans of at most `size`, overlapping by >= `stride`, ending on word boundaries."""
    n = len(word_ids)
    if n <= size:
        return [(0, n)]
    spans, start = [], 0
    while True:
        end = min(start + size, n)
        if end < n:
            back = end
            while back > start and word_ids[back] == word_ids[back - 1]:
                back -= 1  # don't cut a word: end before it (unless it fills the whole window)
            if back > start:
                end = back
        spans.append((start, end))
        if end >= n:
            return spans
        nxt = max(end - stride, start + 1)
        while nxt > start + 1 and word_ids[nxt] == word_ids[nxt - 1]:
            nxt -= 1  # start on a word's first subword
        start = nxt


def encode_tokens(tokenizer, examples, max_length: int, stride: int = 32, label_subwords: str = "first",
                  casing: bool = False, labels: list[str] | None = None, decoding: str = "constrained",
                  chunk: int = 2048) -> TokenEncoded:
    """Tokenize sentences (`TokenExamples`) into labelled windows of at most max_length tokens."""
    prefix, suffix = special_tokens(tokenizer)
    size = window_size(tokenizer, max_length, stride)
    inside = _inside_ids(labels) if labels and label_subwords == "all" else None
    ids, types, labs, example, words, first, n_split = [], [] if casing else None, [], [], [], [], 0
    for begin in range(0, len(examples), chunk):
        batch = examples.tokens[begin:begin + chunk]
        out = tokenizer(batch, is_split_into_words=True, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)
        for j, sent in enumerate(batch):
            i = begin + j
            sub = out["input_ids"][j]
            wid = [w if w is not None else -1 for w in out.word_ids(j)]
            is_first = [w >= 0 and (k == 0 or wid[k - 1] != w) for k, w in enumerate(wid)]
            spans = windows(wid, size, stride)
            n_split += len(spans) > 1
            tags = examples.tags[i] if examples.tags is not None else None
            shapes = [word_shape(w) for w in sent] if casing else None
            for s, e in spans:
                pad_l, pad_r = [-1] * len(prefix), [-1] * len(suffix)
                w = np.asarray(pad_l + wid[s:e] + pad_r, dtype=np.int64)
                f = np.asarray([False] * len(prefix) + is_first[s:e] + [False] * len(suffix))
                ids.append(prefix + sub[s:e] + suffix)
                words.append(w)
                first.append(f)
                example.append(i)
                if types is not None:
                    types.append([shapes[x] if x >= 0 else 0 for x in w.tolist()])
                labs.append(_window_labels(w, f, tags, inside))
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TokenEncoded(ids, types, labs if examples.tags is not None else None, lengths, 0, pad_id,
                        np.asarray(example, dtype=np.int64), words, first, [len(t) for t in examples.tokens],
                        examples.tags, n_split, decoding)


def _inside_ids(labels: list[str]) -> np.ndarray:
    """label id -> the id continuation subwords learn (B-X -> I-X; others unchanged)."""
    index = {n: i for i, n in enumerate(labels)}
    return np.asarray([index.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(labels)])


def _window_labels(words: np.ndarray, first: np.ndarray, tags: np.ndarray | None,
                   inside: np.ndarray | None) -> np.ndarray | None:
    if tags is None:
        return None
    out = np.full(len(words), IGNORE, dtype=np.int64)
    out[first] = tags[words[first]]
    if inside is not None:
        rest = (words >= 0) & ~first
        out[rest] = inside[tags[words[rest]]]
    return out


def word_logits(enc: TokenEncoded, window_logits) -> list[np.ndarray]:
    """Per sentence (n_words, num_labels) logits of each word's first subword, from the window where the word has
    the most context (largest distance to the window's edges). Words without subwords get zeros (-> O or uniform).

    window_logits: iterable of (window indices, (batch, seq_len, num_labels) float array).
    """
    out: list[np.ndarray | None] = [None] * enc.n_examples
    context: list[np.ndarray | None] = [None] * enc.n_examples
    for idx, logits in window_logits:
        for row, w in enumerate(idx):
            i = int(enc.example[w])
            if out[i] is None:
                out[i] = np.zeros((enc.n_words[i], logits.shape[-1]), dtype=np.float32)
                context[i] = np.full(enc.n_words[i], -1, dtype=np.int64)
            pos = np.flatnonzero(enc.first[w])
            room = np.minimum(pos, len(enc.words[w]) - 1 - pos)  # subwords of context on the shorter side
            word = enc.words[w][pos]
            better = room > context[i][word]
            out[i][word[better]] = logits[row, pos[better]]
            context[i][word[better]] = room[better]
    return [o if o is not None else np.zeros((n, 1), dtype=np.float32) for o, n in zip(out, enc.n_words)]


def collate_tokens(enc: Encoded, idx: np.ndarray) -> dict:
    """A batch of windows: the padded inputs plus, on labelled splits, one tag id per subword (-100 = not scored:
    special tokens, padding, continuation subwords under label_subwords=first)."""
    batch = collate_inputs(enc, idx)
    if enc.labels is not None:
        batch["labels"] = pad_token_labels(enc.labels, enc.lengths, idx)
    return batch
