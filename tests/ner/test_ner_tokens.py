"""Subword alignment, sliding windows (no entity dropped), word shapes and character offsets."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from strop.data.ner import TokenExamples
from strop.data.tags import spans
from strop.data.tokens import IGNORE, collate_tokens, encode_tokens, split_words, windows, word_logits, word_shape
from strop.errors import ConfigError
from strop.evaluate.entities import TagDecoder
from strop.models.backbone import default_model_path

LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(default_model_path()))


def examples(sentences) -> TokenExamples:
    return TokenExamples([s for s, _ in sentences], [np.asarray([LABELS.index(t) for t in g]) for _, g in sentences],
                         [])


def test_labels_sit_on_first_subwords(tokenizer):
    # 'blackburn' and 'huntingdonshire' split into several subwords in the uncased vocabulary
    sent = (["Peter", "Blackburn", "visited", "Huntingdonshire"], ["B-PER", "I-PER", "O", "B-LOC"])
    enc = encode_tokens(tokenizer, examples([sent]), 32, 4)
    ids, words, labels = enc.input_ids[0], enc.words[0], enc.labels[0]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert len(ids) > 6  # some words have several subwords
    firsts = [k for k in range(len(ids)) if enc.first[0][k]]
    assert [int(words[k]) for k in firsts] == [0, 1, 2, 3]
    assert [LABELS[labels[k]] for k in firsts] == sent[1]
    assert all(labels[k] == IGNORE for k in range(len(ids)) if k not in firsts)
    every = encode_tokens(tokenizer, examples([sent]), 32, 4, label_subwords="all", labels=LABELS)
    # continuation subwords of B-LOC learn I-LOC; of I-PER, I-PER; special tokens stay ignored
    rest = [k for k in range(1, len(ids) - 1) if k not in firsts]
    assert {LABELS[every.labels[0][k]] for k in rest if words[k] == 3} == {"I-LOC"}
    assert every.labels[0][0] == IGNORE and every.labels[0][-1] == IGNORE
    batch = collate_tokens(enc, np.array([0]))
    assert batch["labels"].shape == batch["input_ids"].shape and int(batch["labels"][0, 0]) == IGNORE


def test_windows_cover_every_word_whole():
    rng = random.Random(0)
    for _ in range(200):
        word_ids = [w for w in range(rng.randint(1, 60)) for _ in range(rng.randint(1, 3))]
        size, stride = rng.randint(4, 12), rng.randint(0, 3)
        spans_ = windows(word_ids, size, stride)
        assert all(0 < e - s <= size for s, e in spans_)
        assert spans_[0][0] == 0 and spans_[-1][1] == len(word_ids)
        assert all(b[0] < a[1] + 1 and b[0] > a[0] for a, b in zip(spans_, spans_[1:]))  # no gap, progress
        for w in set(word_ids):  # every word lies whole inside some window
            pos = [k for k, x in enumerate(word_ids) if x == w]
            assert any(s <= pos[0] and pos[-1] < e for s, e in spans_)


def test_long_sentence_keeps_every_entity(tokenizer):
    """A sentence of ~5x max_length: windows with stride, entities at every boundary survive the round trip."""
    rng = random.Random(1)
    words, tags = [], []
    for i in range(90):
        if i % 7 == 3:
            words += ["Huntingdonshire", "Blackburn"]
            tags += ["B-LOC", "I-LOC"]
        else:
            words.append(rng.choice(["the", "report", "said", "on"]))
            tags.append("O")
    ex = examples([(words, tags)])
    enc = encode_tokens(tokenizer, ex, 24, 6)
    assert enc.n_split == 1 and len(enc) > 5 and max(enc.lengths) <= 24
    # a perfect model: logits from the labels of each window -> word tags -> the gold entities, none dropped
    stream = []
    for w in range(len(enc)):
        logits = np.full((1, enc.lengths[w], len(LABELS)), -9.0, dtype=np.float32)
        for k, word in enumerate(enc.words[w]):
            if word >= 0:
                logits[0, k, ex.tags[0][word]] = 9.0
        stream.append((np.array([w]), logits))
    per_word = word_logits(enc, stream)[0]
    assert per_word.shape == (len(words), len(LABELS))
    ids, _ = TagDecoder(LABELS)(per_word)
    assert spans([LABELS[i] for i in ids]) == spans(tags)
    assert len(spans(tags)) == 13


def test_stride_must_leave_room(tokenizer):
    with pytest.raises(ConfigError, match=r"model.max_length=8 leaves 6 subwords per window, not more than "
                                          r"ner.stride=6"):
        encode_tokens(tokenizer, examples([(["a"], ["O"])]), 8, 6)


def test_word_shapes_and_casing_type_ids(tokenizer):
    assert [word_shape(w) for w in ["paris", "Paris", "EU", "McDonald", "1996", "I", "U.S."]] == [1, 2, 3, 4, 0, 2, 3]
    enc = encode_tokens(tokenizer, examples([(["EU", "rejects", "German", "call"], ["B-LOC", "O", "B-LOC", "O"])]),
                        32, 4, casing=True)
    types = enc.token_type_ids[0]
    assert types[0] == 0 and types[-1] == 0  # special tokens
    firsts = [types[k] for k in range(len(types)) if enc.first[0][k]]
    assert firsts == [3, 1, 2, 1]
    assert torch.equal(collate_tokens(enc, np.array([0]))["token_type_ids"][0], torch.tensor(types))


def test_split_words_offsets_slice_back():
    text = "Dr. Anna-Lena O'Neill  flew to São Paulo, Brazil (via U.S.A.) on 3.5.2024!"
    for how in ("simple", "whitespace"):
        words = split_words(text, how)
        assert all(text[s:e] == w for w, s, e in words)
        assert "".join(w for w, _, _ in words) == "".join(text.split())
    simple = [w for w, _, _ in split_words(text, "simple")]
    assert "Anna-Lena" in simple and "O'Neill" in simple and "," in simple and "Paulo" in simple
