"""Unlabelled text for masked-LM pretraining: files -> documents, one `Examples` (texts only) per split.

A .txt file holds one document per line (blank lines skipped). A CSV / TSV / JSONL / Parquet file or a
saved `datasets` folder holds them in a text column: data.text_column, else the usual names (text,
sentence, content, ...), else the one column whose values are text; every other column, a label among
them, is ignored. Rows with empty text are skipped and counted (a scraped corpus has them, and they hold
nothing to learn). Validation and test documents are carved from train where no file gives them: seeded,
whole documents, not stratified (there are no classes).
"""

from __future__ import annotations

from pathlib import Path

from strop.data.examples import TEXT_COLUMNS, Columns, Examples
from strop.data.load import Table, read_table, read_text
from strop.data.prepare import Dataset
from strop.data.split import carve, split_ratio
from strop.errors import DataError

TASK = "masked_lm"
LINES_COLUMN = "text"  # the one column of a .txt file read as a table
SNIFF_ROWS = 200  # rows looked at to tell a text column from a numeric one


class CorpusDataset(Dataset):
    def carve_missing(self, d) -> None:
        """Validation/test documents from train (a seeded shuffle) where no file gave them."""
        missing = [s for s in ("validation", "test") if s not in self.splits and split_ratio(d, s) > 0]
        for i, split in enumerate(missing):
            # the second carve takes its share of what the first left, so both ratios refer to the whole file
            share = split_ratio(d, split) / (1 - sum(split_ratio(d, s) for s in missing[:i]))
            self.splits["train"], self.splits[split] = carve(self.splits["train"], share, d.split_seed + i,
                                                             False, split)
            self.notes.append(f"{split} split: {len(self.splits[split])} documents carved from train "
                              f"(ratio {split_ratio(d, split)})")
        if not len(self.splits["train"]):
            raise DataError(f"{d.train}: carving validation and test documents left none to train on; add "
                            "documents, lower data.validation_ratio / data.test_ratio, or give "
                            "data.validation")


def is_lines_file(path, fmt: str = "auto") -> bool:
    """A .txt file read as one document per line (data.format=auto)."""
    return fmt == "auto" and Path(path).suffix.lower() == ".txt"


def read_lines_table(path, encoding: str = "utf-8") -> Table:
    """A .txt file as a one-column table, one row per non-blank line (file:line kept for messages)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; check the path (data.train / validation / test, or "
                        "--data)")
    rows, lines = [], []
    for number, line in enumerate(read_text(path, encoding).splitlines(), 1):
        if line.strip():
            rows.append({LINES_COLUMN: line})
            lines.append(number)
    return Table(str(path), [LINES_COLUMN], rows, lines)


def read_split_table(path, fmt: str = "auto", encoding: str = "utf-8") -> Table | dict[str, Table]:
    """One data file as a table: .txt by lines, anything else by data/load.py (a DatasetDict: its splits)."""
    return read_lines_table(path, encoding) if is_lines_file(path, fmt) else read_table(path, fmt, encoding)


def read_corpus(d) -> dict[str, Table]:
    """{split: table} of data.train (a saved DatasetDict: its own splits), data.validation, data.test."""
    if not d.train:
        raise DataError("data.train is not set; give the text to pretrain on, e.g. "
                        "`strop pretrain data.train=abstracts.txt` (one document per line)")
    tables = {}
    for split in ("train", "validation", "test"):
        path = getattr(d, split)
        if not path:
            continue
        found = read_split_table(path, d.format, d.encoding)
        if isinstance(found, dict):
            if split != "train":
                raise DataError(f"data.{split}={path} holds several splits {sorted(found)}; point to one")
            aliases = {"dev": "validation", "val": "validation"}
            found = {aliases.get(k, k): t for k, t in found.items()}
            if "train" not in found:
                raise DataError(f"{path} holds splits {sorted(found)} but no 'train'; point data.train "
                                "to one")
            tables.update({k: t for k, t in found.items() if k in ("train", "validation", "test")})
        else:
            tables[split] = found
    return tables


def is_number(value) -> bool:
    """A number, or a string that reads as one ("12", "3.5e-2"): what a text column must not hold only."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def _filled(value) -> bool:
    missing = value is None or (isinstance(value, float) and value != value)  # None, NaN
    return not missing and bool(str(value).strip())


def text_column(table: Table, configured: str | None) -> str:
    """The column that holds the documents: `configured`, a usual text name, or the only column of text."""
    if configured:
        if configured not in table.columns:
            raise DataError(f"data.text_column={configured!r} not found in {table.path}; columns are "
                            f"{table.columns}")
        return configured
    lower = {c.lower(): c for c in table.columns}
    named = next((lower[c] for c in TEXT_COLUMNS if c in lower), None)
    if named:
        return named
    sample = table.rows[:SNIFF_ROWS]
    texty = [c for c in table.columns if any(isinstance(r.get(c), str) and _filled(r.get(c))
                                             and not is_number(r.get(c)) for r in sample)]
    if len(texty) == 1:
        return texty[0]
    raise DataError(f"{table.path}: cannot tell which column holds the text among {table.columns}; set "
                    "data.text_column (the other columns, a label among them, are ignored)")


def documents_of(table: Table, column: str, split: str) -> Examples:
    """The split's documents: the non-empty texts of `column` in file order; numbers only are refused."""
    texts, rows, numbers = [], [], 0
    for i, row in enumerate(table.rows):
        value = row.get(column)
        if not _filled(value):
            continue
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise DataError(f"{table.where(i)}: column '{column}' holds a {type(value).__name__}, not text; "
                            "give one document per row as a string (or set data.text_column)")
        numbers += is_number(value)
        texts.append(str(value))
        rows.append(i)
    if not texts:
        raise DataError(f"{table.path} holds no text for the {split} split (the file is empty, its lines "
                        f"are blank or column '{column}' is empty in every row); masked-LM pretraining "
                        "reads one document per line of a .txt file, or a text column of a table: add text")
    if numbers == len(texts):
        raise DataError(f"{table.path}: column '{column}' holds numbers only (e.g. {texts[0]!r} at "
                        f"{table.where(rows[0])}), not text; point data.text_column to the column with the "
                        "documents")
    return Examples(texts, None, None, rows)


def prepare_corpus(cfg, carve_splits: bool = True) -> CorpusDataset:
    """cfg.data -> documents per split (carve_splits=False: train left whole, as `Task.prepare` says)."""
    d = cfg.data
    tables = read_corpus(d)
    splits, notes = {}, []
    column = text_column(tables["train"], d.text_column)
    for split, table in tables.items():
        name = column if column in table.columns or d.text_column else None  # else: the file's own column
        splits[split] = documents_of(table, text_column(table, name), split)
        skipped = len(table) - len(splits[split])
        if skipped:
            notes.append(f"{split}: {skipped} rows with empty text skipped")
    ignored = [c for c in tables["train"].columns if c != column]
    notes.insert(0, f"text column: {column!r}" + (f"; ignored (pretraining reads text only): {ignored}"
                                                  if ignored else ""))
    ds = CorpusDataset(TASK, [], Columns(column, None, None), splits, notes)
    if carve_splits:
        ds.carve_missing(d)
    return ds
