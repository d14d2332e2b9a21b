"""Reading CSV, TSV, JSONL, Parquet and saved HF datasets: rows, columns, line numbers, and readable errors."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from strop.data.load import Table, detect_format, read_table
from strop.errors import DataError

ROWS = [{"text": "great product", "label": "pos"}, {"text": "broke after a day", "label": "neg"},
        {"text": "it is fine, I guess", "label": "neu"}]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def data_error(path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_table(path, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# each format reads rows and columns


def test_csv_rows_columns_and_lines(tmp_path):
    path = write(tmp_path / "train.csv", 'text,label\ngreat product,pos\nbroke after a day,neg\n'
                                         '"it is fine, I guess",neu\n')
    table = read_table(path)
    assert isinstance(table, Table)
    assert table.path == str(path)
    assert table.columns == ["text", "label"]
    assert table.rows == ROWS
    assert table.lines == [2, 3, 4]
    assert len(table) == 3
    assert table.where(0) == f"{path}:2" and table.where(2) == f"{path}:4"


def test_csv_values_are_strings_and_header_is_stripped(tmp_path):
    table = read_table(write(tmp_path / "a.csv", " text , label \nhello,1\n"))
    assert table.columns == ["text", "label"]
    assert table.rows == [{"text": "hello", "label": "1"}]


def test_csv_quoted_delimiter_and_escaped_quote(tmp_path):
    table = read_table(write(tmp_path / "a.csv", 'text,label\n"say ""hi"", then go",a\n'))
    assert table.rows == [{"text": 'say "hi", then go', "label": "a"}]


def test_csv_multiline_field_counts_physical_lines(tmp_path):
    path = write(tmp_path / "a.csv", 'text,label\n"first line\nsecond line\nthird line",a\nnext,b\n\nlast,c\n')
    table = read_table(path)
    assert table.rows[0] == {"text": "first line\nsecond line\nthird line", "label": "a"}
    # the multi-line row starts on line 2; the rows after it are on their physical lines (a blank line 6 skipped)
    assert table.lines == [2, 5, 7]
    assert table.where(1) == f"{path}:5"


def test_csv_multiline_header(tmp_path):
    table = read_table(write(tmp_path / "a.csv", '"te\nxt",label\nhello,a\n'))
    assert table.columns == ["te\nxt", "label"]
    assert table.lines == [3]


def test_csv_blank_lines_are_skipped(tmp_path):
    table = read_table(write(tmp_path / "a.csv", "text,label\n\nhello,a\n   \nbye,b\n\n"))
    assert [r["text"] for r in table.rows] == ["hello", "bye"]
    assert table.lines == [3, 5]


def test_csv_without_trailing_newline(tmp_path):
    table = read_table(write(tmp_path / "a.csv", "text,label\nhello,a"))
    assert table.rows == [{"text": "hello", "label": "a"}]


def test_csv_utf8_bom_and_crlf(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\r\ncaf\xc3\xa9,a\r\n\"two\r\nlines\",b\r\nlast,c\r\n")
    table = read_table(path)
    assert table.columns == ["text", "label"]  # no '\ufefftext'
    assert table.rows[0] == {"text": "café", "label": "a"}
    assert table.rows[1]["label"] == "b" and table.rows[1]["text"] == "two\r\nlines"
    assert table.rows[2] == {"text": "last", "label": "c"}  # no stray '\r'
    assert table.lines == [2, 3, 5]


def test_csv_latin1_with_encoding_option(tmp_path):
    path = write(tmp_path / "a.csv", "text,label\ncafé crème,a\nÜber,b\n", encoding="latin-1")
    with pytest.raises(DataError):
        read_table(path)  # utf-8 by default
    table = read_table(path, encoding="latin-1")
    assert [r["text"] for r in table.rows] == ["café crème", "Über"]


@pytest.mark.parametrize("name", ["a.tsv", "a.tab"])
def test_tsv(tmp_path, name):
    # TSV has no quoting: a quote is text (as GLUE-style files expect), one line is one row
    path = write(tmp_path / name, "text\tlabel\nhello, world\tpos\n\"quoted\" text\tneg\n")
    table = read_table(path)
    assert table.columns == ["text", "label"]
    assert table.rows == [{"text": "hello, world", "label": "pos"}, {"text": '"quoted" text', "label": "neg"}]
    assert table.lines == [2, 3]


def test_jsonl_rows_columns_and_lines(tmp_path):
    lines = [json.dumps(r) for r in ROWS]
    path = write(tmp_path / "train.jsonl", f"{lines[0]}\n\n{lines[1]}\n   \n{lines[2]}\n")
    table = read_table(path)
    assert table.columns == ["text", "label"]
    assert table.rows == ROWS
    assert table.lines == [1, 3, 5]
    assert table.where(1) == f"{path}:3"


def test_jsonl_keeps_value_types_and_unions_columns(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "a", "label": 1, "tags": ["x", "y"]}\n'
                                       '{"text": "b", "score": 0.5, "extra": null}\n')
    table = read_table(path)
    assert table.columns == ["text", "label", "tags", "score", "extra"]  # first-seen order
    assert table.rows[0] == {"text": "a", "label": 1, "tags": ["x", "y"]}
    assert table.rows[1] == {"text": "b", "score": 0.5, "extra": None}


@pytest.mark.parametrize("name", ["a.jsonl", "a.ndjson", "a.json", "A.JSONL"])
def test_jsonl_extensions(tmp_path, name):
    assert len(read_table(write(tmp_path / name, '{"text": "a"}\n'))) == 1


def test_jsonl_bom_and_crlf(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9", "label": "a"}\r\n\r\n{"text": "b", "label": "b"}\r\n')
    table = read_table(path)
    assert table.rows == [{"text": "café", "label": "a"}, {"text": "b", "label": "b"}]
    assert table.lines == [1, 3]


def test_jsonl_unicode_line_separators_inside_strings(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 unescaped; they do not end a JSONL line
    texts = ["a\u2028b", "c\u2029d", "e\x85f"]
    body = "".join(json.dumps({"text": t, "label": "x"}, ensure_ascii=False) + "\n" for t in texts)
    table = read_table(write(tmp_path / "a.jsonl", body))
    assert [r["text"] for r in table.rows] == texts
    assert table.lines == [1, 2, 3]


def test_jsonl_latin1(tmp_path):
    table = read_table(write(tmp_path / "a.jsonl", '{"text": "naïve"}\n', encoding="latin-1"), encoding="latin-1")
    assert table.rows == [{"text": "naïve"}]


def test_jsonl_nan_label_is_read_as_float_nan(tmp_path):
    table = read_table(write(tmp_path / "a.jsonl", '{"text": "a", "label": NaN}\n'))
    assert table.rows[0]["label"] != table.rows[0]["label"]


def test_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [0, 1, 0], "tags": [["x"], [], ["x", "y"]]}), path)
    table = read_table(path)
    assert table.columns == ["text", "label", "tags"]
    assert table.rows == [{"text": "a", "label": 0, "tags": ["x"]}, {"text": "b", "label": 1, "tags": []},
                          {"text": "c", "label": 0, "tags": ["x", "y"]}]
    assert table.lines == [1, 2, 3] and table.line_kind == "row"
    assert table.where(1) == f"{path} row 2"


def test_parquet_pq_extension(tmp_path):
    path = tmp_path / "train.pq"
    pq.write_table(pa.table({"text": ["a"]}), path)
    assert read_table(path).rows == [{"text": "a"}]


def test_hf_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}).save_to_disk(str(folder))
    assert detect_format(folder) == "hf"
    table = read_table(folder)
    assert isinstance(table, Table)
    assert table.columns == ["text", "label"]
    assert table.rows == [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    assert table.lines == [1, 2] and table.where(0) == f"{folder} row 1"


def test_hf_dataset_dict_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dd"
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": ["x", "y", "x"]}),
        "validation": datasets.Dataset.from_dict({"text": ["d"], "label": ["y"]}),
        "test": datasets.Dataset.from_dict({"text": ["e", "f"], "label": ["x", "y"]}),
    })
    dd.save_to_disk(str(folder))
    tables = read_table(folder)
    assert isinstance(tables, dict) and set(tables) == {"train", "validation", "test"}
    assert [len(tables[s]) for s in ("train", "validation", "test")] == [3, 1, 2]
    assert tables["validation"].rows == [{"text": "d", "label": "y"}]
    assert tables["test"].path == f"{folder}[test]"
    assert tables["test"].where(1) == f"{folder}[test] row 2"


def test_explicit_format_beats_extension(tmp_path):
    path = write(tmp_path / "data.txt", "text,label\nhello,a\n")
    assert read_table(path, fmt="csv").rows == [{"text": "hello", "label": "a"}]
    path = write(tmp_path / "data.csv", '{"text": "a"}\n')
    assert read_table(path, fmt="jsonl").rows == [{"text": "a"}]


@pytest.mark.parametrize("name, kind", [("a.csv", "csv"), ("a.CSV", "csv"), ("a.tsv", "tsv"), ("a.jsonl", "jsonl"),
                                        ("a.parquet", "parquet")])
def test_detect_format(name, kind):
    assert detect_format(Path(name)) == kind


# ---------------------------------------------------------------------------------------------------------------
# errors name the file, the line and the fix


def test_missing_file_lists_the_folder(tmp_path):
    write(tmp_path / "train.csv", "text,label\n")
    path = tmp_path / "trian.csv"
    message = data_error(path)
    assert str(path) in message and "not found" in message
    assert "train.csv" in message  # what is there instead
    assert "data.train" in message


def test_missing_file_in_missing_folder(tmp_path):
    path = tmp_path / "nope" / "train.csv"
    message = data_error(path)
    assert str(path) in message and "not found" in message


@pytest.mark.parametrize("name", ["a.csv", "a.tsv", "a.jsonl"])
@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    message = data_error(path)
    assert str(path) in message and "empty" in message


def test_header_only_csv_reads_as_zero_rows(tmp_path):
    # `prepare` turns this into an error (tests/data/test_prepare.py); reading alone is fine
    table = read_table(write(tmp_path / "a.csv", "text,label\n"))
    assert table.columns == ["text", "label"] and table.rows == []


def test_non_utf8_byte_names_line_column_and_encoding_option(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"text,label\nok,a\ncaf\xe9,b\n")
    message = data_error(path)
    assert f"{path}:3:4:" in message
    assert "0xe9" in message
    assert "data.encoding" in message and "latin-1" in message


def test_non_utf8_byte_after_bom_is_located_exactly(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\ncaf\xe9,b\n")
    message = data_error(path)
    assert f"{path}:2:4:" in message and "0xe9" in message and "data.encoding" in message


def test_non_utf8_on_first_line_of_bom_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "\xff"}\n')
    message = data_error(path)
    assert f"{path}:1:14:" in message and "0xff" in message  # column counts the BOM's 3 bytes


def test_non_utf8_jsonl(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\x96"}\n')
    message = data_error(path)
    assert f"{path}:2:11:" in message and "data.encoding" in message


def test_unknown_encoding(tmp_path):
    message = data_error(write(tmp_path / "a.csv", "text\nhello\n"), encoding="klingon-8")
    assert "data.encoding='klingon-8'" in message


def test_semicolon_separated_file(tmp_path):
    path = write(tmp_path / "a.csv", "text;label\nhello;a\n")
    message = data_error(path)
    assert f"{path}:1" in message and "semicolon" in message and "convert" in message


def test_tab_separated_file_read_as_csv(tmp_path):
    path = write(tmp_path / "a.csv", "text\tlabel\nhello\ta\n")
    message = data_error(path)
    assert f"{path}:1" in message and "tab" in message and "data.format=tsv" in message


def test_comma_separated_file_read_as_tsv(tmp_path):
    path = write(tmp_path / "a.tsv", "text,label\nhello,a\n")
    message = data_error(path)
    assert f"{path}:1" in message and "comma" in message and "data.format=csv" in message


def test_duplicate_column_names(tmp_path):
    path = write(tmp_path / "a.csv", "text,label,text\na,b,c\n")
    message = data_error(path)
    assert f"{path}:1" in message and "'text'" in message and "twice" in message and "rename" in message


@pytest.mark.parametrize("header", ["text,,label", "text,label,", "text, ,label"])
def test_empty_column_name(tmp_path, header):
    path = write(tmp_path / "a.csv", f"{header}\na,b,c\n")
    message = data_error(path)
    assert f"{path}:1" in message and "empty column name" in message


def test_row_with_too_many_fields(tmp_path):
    path = write(tmp_path / "a.csv", "text,label\nok,a\nhello, world,b\n")
    message = data_error(path)
    assert f"{path}:3:" in message
    assert "3 fields" in message and "header has 2" in message and "quote" in message


def test_row_with_too_few_fields(tmp_path):
    path = write(tmp_path / "a.csv", "text,label\nok,a\n\njust text\n")
    message = data_error(path)
    assert f"{path}:4:" in message
    assert "1 fields" in message and "header has 2" in message and "delimiter" in message


def test_bad_row_after_multiline_field_has_its_own_line(tmp_path):
    path = write(tmp_path / "a.csv", 'text,label\n"two\nlines",a\nx,y,z\n')
    assert f"{path}:4:" in data_error(path)


def test_unclosed_quote_points_to_the_row_where_it_opens(tmp_path):
    # the unclosed quote swallows the rest of the file into one field
    path = write(tmp_path / "a.csv", 'text,label\nok,a\n"oops,b\nmore,c\nlast,d\n')
    message = data_error(path)
    assert f"{path}:3:" in message


def test_tsv_row_with_wrong_field_count(tmp_path):
    path = write(tmp_path / "a.tsv", "text\tlabel\nok\ta\nbad\n")
    message = data_error(path)
    assert f"{path}:3:" in message and "'\\t'" in message


def test_invalid_json_line(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "a"}\n\n{"text": "b",}\n')
    message = data_error(path)
    assert f"{path}:3:" in message and "invalid JSON" in message and "one JSON object" in message


def test_invalid_json_single_quotes(tmp_path):
    path = write(tmp_path / "a.jsonl", "{'text': 'a'}\n")
    message = data_error(path)
    assert f"{path}:1:2:" in message and "invalid JSON" in message


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ('"text"', "str"), ("3", "int"), ("null", "NoneType")])
def test_json_line_that_is_not_an_object(tmp_path, line, kind):
    path = write(tmp_path / "a.jsonl", '{"text": "a"}\n' + line + "\n")
    message = data_error(path)
    assert f"{path}:2:" in message and "JSON object" in message and kind in message


def test_json_array_file(tmp_path):
    # a .json file holding one array (not JSON Lines) is rejected at line 1
    path = write(tmp_path / "a.json", json.dumps(ROWS))
    message = data_error(path)
    assert f"{path}:1:" in message and "JSON object" in message


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"this is not parquet at all\n")
    message = data_error(path)
    assert str(path) in message and "Parquet" in message


def test_empty_parquet_file(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"")
    assert "Parquet" in data_error(path)


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    folder = tmp_path / "notads"
    folder.mkdir()
    (folder / "readme.txt").write_text("hi")
    message = data_error(folder)
    assert str(folder) in message and "save_to_disk" in message


@pytest.mark.parametrize("name", ["train.xlsx", "train.txt", "train"])
def test_unknown_extension(tmp_path, name):
    path = write(tmp_path / name, "text,label\na,b\n")
    message = data_error(path)
    assert str(path) in message and "data.format" in message
    assert "csv" in message and "jsonl" in message


def test_hf_class_label_names_become_the_label_names(tmp_path):
    import datasets

    from strop.config import load_config
    from strop.tasks import prepare

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    rows = {"text": [f"text number {i}" for i in range(40)], "label": [i % 2 for i in range(40)]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    table = read_table(tmp_path / "ds")
    assert table.rows[0]["label"] == "negative" and table.rows[1]["label"] == "positive"
    ds = prepare(load_config(None, {"data.train": str(tmp_path / "ds")}))
    assert ds.labels == ["negative", "positive"]
