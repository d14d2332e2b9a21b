"""Tables -> typed examples: column mapping, task inference, label names <-> ids, row-level validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from strop.data.load import Table
from strop.errors import DataError

TEXT_COLUMNS = ["text", "sentence", "sentence1", "question", "content", "review", "document", "query", "text_a"]
PAIR_COLUMNS = ["text_pair", "sentence2", "text_b", "question2", "hypothesis"]
LABEL_COLUMNS = ["label", "labels", "score", "target", "class", "category", "y"]
# what a label column holds: one class per row, a set of classes per row (lists or delimited), or a number. The
# sequence tasks each read one kind (strop.tasks.classification: single_label, multi_label, regression)
LABEL_KINDS = ("class", "classes", "number")


@dataclass
class Columns:
    text: str
    pair: str | None
    label: str | None


@dataclass
class Examples:
    """Validated examples of one split.

    labels: (n,) int64 class ids (kind "class"); (n, L) float32 0/1 (kind "classes"); (n,) float32 (kind "number");
    None for unlabelled prediction input.
    """

    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray | None
    rows: list[int]  # index of each example in its source table (to keep input columns in predictions)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "Examples":
        idx = np.asarray(idx, dtype=np.int64)
        return Examples([self.texts[i] for i in idx], None if self.pairs is None else [self.pairs[i] for i in idx],
                        None if self.labels is None else self.labels[idx], [self.rows[i] for i in idx])


def _pick(found: list[str], candidates: list[str]) -> str | None:
    lower = {c.lower(): c for c in found}
    return next((lower[c] for c in candidates if c in lower), None)


def resolve_columns(table: Table, text: str | None, pair: str | None, label: str | None,
                    need_label: bool = True) -> Columns:
    """Use the configured column names, or infer them from common names; errors list the columns found."""
    found = table.columns

    def check(key: str, name: str | None):
        if name is not None and name not in found:
            raise DataError(f"{key}={name!r} not found in {table.path}; columns are {found}")

    check("data.text_column", text)
    check("data.text_pair_column", pair)
    if need_label:
        check("data.label_column", label)
    text = text or _pick(found, TEXT_COLUMNS)
    if text is None:
        raise DataError(f"{table.path}: no text column found among {found}; name it 'text' or, when training, set "
                        "data.text_column")
    if pair is None and text.lower() in ("sentence1", "text", "question", "text_a"):
        pair = _pick([c for c in found if c != text], PAIR_COLUMNS)
    if label is None:
        label = _pick([c for c in found if c not in (text, pair)], LABEL_COLUMNS)
        if label is None and need_label:
            raise DataError(f"{table.path}: no label column found among {found}; name it 'label' or, when training, "
                            "set data.label_column")
    return Columns(text, pair, label)


def _missing(value) -> bool:
    # a string label is missing only when blank: "none", "null" and "nan" can be class names
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None  # the words "nan" and "inf" are class names, not numbers


def label_list(value, delimiter: str | None) -> list[str]:
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v).strip() for v in value if str(v).strip()]
    if delimiter:
        return [v.strip() for v in str(value).split(delimiter) if v.strip()]
    return [str(value).strip()]


def infer_label_kind(table: Table, label: str, delimiter: str | None) -> tuple[str, str]:
    """(label kind, why) from the training labels: lists or a delimiter -> classes; non-integer numbers ->
    number; anything else -> class."""
    values = [r.get(label) for r in table.rows if not _missing(r.get(label))]
    if not values:
        raise DataError(f"{table.path}: label column '{label}' is empty in every row; fill in the labels, or set "
                        "data.label_column to the column that holds them")
    if delimiter or any(isinstance(v, (list, tuple, np.ndarray)) for v in values):
        return "classes", "labels are lists" if not delimiter else f"data.label_delimiter={delimiter!r} is set"
    numbers = [_number(v) for v in values]
    if all(n is not None for n in numbers) and any(not n.is_integer() for n in numbers):
        return "number", "labels are non-integer numbers"
    return "class", f"{len(set(map(str, values)))} distinct label values"


def label_names(table: Table, label: str, kind: str, delimiter: str | None) -> list[str]:
    """Sorted label names of the training split (numeric names sort numerically); kind: LABEL_KINDS."""
    if kind == "number":
        return [label]
    names: set[str] = set()
    types_seen: dict[str, tuple[int, object]] = {}
    for i, row in enumerate(table.rows):
        value = row.get(label)
        if _missing(value):
            continue
        if kind == "class":
            seen = "number" if _number(value) is not None else "text"
            types_seen.setdefault(seen, (i, value))
            names.add(_name(value))
        else:
            names.update(label_list(value, delimiter))
    if len(types_seen) > 1:
        (i, a), (j, b) = types_seen["number"], types_seen["text"]
        raise DataError(f"label column '{label}' mixes numbers ({a!r} at {table.where(i)}) and text "
                        f"({b!r} at {table.where(j)}); make the labels consistent")
    if kind == "class" and len(names) < 2:
        raise DataError(f"{table.path}: label column '{label}' has only {sorted(names)}; a classifier needs at "
                        "least 2 classes: add examples of other classes (for numeric targets set task=regression)")
    return sorted(names, key=lambda n: (0, float(n), n) if _number(n) is not None else (1, 0.0, n))


def _name(value) -> str:
    """Label value -> name; 1, 1.0 and '1' are the same class."""
    number = _number(value)
    if number is not None and number.is_integer():
        return str(int(number))
    return str(value).strip()


def to_examples(table: Table, cols: Columns, kind: str, names: list[str], delimiter: str | None,
                split: str, need_label: bool = True) -> Examples:
    """Validate every row and convert it (labels of `kind`, LABEL_KINDS); the first bad row raises with its
    location."""
    if not table.rows:
        raise DataError(f"{table.path}: the {split} split has no rows (header only?); add examples")
    index = {n: i for i, n in enumerate(names)}
    texts, pairs, labels = [], [] if cols.pair else None, []
    has_label = need_label and cols.label is not None
    for i, row in enumerate(table.rows):
        texts.append(_text(table, i, row, cols.text))
        if pairs is not None:
            pairs.append(_text(table, i, row, cols.pair))
        if has_label:
            labels.append(_label(table, i, row.get(cols.label), cols.label, kind, index, delimiter, split))
    if not has_label:
        y = None
    elif kind == "class":
        y = np.asarray(labels, dtype=np.int64)
    elif kind == "classes":
        y = np.zeros((len(labels), len(names)), dtype=np.float32)
        for r, ids in enumerate(labels):
            y[r, ids] = 1.0
    else:
        y = np.asarray(labels, dtype=np.float32)
    return Examples(texts, pairs, y, list(range(len(texts))))


def _text(table: Table, i: int, row: dict, column: str) -> str:
    value = row.get(column)
    # only truly absent text is missing: a review that reads "None" or "nan" is still text
    if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
        raise DataError(f"{table.where(i)}: empty text in column '{column}'; remove the row or fill it in")
    return str(value)


def _label(table, i, value, column, kind, index, delimiter, split):
    if _missing(value):
        raise DataError(f"{table.where(i)}: missing label in column '{column}'; label the row or remove it")
    if kind == "number":
        number = _number(value)
        if number is None or not math.isfinite(number):
            raise DataError(f"{table.where(i)}: label {value!r} in column '{column}' is not a number, but the task "
                            "is regression; fix the value or set task=single_label")
        return number
    if kind == "classes":
        found = label_list(value, delimiter)
        unknown = [n for n in found if n not in index]
        ids = [index[n] for n in found if n in index]
    else:
        name = _name(value)
        unknown = [] if name in index else [name]
        ids = index.get(name)
    if unknown:
        raise DataError(f"{table.where(i)}: label {unknown[0]!r} in the {split} split never occurs in the training "
                        f"data (known labels: {sorted(index)[:20]}); fix the label or add training examples of it")
    return ids
