"""Seeded (stratified for single-label) carving of validation/test splits out of the training data."""

from __future__ import annotations

import numpy as np

from strop.data.examples import Examples
from strop.errors import DataError


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
