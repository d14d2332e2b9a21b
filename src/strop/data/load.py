"""Files -> tables of rows, with errors that name the file, line and what to do.

Supported: CSV, TSV, JSONL, Parquet and folders written by `datasets.Dataset(Dict).save_to_disk`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from strop.errors import DataError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}

# CSV fields can be large (a long document); the stdlib default of 128 KiB would fail on them.
csv.field_size_limit(64 * 1024 * 1024)


@dataclass
class Table:
    """Rows of one file. `where(i)` says where row i came from, for error messages ('train.csv:14')."""

    path: str
    columns: list[str]
    rows: list[dict]
    lines: list[int]  # 1-based line of each row in text files, 1-based row index otherwise
    line_kind: str = "line"

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}" if self.line_kind == "line" else f"{self.path} row {self.lines[i]}"

    def __len__(self) -> int:
        return len(self.rows)


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf"
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: cannot tell the format from the extension '{path.suffix}'; "
                        f"set data.format (train) or --format (predict, eval) to one of csv, tsv, jsonl, parquet, hf")
    return kind


def read_table(path: str | Path, fmt: str = "auto", encoding: str = "utf-8") -> Table | dict[str, Table]:
    """Read one data file. A saved `DatasetDict` folder gives {split_name: Table}."""
    path = Path(path)
    if not path.exists():
        hint = f" (found in {path.parent}: {sorted(p.name for p in path.parent.iterdir())[:10]})" \
            if path.parent.is_dir() else ""
        raise DataError(f"data file {path} not found{hint}; check the path (data.train/validation/test, or --data)")
    kind = detect_format(path, fmt)
    if path.is_dir() and kind in ("csv", "tsv", "jsonl"):
        raise DataError(f"{path} is a folder, but data.format={kind} reads one file; point to the {kind.upper()} file "
                        "itself, or to a folder written by datasets' save_to_disk with data.format=hf (or auto)")
    if kind in ("csv", "tsv"):
        return _read_delimited(path, "," if kind == "csv" else "\t", encoding)
    if kind == "jsonl":
        return _read_jsonl(path, encoding)
    if kind == "parquet":
        return _read_parquet(path)
    if kind == "hf":
        return _read_hf(path)
    raise DataError(f"unknown data format '{kind}'")


def text_codec(encoding: str) -> str:
    """Python codec for data.encoding: UTF-8 also accepts (and drops) a byte-order mark; a name that is not a text
    encoding raises DataError."""
    codec = "utf-8-sig" if encoding.lower().replace("-", "").replace("_", "") == "utf8" else encoding
    try:
        "a".encode(codec)  # unknown names and bytes-to-bytes codecs (rot13, base64) raise LookupError
    except LookupError:
        raise DataError(f"data.encoding={encoding!r} is not a known text encoding; use a Python codec name such as "
                        "utf-8, latin-1 or cp1252") from None
    except UnicodeError:
        pass  # a real text codec that cannot write 'a'
    return codec


def read_text(path: Path, encoding: str) -> str:
    """The whole text of `path`; an unreadable file or bytes that are not valid `encoding` raise DataError naming
    file:line:column."""
    codec = text_codec(encoding)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); check that the path names a file you can read") from None
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as e:
        start = e.start + len(raw) - len(e.object)  # utf-8-sig counts from after the BOM it dropped
        line = raw[:start].count(b"\n") + 1
        col = start - (raw.rfind(b"\n", 0, start) + 1) + 1
        raise DataError(f"{path}:{line}:{col}: byte 0x{raw[start]:02x} is not valid {encoding}; "
                        f"convert the file to UTF-8 or name its encoding: data.encoding=latin-1 (train), --encoding "
                        "latin-1 (predict, eval)") from None


def read_lines(path: str | Path, encoding: str = "utf-8", column: str = "text") -> Table:
    """A .txt file as a one-column table: each non-blank line is one text (its line ending dropped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; check the path (--data)")
    rows, lines = [], []
    for number, line in enumerate(read_text(path, encoding).splitlines(), 1):
        if line.strip():
            rows.append({column: line})
            lines.append(number)
    if not rows:
        raise DataError(f"{path} has no text; give one text per line")
    return Table(str(path), [column], rows, lines)


def check_unicode(row: dict, line: str, where: str) -> None:
    """Refuse a JSON row whose strings hold a lone UTF-16 surrogate (the escape "\\ud83d" without its pair: an emoji
    cut in half), which tokenizers and UTF-8 output cannot encode. `line` is the row's JSON source."""
    if "\\u" not in line:
        return  # decoded bytes never hold a surrogate: only a \u escape can make one
    for key, value in row.items():
        for text in _strings([key, value]):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{where}: {key!r} holds \\u{ord(text[e.start]):04x}, half of a UTF-16 surrogate "
                                "pair (a character such as an emoji cut in two); fix or remove that escape, e.g. "
                                "re-export the file without truncating text") from None


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        yield from _strings(list(value.keys()) + list(value.values()))


