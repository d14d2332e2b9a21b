"""Edge cases of reading data files that once crashed or misread: TSV quotes, folders, leading blank lines, label
classes named like missing values, lone UTF-16 surrogates, and the NER readers' encoding handling."""

import json
from pathlib import Path

import pytest

from strop.config import load_config
from strop.data.conll import jsonl_has_token_lists, read_conll, read_token_jsonl
from strop.data.load import read_table
from strop.tasks import prepare
from strop.errors import DataError
from strop.predict_tokens import TokenPredictor


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def data_error(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    return str(info.value)


def prepare_with(**over):
    return prepare(load_config(None, {"data.validation_ratio": 0, "data.test_ratio": 0, **over}))


# ---------------------------------------------------------------------------------------------------------------
# TSV has no quoting: every line is one row and '"' is text


def test_tsv_keeps_quotes_and_reads_one_row_per_line(tmp_path):
    path = write(tmp_path / "a.tsv", 'text\tlabel\n"quoted" start\tpos\n"never closed\tneg\nnext line\tpos\n'
                                     'ends with "\tneg\n')
    table = read_table(path)
    assert [r["text"] for r in table.rows] == ['"quoted" start', '"never closed', "next line", 'ends with "']
    assert [r["label"] for r in table.rows] == ["pos", "neg", "pos", "neg"]
    assert table.lines == [2, 3, 4, 5]


def test_tsv_field_with_a_tab_says_tsv_cannot_quote(tmp_path):
    message = data_error(read_table, write(tmp_path / "a.tsv", 'text\tlabel\n"a\tb"\tpos\n'))
    assert f"{tmp_path / 'a.tsv'}:2:" in message and "3 fields" in message and "no quoting" in message


def test_csv_quoting_is_unchanged(tmp_path):
    path = write(tmp_path / "a.csv", 'text,label\n"a, b",pos\n"two\nlines",neg\n')
    table = read_table(path)
    assert [r["text"] for r in table.rows] == ["a, b", "two\nlines"] and table.lines == [2, 3]


# ---------------------------------------------------------------------------------------------------------------
# a folder with a file format


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_folder_with_a_file_format_is_a_data_error(tmp_path, fmt):
    folder = tmp_path / "data"
    folder.mkdir()
    message = data_error(read_table, folder, fmt)
    assert str(folder) in message and "is a folder" in message and "data.format=hf" in message


# ---------------------------------------------------------------------------------------------------------------
# blank lines before the header


@pytest.mark.parametrize("name, sep", [("a.csv", ","), ("a.tsv", "\t")])
def test_blank_lines_before_the_header_are_skipped(tmp_path, name, sep):
    path = write(tmp_path / name, f"\n  \r\ntext{sep}label\nhello{sep}a\n\nbye{sep}b\n")
    table = read_table(path)
    assert table.columns == ["text", "label"]
    assert table.rows == [{"text": "hello", "label": "a"}, {"text": "bye", "label": "b"}]
    assert table.lines == [4, 6]


def test_header_errors_name_the_header_line_after_blank_lines(tmp_path):
    message = data_error(read_table, write(tmp_path / "a.csv", "\n\ntext,text\nhello,a\n"))
    assert f"{tmp_path / 'a.csv'}:3:" in message and "appears twice" in message


# ---------------------------------------------------------------------------------------------------------------
# label classes named like missing values


@pytest.mark.parametrize("word", ["none", "None", "null", "nan", "NaN", "inf"])
def test_label_class_named_like_a_missing_value_is_a_class(tmp_path, word):
    path = write(tmp_path / "t.csv", f"text,label\na,{word}\nb,pos\nc,{word}\nd,pos\n")
    ds = prepare_with(**{"data.train": str(path)})
    assert ds.task == "single_label" and sorted(ds.labels) == sorted([word, "pos"])
    ids = ds.splits["train"].labels.tolist()
    assert [ds.labels[i] for i in ids] == [word, "pos", word, "pos"]


def test_real_nulls_and_blank_strings_are_still_missing_labels(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "a", "label": "x"}, {"text": "b", "label": "y"},
                                                            {"text": "c", "label": None}]), encoding="utf-8")
    message = data_error(prepare_with, **{"data.train": str(path)})
    assert f"{path}:3" in message and "missing label" in message
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": NaN}\n')
    assert f"{path}:3" in data_error(prepare_with, **{"data.train": str(path)})
    csv_path = write(tmp_path / "t.csv", "text,label\na,x\nb,y\nc,  \n")
    message = data_error(prepare_with, **{"data.train": str(csv_path)})
    assert f"{csv_path}:4" in message and "missing label" in message


