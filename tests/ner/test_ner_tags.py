"""Tag schemes: conversions round trip, validation, repair; entity metrics against seqeval."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from strop.data.tags import (allowed_transitions, detect_scheme, from_iob2, from_spans, invalid_positions, repair,
                             spans, tag_names, to_iob2)
from strop.evaluate.entities import EntityMetrics, TagDecoder, viterbi

TYPES = ["PER", "LOC", "ORG"]


def random_spans(rng: random.Random, n: int) -> list[tuple[int, int, str]]:
    """Non-overlapping entities over n words, adjacent entities of one type included."""
    out, i = [], 0
    while i < n:
        if rng.random() < 0.4:
            length = rng.randint(1, min(3, n - i))
            out.append((i, i + length, rng.choice(TYPES)))
            i += length
        else:
            i += rng.randint(1, 2)
    return out


def random_tags(rng: random.Random, n: int, valid: bool = True) -> list[str]:
    if valid:
        return from_spans(random_spans(rng, n), n, "iob2")
    return [rng.choice(["O", "O"] + [f"{p}-{t}" for t in TYPES for p in "BI"]) for _ in range(n)]


def test_examples_of_each_scheme():
    iob2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O", "B-ORG"]
    assert from_iob2(iob2, "iob1") == ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "O", "I-ORG"]
    assert from_iob2(iob2, "bioes") == ["B-PER", "E-PER", "O", "S-LOC", "B-LOC", "E-LOC", "O", "S-ORG"]
    assert spans(iob2) == [(0, 2, "PER"), (3, 4, "LOC"), (4, 6, "LOC"), (7, 8, "ORG")]


@pytest.mark.parametrize("scheme", ["iob1", "bioes", "iob2"])
def test_conversions_round_trip(scheme):
    rng = random.Random(0)
    for _ in range(300):
        tags = random_tags(rng, rng.randint(1, 12))
        other = from_iob2(tags, scheme)
        assert invalid_positions(other, scheme) == []
        assert to_iob2(other, scheme) == tags
        assert spans(to_iob2(other, scheme)) == spans(tags)


def test_detect_scheme():
    assert detect_scheme([["B-PER", "I-PER", "O"]])[0] == "iob2"
    assert detect_scheme([["I-PER", "I-PER", "O", "I-LOC", "B-LOC"]])[0] == "iob1"
    assert detect_scheme([["B-PER", "E-PER", "S-LOC"]])[0] == "bioes"
    # an IOB2 file with a mistake (I- after O) is still IOB2 when other entities start with B- after O
    assert detect_scheme([["O", "B-PER", "I-PER"], ["O", "I-LOC"]])[0] == "iob2"


def test_invalid_positions_name_the_rule():
    bad = invalid_positions(["O", "I-PER", "I-PER", "B-LOC", "I-ORG"], "iob2")
    assert [i for i, _ in bad] == [1, 4]
    assert "I-PER follows O" in bad[0][1] and "I-ORG follows B-LOC" in bad[1][1]
    assert [i for i, _ in invalid_positions(["B-PER", "O"], "bioes")] == [0]  # B- must be closed by E-
    assert [i for i, _ in invalid_positions(["O", "E-PER"], "bioes")] == [1]
    assert [i for i, _ in invalid_positions(["O", "B-PER"], "iob1")] == [1]


def test_repair_gives_valid_sequences_with_the_lenient_entities():
    rng = random.Random(1)
    for _ in range(300):
        tags = random_tags(rng, rng.randint(1, 10), valid=False)
        fixed = repair(tags, "iob2")
        assert invalid_positions(fixed, "iob2") == []
        assert spans(fixed) == spans(tags)  # the entities conlleval would read are kept
    assert repair(["O", "I-PER", "I-PER"], "iob2") == ["O", "B-PER", "I-PER"]


def test_entity_metrics_match_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = random.Random(2)
    gold = [random_tags(rng, rng.randint(1, 15)) for _ in range(400)]
    # predictions: gold with noise, including invalid I- starts (read leniently by both)
    pred = [[t if rng.random() < 0.8 else rng.choice(["O", "B-PER", "I-PER", "I-LOC", "B-ORG"]) for t in g]
            for g in gold]
    m = EntityMetrics()
    for g, p in zip(gold, pred):
        m.update(g, p)
    ours = m.compute()
    assert ours["f1"] == pytest.approx(seqeval.f1_score(gold, pred))
    assert ours["precision"] == pytest.approx(seqeval.precision_score(gold, pred))
    assert ours["recall"] == pytest.approx(seqeval.recall_score(gold, pred))
    assert ours["macro_f1"] == pytest.approx(seqeval.f1_score(gold, pred, average="macro"))
    assert ours["token_accuracy"] == pytest.approx(seqeval.accuracy_score(gold, pred))
    report = seqeval.classification_report(gold, pred, output_dict=True)
    for t in TYPES:
        assert ours["per_type"][t]["f1"] == pytest.approx(report[t]["f1-score"])
        assert ours["per_type"][t]["support"] == report[t]["support"]


def test_constrained_decoding_is_the_best_valid_sequence():
    labels = tag_names(set(TYPES))
    allowed, start = (np.asarray(x) for x in allowed_transitions(labels))
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(1, 5))
        log_probs = np.log(rng.dirichlet(np.ones(len(labels)), size=n))
        best = viterbi(log_probs, allowed, start)
        assert invalid_positions([labels[i] for i in best], "iob2") == []
        # brute force over every valid sequence
        top = max((sum(log_probs[t, s] for t, s in enumerate(seq)), seq)
                  for seq in itertools.product(range(len(labels)), repeat=n)
                  if not invalid_positions([labels[i] for i in seq], "iob2"))
        assert tuple(best) == top[1]
    # argmax would give I-PER after O; constrained decoding does not
    logits = np.full((2, len(labels)), -5.0)
    logits[0, labels.index("O")] = 0.0
    logits[1, labels.index("I-PER")] = 0.0
    logits[1, labels.index("B-PER")] = -0.5
    assert [labels[i] for i in TagDecoder(labels, "argmax")(logits)[0]] == ["O", "I-PER"]
    assert [labels[i] for i in TagDecoder(labels, "constrained")(logits)[0]] == ["O", "B-PER"]
