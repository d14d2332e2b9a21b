"""Token-classification data: files -> validated IOB2 examples per split, the tag names and the file's scheme."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from strop.data.conll import CONLL_SUFFIXES, Sentence, jsonl_has_token_lists, looks_like_conll, read_sentences
from strop.data.examples import Columns
from strop.data.prepare import Dataset
from strop.data.split import split_ratio
from strop.data.tags import check_tag, detect_scheme, invalid_positions, repair, tag_names, to_iob2
from strop.errors import DataError

TASK = "token_classification"


@dataclass
class TokenExamples:
    """Validated sentences of one split. tags[i]: (n_words,) int64 ids of IOB2 tag names, or None (unlabelled)."""

    tokens: list[list[str]]
    tags: list[np.ndarray] | None
    sentences: list[Sentence]  # where each came from (file:line), for messages

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, idx) -> TokenExamples:
        return TokenExamples([self.tokens[i] for i in idx], None if self.tags is None else [self.tags[i] for i in idx],
                             [self.sentences[i] for i in idx])


@dataclass
class TokenDataset(Dataset):
    scheme: str = "iob2"  # tag scheme of the input files (predictions can be written back in it)

    def carve_missing(self, d) -> None:
        """Validation/test sentences from train where no file gave them (a seeded shuffle, not stratified)."""
        _carve(self.splits, d, self.notes)


def is_token_data(cfg) -> bool:
    """task=token_classification, or task=auto with a CoNLL file / a JSONL file of token lists as data.train."""
    if cfg.task == TASK:
        return True
    if cfg.task != "auto" or not cfg.data.train:
        return False
    path = Path(cfg.data.train)
    if cfg.data.format == "conll":
        return True
    if cfg.data.format not in ("auto", "jsonl") or not path.is_file():
        return False
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return jsonl_has_token_lists(path, cfg.data.encoding)
    if suffix == ".txt":
        return looks_like_conll(path)
    return cfg.data.format == "auto" and suffix in CONLL_SUFFIXES


def resolve_scheme(configured: str, sentences: list[Sentence]) -> tuple[str, str]:
    if configured != "auto":
        return ("iob2" if configured == "bio" else configured), "set by ner.scheme"
    return detect_scheme(s.tags for s in sentences)


def check_sentences(sentences: list[Sentence], scheme: str, invalid: str, split: str,
                    notes: list[str]) -> list[list[str]]:
    """IOB2 tags of every sentence; malformed tags raise, invalid sequences are repaired (noted) or refused."""
    out, repaired = [], []
    for s in sentences:
        for i, tag in enumerate(s.tags):
            problem = check_tag(tag, scheme)
            if problem:
                raise DataError(f"{s.where(i)}: {problem} (token {s.tokens[i]!r}); fix the tag, or set ner.scheme / "
                                "ner.tag_column if the file uses another layout")
        bad = invalid_positions(s.tags, scheme)
        tags = s.tags
        if bad:
            if invalid == "refuse":
                i, why = bad[0]
                raise DataError(f"{s.where(i)}: invalid {scheme.upper()} sequence: {why} (token {s.tokens[i]!r}); "
                                f"fix the tags, or set ner.invalid=repair to repair such places "
                                f"({len(bad)} in this sentence)")
            repaired += [f"{s.where(i)} ({why})" for i, why in bad]
            tags = repair(tags, scheme)
        out.append(to_iob2(tags, scheme))
    if repaired:
        notes.append(f"{split}: repaired {len(repaired)} invalid tag(s) (ner.invalid=repair), e.g. "
                     + "; ".join(repaired[:3]))
    return out


def to_token_examples(sentences: list[Sentence], tags: list[list[str]], index: dict[str, int],
                      split: str) -> TokenExamples:
    ids = []
    for s, seq in zip(sentences, tags):
        for i, tag in enumerate(seq):
            if tag not in index:
                raise DataError(f"{s.where(i)}: entity type of {tag!r} in the {split} split never occurs in the "
                                f"training data (known tags: {sorted(index)}); fix the tag or add training examples")
        ids.append(np.fromiter((index[t] for t in seq), dtype=np.int64, count=len(seq)))
    return TokenExamples([s.tokens for s in sentences], ids, sentences)


def prepare_tokens(cfg, carve: bool = True) -> TokenDataset:
    """Read, validate, convert (to IOB2) and split token-classification data as `cfg.data` and `cfg.ner` say
    (carve=False: as `prepare`)."""
    d, n = cfg.data, cfg.ner
    if not d.train:
        raise DataError("data.train is not set; give a training file, e.g. `strop train data.train=train.conll`")
    fmt = d.format if d.format in ("conll", "jsonl") else "auto"
    if d.format not in ("auto", "conll", "jsonl"):
        raise DataError(f"task=token_classification reads CoNLL or JSONL files, not data.format={d.format!r}")
    raw = {"train": read_sentences(d.train, fmt, n, True, d.encoding)}
    for split in ("validation", "test"):
        if getattr(d, split):
            raw[split] = read_sentences(getattr(d, split), fmt, n, True, d.encoding)
    scheme, why = resolve_scheme(n.scheme, raw["train"])
    notes = [f"task: {TASK}; tag scheme {scheme.upper()} ({why}), IOB2 inside"]
    iob2 = {split: check_sentences(sents, scheme, n.invalid, split, notes) for split, sents in raw.items()}
    types = {t[2:] for seq in iob2["train"] for t in seq if t != "O"}
    if not types:
        raise DataError(f"{d.train}: every tag is O; token classification needs tagged entities (B-PER, I-LOC, ...)")
    labels = tag_names(types)
    index = {name: i for i, name in enumerate(labels)}
    splits = {split: to_token_examples(raw[split], iob2[split], index, split) for split in raw}
    ds = TokenDataset(TASK, labels, Columns("tokens", None, "tags"), splits, notes, scheme)
    if carve:
        ds.carve_missing(d)
    return ds


def _carve(splits: dict, d, notes: list[str]) -> None:
    """Validation/test split from train (seeded sentence shuffle) where no file was given."""
    missing = [s for s in ("validation", "test") if s not in splits and split_ratio(d, s) > 0]
    if not missing:
        return
    train = splits["train"]
    order = np.random.default_rng(d.split_seed).permutation(len(train))
    start = 0
    for split in missing:
        k = max(1, round(split_ratio(d, split) * len(train)))
        if len(train) - start - k < 1:
            raise DataError(f"{d.train}: {len(train)} sentences are too few to carve a {split} split; add data or "
                            f"give data.{split}")
        splits[split] = train.subset(order[start:start + k])
        notes.append(f"{split} split: {k} sentences carved from train (ratio {split_ratio(d, split)})")
        start += k
    splits["train"] = train.subset(np.sort(order[start:]))
