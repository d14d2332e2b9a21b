"""Labels of image splits as read (folder names, table values, .npz integers or 0/1 rows) -> class names and ids.

One class per image (image_classification): ids (n,) int64. Several per image (image_multi_label): a 0/1 matrix
(n, L) float32, from an .npz whose labels are (N, L) 0/1 rows (ChestMNIST's layout), or from a table whose label
cells are lists (JSONL) or strings split on data.label_delimiter, as for multi-label text. Each function takes a
split as data/images.py reads it (`RawSplit`: where, items, labels, places).
"""

from __future__ import annotations

import numpy as np

from strop.data.examples import label_list, label_names
from strop.data.load import Table
from strop.errors import DataError


def from_arrays(raw) -> bool:
    """Whether the split's images are arrays of an .npz (whose labels are class numbers), not files."""
    return bool(raw.items) and isinstance(raw.items[0], np.ndarray)


def is_multi_label(raw, delimiter: str | None) -> bool:
    """Several labels per image: 0/1 rows of an .npz, list cells, or a table read with data.label_delimiter."""
    if raw.labels is None:
        return False
    if any(isinstance(v, (list, tuple, np.ndarray)) for v in raw.labels):
        return True
    return bool(delimiter) and not from_arrays(raw)


def class_names(raw, configured: list, delimiter: str | None = None) -> list[str]:
    """Sorted class names of the training split; class numbers (.npz) are named by `configured`
    (image.class_names) or by their number."""
    if raw.labels is None:
        raise DataError(f"{raw.where} has no labels; training needs a label per image")
    multi = is_multi_label(raw, delimiter)
    if from_arrays(raw):
        width = len(raw.labels[0]) if multi else max(raw.labels) + 1
        if not multi and len({int(v) for v in raw.labels}) < 2:
            raise DataError(f"{raw.where} holds one class only ({raw.labels[0]}); a classifier needs at least two: "
                            "add labelled images of another class")
        if configured and len(configured) < width:
            raise DataError(f"image.class_names has {len(configured)} names, but {raw.where} has class number "
                            f"{width - 1}; give one name per class number 0..{width - 1}")
        return [str(n) for n in configured[:width]] if configured else [str(i) for i in range(width)]
    table = Table(raw.where, ["label"], [{"label": v} for v in raw.labels], list(range(1, len(raw.labels) + 1)),
                  "row")
    if multi:
        return label_names(table, "label", "classes", delimiter)
    present = sorted({str(v) for v in raw.labels})
    if len(present) < 2:
        raise DataError(f"{raw.where} holds one class only ({present[0] if present else 'none'}); a classifier "
                        "needs at least two: add a folder (or labelled images) per class")
    return label_names(table, "label", "class", None)


def label_ids(raw, names: list[str], split: str) -> np.ndarray:
    """Raw labels -> (n,) class ids; a label the training data never had is an error naming where it is."""
    index = {n: i for i, n in enumerate(names)}
    ids = []
    for value, place in zip(raw.labels, raw.places):
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and from_arrays(raw):
            name = names[value] if 0 <= value < len(names) else None
        else:
            name = None if value is None else str(value).strip()
            if name is not None and name not in index:
                number = as_int(name)
                name = str(number) if number is not None and str(number) in index else name
        if name is None or name not in index:
            raise DataError(f"{place}: label {value!r} in the {split} split is not a class of the training data "
                            f"(classes: {names[:20]}); fix the label or add training images of it")
        ids.append(index[name])
    return np.asarray(ids, dtype=np.int64)


def label_matrix(raw, names: list[str], split: str, delimiter: str | None) -> np.ndarray:
    """Raw multi-label labels -> (n, L) 0/1 float32: .npz rows as they are (their width must be L), list cells
    and delimited strings by name (an image may have none); an unknown name is an error naming where it is."""
    index = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(raw.labels), len(names)), dtype=np.float32)
    for r, (value, place) in enumerate(zip(raw.labels, raw.places)):
        if from_arrays(raw):
            row = np.asarray(value).reshape(-1)
            if len(row) != len(names):
                raise DataError(f"{place}: {len(row)} labels in the {split} split, but training has {len(names)}; "
                                "give every split the same label columns")
            out[r] = row
            continue
        for name in label_list(value if value is not None else "", delimiter):
            if name not in index:
                raise DataError(f"{place}: label {name!r} in the {split} split is not a label of the training "
                                f"data (labels: {names[:20]}); fix it or add training images of it")
            out[r, index[name]] = 1.0
    return out


def as_int(text: str) -> int | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None
