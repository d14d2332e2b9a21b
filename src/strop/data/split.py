"""Seeded (stratified for single-label) carving of validation/test splits out of the training data."""

from __future__ import annotations

import numpy as np

from strop.config import VALIDATION_RATIO
from strop.data.examples import Examples
from strop.errors import DataError

# a split with fewer rows than this per class (on average) gets no printed metrics: one row more or less right moves
# accuracy by 10 points or more, and MCC of 2 rows is -1, 0 or 1 (issue 24: few-shot validation 0.0000 / MCC -1.0)
MIN_ROWS_PER_CLASS = 10


def split_ratio(d, split: str) -> float:
    """data.<split>_ratio; an empty validation_ratio that no run resolved (a benchmark or a report calling prepare
    on a config it built) is the standard default."""
    ratio = getattr(d, f"{split}_ratio")
    return VALIDATION_RATIO if ratio is None else ratio


def too_small_to_score(n_rows: int, classes: int | None) -> str | None:
    """Why a split of n_rows is too small for its metrics to mean anything, or None when it is not: with one class
    per row (`classes` of them: single-label) MIN_ROWS_PER_CLASS rows per class on average (a rare class in a large
    test set does not disqualify it), otherwise MIN_ROWS_PER_CLASS rows (sentences for token classification)."""
    if classes is not None:
        need = MIN_ROWS_PER_CLASS * classes
        if n_rows < need:
            return (f"{n_rows} rows for {classes} classes, fewer than {MIN_ROWS_PER_CLASS} per class "
                    f"(needs {need})")
        return None
    if n_rows < MIN_ROWS_PER_CLASS:
        return f"{n_rows} rows, fewer than {MIN_ROWS_PER_CLASS}"
    return None


def carve(examples: Examples, ratio: float, seed: int, stratify: bool, split: str,
          label_names: list[str] | None = None, parts: int = 2) -> tuple[Examples, Examples]:
    """Split off `ratio` of `examples` as a new split; returns (rest, carved).

    Stratified (single-label): every class keeps the same share on both sides, and each class with at least `parts`
    examples appears in both. `parts` is how many splits the data is being cut into in total (for the message).
    """
    n = len(examples)
    rng = np.random.default_rng(seed)
    if stratify:
        carved_idx = []
        counts = np.bincount(examples.labels, minlength=len(label_names or []))
        for cls in np.flatnonzero(counts):
            idx = np.flatnonzero(examples.labels == cls)
            if len(idx) < parts:
                name = label_names[cls] if label_names else cls
                raise DataError(f"class {name!r} has only {len(idx)} example(s); a stratified split into "
                                f"{parts} parts needs at least {parts} per class. Add examples of {name!r}, remove "
                                f"them, or give data.validation/data.test files")
            # leave one example of the class for each split still to be cut from the rest (parts - 1 of them)
            take = min(max(1, int(round(len(idx) * ratio))), len(idx) - (parts - 1))
            carved_idx.append(rng.permutation(idx)[:take])
        carved = np.sort(np.concatenate(carved_idx))
    else:
        carved = np.sort(rng.permutation(n)[: int(round(n * ratio))])
    if len(carved) == 0:
        raise DataError(f"{split} split is empty: {ratio} of {n} examples rounds to 0; raise data.{split}_ratio or "
                        f"give a data.{split} file")
    rest = np.setdiff1d(np.arange(n), carved)
    return examples.subset(rest), examples.subset(carved)