def test_numeric_labels_with_a_nan_word_say_the_labels_are_mixed(tmp_path):
    path = write(tmp_path / "t.csv", "text,label\na,0\nb,1\nc,nan\n")
    message = data_error(prepare_with, **{"data.train": str(path)})
    assert "mixes numbers" in message and f"{path}:4" in message


# ---------------------------------------------------------------------------------------------------------------
# lone UTF-16 surrogates in JSON


def test_lone_surrogate_in_jsonl_text_names_file_line_and_key(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"text": "fine \\ud83d\\ude00", "label": "a"}\n'
                                       '{"text": "cut \\ud83d", "label": "b"}\n')
    message = data_error(read_table, path)
    assert f"{path}:2:" in message and "'text'" in message and "\\ud83d" in message and "surrogate" in message


def test_paired_surrogates_and_escapes_read_normally(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"text": "smile \\ud83d\\ude00 \\u00e9", "label": "a"}\n')
    assert read_table(path).rows[0]["text"] == "smile \U0001F600 \u00e9"


def test_lone_surrogate_in_a_token_list(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"tokens": ["EU", "\\udc00"], "tags": ["B-ORG", "O"]}\n')
    message = data_error(read_token_jsonl, path)
    assert f"{path}:1:" in message and "'tokens'" in message and "\\udc00" in message


# ---------------------------------------------------------------------------------------------------------------
# NER readers honour data.encoding


def test_conll_unknown_encoding_is_a_data_error(tmp_path):
    path = write(tmp_path / "a.conll", "EU B-ORG\n")
    for name in ("klingon-8", "rot13"):  # rot13 is a codec, but not a text encoding
        assert f"data.encoding={name!r}" in data_error(read_conll, path, encoding=name)


def test_latin1_token_jsonl_is_token_data_with_data_encoding(tmp_path):
    rows = [{"tokens": ["Café", "Müller"], "tags": ["B-ORG", "I-ORG"]},
            {"tokens": ["à", "Zürich"], "tags": ["O", "B-LOC"]}]
    path = write(tmp_path / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "latin-1")
    assert jsonl_has_token_lists(path, "latin-1")
    ds = prepare_with(**{"data.train": str(path), "data.encoding": "latin-1"})
    assert ds.task == "token_classification" and ds.splits["train"].tokens == [r["tokens"] for r in rows]


class _Echo(TokenPredictor):
    """TokenPredictor without a model: predict() returns the texts it got, to test file reading alone."""

    def __init__(self):
        self.meta = {}

    def predict(self, texts, batch_size=64, word_split=None):
        return [{"text": t} for t in texts]


def test_token_predict_txt_decoding_errors_are_data_errors(tmp_path):
    path = tmp_path / "raw.txt"
    path.write_bytes(b"ok line\ncaf\xe9 here\n")
    message = data_error(_Echo()._file_predictions, path, 8, "utf-8")
    assert f"{path}:2:4:" in message and "0xe9" in message and "encoding" in message
    rows, preds = _Echo()._file_predictions(path, 8, "latin-1")
    assert [r["text"] for r in rows] == ["ok line", "café here"] and preds[1] == {"text": "café here"}
    assert "data.encoding='klingon-8'" in data_error(_Echo()._file_predictions, path, 8, "klingon-8")
