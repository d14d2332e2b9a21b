"""data config -> validated train/validation/test examples, the task and the label names."""

from __future__ import annotations

from dataclasses import dataclass, field

from strop.data.examples import Columns, Examples, infer_task, label_names, resolve_columns, to_examples
from strop.data.load import Table, read_table
from strop.data.split import carve, split_ratio
from strop.errors import DataError


@dataclass
class Dataset:
    task: str
    labels: list[str]
    columns: Columns
    splits: dict[str, Examples]  # train, and validation/test where present
    notes: list[str] = field(default_factory=list)  # what was inferred, for the log

    def carve_missing(self, d) -> None:
        """Carve validation/test from train where no file gave them (data.validation_ratio, data.test_ratio)."""
        _carve_missing(self.splits, d, self.task, self.labels, self.notes)


def _tables(data_cfg) -> dict[str, Table]:
    if not data_cfg.train:
        raise DataError("data.train is not set; give a training file, e.g. `strop train data.train=train.csv`")
    first = read_table(data_cfg.train, data_cfg.format, data_cfg.encoding)
    tables = dict(first) if isinstance(first, dict) else {"train": first}
    if "train" not in tables:
        raise DataError(f"{data_cfg.train} holds splits {sorted(tables)} but no 'train'")
    tables.setdefault("validation", tables.pop("dev", None) or tables.pop("val", None))
    for split in ("validation", "test"):
        path = getattr(data_cfg, split)
        if path:
            table = read_table(path, data_cfg.format, data_cfg.encoding)
            if isinstance(table, dict):
                raise DataError(f"data.{split}={path} holds several splits {sorted(table)}; point to one")
            tables[split] = table
    return {k: v for k, v in tables.items() if v is not None}


def prepare_table(cfg, carve: bool = True) -> Dataset:
    """Read, validate and split the table described by `cfg.data` for a sequence task (`cfg.task`, auto =
    inferred from the labels: single_label, multi_label or regression).

    carve=False leaves train whole (validation/test only where files give them): a run first decides its training
    mode from the whole training file, which sets data.validation_ratio, then calls `ds.carve_missing(cfg.data)`.
    """
    d = cfg.data
    tables = _tables(d)
    train = tables["train"]
    if not train.rows:
        raise DataError(f"{train.path} has a header but no rows; add training examples")
    cols = resolve_columns(train, d.text_column, d.text_pair_column, d.label_column)
    notes = [f"columns: text={cols.text!r}" + (f", pair={cols.pair!r}" if cols.pair else "") + f", label={cols.label!r}"]
    task = cfg.task
    if task == "auto":
        task, why = infer_task(train, cols.label, d.label_delimiter)
        notes.append(f"task inferred: {task} ({why}); set task=... to override")
    names = label_names(train, cols.label, task, d.label_delimiter)
    splits = {}
    for split, table in tables.items():
        if split not in ("train", "validation", "test"):
            continue
        for key, name in (("data.text_column", cols.text), ("data.text_pair_column", cols.pair),
                          ("data.label_column", cols.label)):
            if name and name not in table.columns:
                raise DataError(f"{key}={name!r} not found in {table.path} ({split} split); columns are "
                                f"{table.columns}")
        splits[split] = to_examples(table, cols, task, names, d.label_delimiter, split)
    ds = Dataset(task, names, cols, splits, notes)
    if carve:
        ds.carve_missing(d)
    return ds


def _carve_missing(splits: dict, d, task: str, names: list[str], notes: list[str]) -> None:
    missing = [s for s in ("validation", "test") if s not in splits and split_ratio(d, s) > 0]
    parts = 1 + len(missing)
    for i, split in enumerate(missing):
        ratio = split_ratio(d, split)
        # the second carve takes its share of what the first one left, so both ratios refer to the whole file
        share = ratio / (1 - sum(split_ratio(d, s) for s in missing[:i]))
        stratify = splits["train"].labels.dtype.kind == "i"  # class ids (single-label): keep each class's share
        splits["train"], splits[split] = carve(splits["train"], share, d.split_seed + i, stratify,
                                               split, names, parts - i)
        notes.append(f"{split} split: {len(splits[split])} examples carved from train (ratio {ratio})")