def _decode(path: Path, encoding: str) -> str:
    text = read_text(path, encoding)
    if not text.strip():
        raise DataError(f"{path} is empty; it needs a header line and at least one row")
    return text


def _blank(record: list[str]) -> bool:
    return not record or (len(record) == 1 and not record[0].strip())


def _read_delimited(path: Path, delimiter: str, encoding: str) -> Table:
    text = _decode(path, encoding)
    # TSV has no quoting (GLUE-style): a '"' is text, and every line is one row
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next((record for record in reader if not _blank(record)), [])
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: cannot parse the header: {e}") from None
    header = [h.strip() for h in header]
    _check_header(path, header, delimiter, reader.line_num)
    rows, lines = [], []
    end = reader.line_num
    fix = f"quote fields that contain {delimiter!r}" if delimiter == "," else \
        f"TSV fields cannot contain {delimiter!r} (TSV has no quoting): replace it in the text, or save the file as CSV"
    try:
        for record in reader:
            # a quoted field may span lines: a row starts on the line after the previous row ended
            start, end = end + 1, reader.line_num
            if _blank(record):
                continue
            if len(record) != len(header):
                # a quote that never closes swallows the following lines into one field
                unclosed = "; a field here spans several lines: check for a quote that is never closed" \
                    if any("\n" in field for field in record) else ""
                raise DataError(f"{path}:{start}: row has {len(record)} fields but the header has "
                                f"{len(header)} ({header}); {fix}"
                                f"{' or check the delimiter' if len(record) < len(header) else ''}{unclosed}")
            rows.append(dict(zip(header, record)))
            lines.append(start)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed {'CSV' if delimiter == ',' else 'TSV'}: {e}") from None
    return Table(str(path), header, rows, lines)


def _check_header(path: Path, header: list[str], delimiter: str, line: int) -> None:
    if len(header) == 1:
        other = {",": "\t", "\t": ","}[delimiter]
        for sep, name, fmt in ((other, "tab" if other == "\t" else "comma", "tsv" if other == "\t" else "csv"),
                               (";", "semicolon", None)):
            if sep in header[0]:
                fix = f"set data.format={fmt}" if fmt else "convert it to comma- or tab-separated"
                raise DataError(f"{path}:{line}: the header '{header[0][:80]}' is one column but contains {name}s; "
                                f"the file seems {name}-separated: {fix}")
    seen = set()
    for name in header:
        if not name:
            raise DataError(f"{path}:{line}: the header has an empty column name ({header}); name every column")
        if name in seen:
            raise DataError(f"{path}:{line}: column '{name}' appears twice in the header {header}; rename one")
        seen.add(name)


def _read_jsonl(path: Path, encoding: str) -> Table:
    text = _decode(path, encoding)
    rows, lines, columns = [], [], {}
    # split on \n only: str.splitlines() also breaks at U+2028/U+2029/U+0085, which JSON strings may hold unescaped
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}:{e.colno}: invalid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}; write one "
                            "object per line (JSON Lines), e.g. {\"text\": \"...\", \"label\": \"...\"}")
        check_unicode(row, line, f"{path}:{n}")
        rows.append(row)
        lines.append(n)
        columns.update(dict.fromkeys(row))
    return Table(str(path), list(columns), rows, lines)


def _read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({e}); re-export it, or save the data as CSV or "
                        "JSONL") from None
    rows = table.to_pylist()
    return Table(str(path), table.column_names, rows, list(range(1, len(rows) + 1)), "row")


def _read_hf(path: Path) -> Table | dict[str, Table]:
    try:
        import datasets
    except ImportError:
        raise DataError("reading a saved Hugging Face datasets folder needs `datasets`: "
                        "pip install 'strop[hf]'") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({e}); point to a data file "
                        "(CSV, TSV, JSONL, Parquet) or to a save_to_disk folder") from None

    def table(d, where):
        rows = d.to_list()
        _class_names(d.features, rows, datasets)
        return Table(where, list(d.column_names), rows, list(range(1, len(rows) + 1)), "row")

    if isinstance(ds, datasets.DatasetDict):
        return {name: table(split, f"{path}[{name}]") for name, split in ds.items()}
    return table(ds, str(path))


def _class_names(features, rows: list[dict], datasets) -> None:
    """Replace ClassLabel ids by their names in place (also inside lists, for multi-label), so label names survive
    into the run; -1 (datasets' 'no label') becomes None, i.e. a missing label."""
    for column, feature in features.items():
        inner = getattr(feature, "feature", None)  # Sequence(ClassLabel) / List(ClassLabel)
        if isinstance(feature, datasets.ClassLabel):
            names, is_list = feature.names, False
        elif isinstance(inner, datasets.ClassLabel):
            names, is_list = inner.names, True
        else:
            continue

        def name(i):
            return names[i] if isinstance(i, int) and 0 <= i < len(names) else None

        for row in rows:
            value = row.get(column)
            row[column] = [name(v) for v in value] if is_list and isinstance(value, list) else name(value)
