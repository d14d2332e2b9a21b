"""data config -> validated train/validation/test examples, the task and the label names."""

from __future__ import annotations

from dataclasses import dataclass, field

from strop.data.examples import Columns, Examples
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


def read_tables(data_cfg) -> dict[str, Table]:
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
