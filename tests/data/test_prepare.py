"""data config -> validated, split examples: column and task inference, label names, row errors, seeded splits."""

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from strop.config import load_config
from strop.tasks import prepare
from strop.errors import DataError


def write_csv(path: Path, header: list[str], rows: list) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(**data) -> "Dataset":  # noqa: F821
    """prepare() with `data.<key>` overrides; `task` is passed through as the top-level key."""
    task = data.pop("task", "auto")
    return prepare(load_config(None, {"task": task, **{f"data.{k}": v for k, v in data.items()}}))


def error(**data) -> str:
    with pytest.raises(DataError) as info:
        run(**data)
    return str(info.value)


def labelled(tmp_path, counts: dict[str, int], name="train.csv") -> Path:
    """A CSV with counts[label] rows of each label; row i has text 'example i'."""
    rows, i = [], 0
    for label, n in counts.items():
        for _ in range(n):
            rows.append([f"example {i}", label])
            i += 1
    return write_csv(tmp_path / name, ["text", "label"], rows)


NO_SPLITS = {"validation_ratio": 0, "test_ratio": 0}


# ---------------------------------------------------------------------------------------------------------------
# columns


def test_infers_text_and_label_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["id", "text", "label"], [[1, "good", "pos"], [2, "bad", "neg"]])
    ds = run(train=str(path), **NO_SPLITS)
    assert (ds.columns.text, ds.columns.pair, ds.columns.label) == ("text", None, "label")
    train = ds.splits["train"]
    assert train.texts == ["good", "bad"] and train.pairs is None
    assert ds.labels == ["neg", "pos"]
    assert train.labels.tolist() == [1, 0] and train.labels.dtype == np.int64
    assert train.rows == [0, 1]
    assert any("text='text'" in n and "label='label'" in n for n in ds.notes)


def test_column_inference_ignores_case(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["Text", "Label"], [["good", "pos"], ["bad", "neg"]])
    ds = run(train=str(path), **NO_SPLITS)
    assert (ds.columns.text, ds.columns.label) == ("Text", "Label")


def test_infers_sentence_pair_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["sentence1", "sentence2", "label"],
                     [["a cat sat", "a cat was sitting", "entail"], ["it rains", "it is sunny", "contra"]])
    ds = run(train=str(path), **NO_SPLITS)
    assert (ds.columns.text, ds.columns.pair, ds.columns.label) == ("sentence1", "sentence2", "label")
    assert ds.splits["train"].texts == ["a cat sat", "it rains"]
    assert ds.splits["train"].pairs == ["a cat was sitting", "it is sunny"]


def test_infers_score_column_as_regression(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["sentence1", "sentence2", "score"],
                     [["a", "b", "4.2"], ["c", "d", "0.5"], ["e", "f", "3"]])
    ds = run(train=str(path), **NO_SPLITS)
    assert ds.columns.label == "score" and ds.columns.pair == "sentence2"
    assert ds.task == "regression"
    assert ds.labels == ["score"]
    labels = ds.splits["train"].labels
    assert labels.dtype == np.float32
    np.testing.assert_allclose(labels, [4.2, 0.5, 3.0], rtol=1e-6)
    assert any("regression" in n for n in ds.notes)


def test_explicit_column_mapping(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["label", "body", "topic", "title"],
                     [["ignored", "body one", "billing", "t1"], ["ignored", "body two", "login", "t2"]])
    ds = run(train=str(path), text_column="body", label_column="topic", text_pair_column="title", **NO_SPLITS)
    assert (ds.columns.text, ds.columns.pair, ds.columns.label) == ("body", "title", "topic")
    assert ds.splits["train"].texts == ["body one", "body two"]
    assert ds.splits["train"].pairs == ["t1", "t2"]
    assert ds.labels == ["billing", "login"]


@pytest.mark.parametrize("key, value", [("text_column", "body"), ("label_column", "sentiment"),
                                        ("text_pair_column", "second")])
def test_configured_column_not_found_lists_columns(tmp_path, key, value):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [["good", "pos"], ["bad", "neg"]])
    message = error(train=str(path), **{key: value}, **NO_SPLITS)
    assert f"data.{key}={value!r} not found" in message
    assert str(path) in message and "['text', 'label']" in message


def test_no_text_column_to_infer(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["body", "label"], [["good", "pos"], ["bad", "neg"]])
    message = error(train=str(path), **NO_SPLITS)
    assert str(path) in message and "['body', 'label']" in message and "data.text_column" in message


def test_no_label_column_to_infer(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "sentiment"], [["good", "pos"], ["bad", "neg"]])
    message = error(train=str(path), **NO_SPLITS)
    assert str(path) in message and "['text', 'sentiment']" in message and "data.label_column" in message


def test_validation_file_missing_a_column(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["good", "pos"], ["bad", "neg"]])
    dev = write_csv(tmp_path / "dev.csv", ["text", "sentiment"], [["fine", "pos"]])
    message = error(train=str(train), validation=str(dev), test_ratio=0)
    assert "data.label_column='label' not found" in message
    assert str(dev) in message and "validation" in message and "['text', 'sentiment']" in message


def test_test_file_missing_the_pair_column(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["sentence1", "sentence2", "label"], [["a", "b", "x"], ["c", "d", "y"]])
    test = write_csv(tmp_path / "test.csv", ["sentence1", "label"], [["e", "x"]])
    message = error(train=str(train), test=str(test), validation_ratio=0)
    assert "data.text_pair_column='sentence2' not found" in message and str(test) in message and "test" in message


# ---------------------------------------------------------------------------------------------------------------
# row errors


def test_empty_text_names_file_line_and_column(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [["good", "pos"], ["bad", "neg"], ["   ", "pos"]])
    message = error(train=str(path), **NO_SPLITS)
    assert f"{path}:4:" in message and "empty text" in message and "'text'" in message


def test_empty_pair_text(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["sentence1", "sentence2", "label"], [["a", "b", "x"], ["c", "", "y"]])
    message = error(train=str(path), **NO_SPLITS)
    assert f"{path}:3:" in message and "'sentence2'" in message


def test_empty_text_in_jsonl_null(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": None, "label": "y"}])
    message = error(train=str(path), **NO_SPLITS)
    assert f"{path}:2:" in message and "empty text" in message


def test_missing_label_names_file_and_line(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [["good", "pos"], ["bad", "neg"], ["meh", ""]])
    message = error(train=str(path), **NO_SPLITS)
    assert f"{path}:4:" in message and "missing label" in message and "'label'" in message


def test_nan_label_in_jsonl(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c", "label": NaN}\n',
                    encoding="utf-8")
    message = error(train=str(path), **NO_SPLITS)
    assert f"{path}:3:" in message and "missing label" in message


def test_nan_label_in_jsonl_regression(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": 0.5}\n{"text": "b", "label": NaN}\n', encoding="utf-8")
    message = error(train=str(path), **NO_SPLITS)
    assert f"{path}:2:" in message and "missing label" in message


def test_text_label_for_regression_task(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [["a", "0.5"], ["b", "high"]])
    message = error(train=str(path), task="regression", **NO_SPLITS)
    assert f"{path}:3:" in message and "'high'" in message and "not a number" in message


@pytest.mark.parametrize("split", ["validation", "test"])
def test_label_unseen_in_train(tmp_path, split):
    train = labelled(tmp_path, {"billing": 3, "login": 3})
    other = write_csv(tmp_path / f"{split}.csv", ["text", "label"], [["x", "login"], ["y", "refund"]])
    message = error(train=str(train), **{split: str(other)}, validation_ratio=0, test_ratio=0)
    assert f"{other}:3:" in message
    assert "'refund'" in message and split in message
    assert "['billing', 'login']" in message


def test_multi_label_unseen_in_train(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": ["x"]}, {"text": "b", "label": ["y"]}])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "c", "label": ["x", "z"]}])
    message = error(train=str(train), validation=str(dev), test_ratio=0)
    assert f"{dev}:1:" in message and "'z'" in message and "['x', 'y']" in message


def test_mixed_numeric_and_text_labels(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [["a", "1"], ["b", "2"], ["c", "spam"]])
    message = error(train=str(path), **NO_SPLITS)
    assert "mixes numbers" in message
    assert f"'1' at {path}:2" in message and f"'spam' at {path}:4" in message


def test_single_class_train_set(tmp_path):
    path = labelled(tmp_path, {"pos": 5})
    message = error(train=str(path), **NO_SPLITS)
    assert str(path) in message and "['pos']" in message and "at least 2 classes" in message


def test_label_column_empty_everywhere(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [["a", ""], ["b", ""]])
    message = error(train=str(path), **NO_SPLITS)
    assert str(path) in message and "empty in every row" in message


def test_header_only_train(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [])
    message = error(train=str(path))
    assert str(path) in message and "no rows" in message


def test_header_only_validation(tmp_path):
    train = labelled(tmp_path, {"a": 3, "b": 3})
    dev = write_csv(tmp_path / "dev.csv", ["text", "label"], [])
    message = error(train=str(train), validation=str(dev), test_ratio=0)
    assert str(dev) in message and "validation" in message and "no rows" in message


def test_train_not_set():
    with pytest.raises(DataError, match="data.train"):
        prepare(load_config())


def test_load_errors_pass_through(tmp_path):
    with pytest.raises(DataError, match="not found"):
        run(train=str(tmp_path / "missing.csv"))


# ---------------------------------------------------------------------------------------------------------------
# task inference and labels


def test_task_single_label_from_strings(tmp_path):
    ds = run(train=str(labelled(tmp_path, {"spam": 2, "ham": 2})), **NO_SPLITS)
    assert ds.task == "single_label" and ds.labels == ["ham", "spam"]
    assert ds.splits["train"].labels.tolist() == [1, 1, 0, 0]
    assert any("single_label" in n for n in ds.notes)


def test_task_single_label_from_ints(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0},
                                              {"text": "c", "label": 2}])
    ds = run(train=str(path), **NO_SPLITS)
    assert ds.task == "single_label" and ds.labels == ["0", "1", "2"]
    assert ds.splits["train"].labels.tolist() == [1, 0, 2]


def test_integer_valued_labels_are_one_class_whatever_their_spelling(tmp_path):
    # 1, 1.0 and "1" are the same class
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1.0},
                                              {"text": "c", "label": "1"}, {"text": "d", "label": 0}])
    ds = run(train=str(path), **NO_SPLITS)
    assert ds.task == "single_label" and ds.labels == ["0", "1"]
    assert ds.splits["train"].labels.tolist() == [1, 1, 1, 0]


def test_task_regression_from_floats(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0.25}, {"text": "b", "label": 1},
                                              {"text": "c", "label": -2.5}])
    ds = run(train=str(path), **NO_SPLITS)
    assert ds.task == "regression" and ds.labels == ["label"]
    np.testing.assert_allclose(ds.splits["train"].labels, [0.25, 1.0, -2.5])


def test_task_multi_label_from_json_lists(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "labels": ["sports", "politics"]},
                                              {"text": "b", "labels": ["tech"]},
                                              {"text": "c", "labels": []},
                                              {"text": "d", "labels": ["politics"]}])
    ds = run(train=str(path), **NO_SPLITS)
    assert ds.task == "multi_label" and ds.columns.label == "labels"
    assert ds.labels == ["politics", "sports", "tech"]
    y = ds.splits["train"].labels
    assert y.dtype == np.float32 and y.shape == (4, 3)
    np.testing.assert_array_equal(y, [[1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0]])


def test_task_multi_label_from_delimiter(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [["a", "b|a"], ["b", "c"], ["c", " a | c "]])
    ds = run(train=str(path), label_delimiter="|", **NO_SPLITS)
    assert ds.task == "multi_label" and ds.labels == ["a", "b", "c"]
    np.testing.assert_array_equal(ds.splits["train"].labels, [[1, 1, 0], [0, 0, 1], [1, 0, 1]])
    assert any("label_delimiter" in n for n in ds.notes)


def test_multi_label_numeric_names_sort_numerically(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": [10, 2]}, {"text": "b", "label": [1]}])
    ds = run(train=str(path), **NO_SPLITS)
    assert ds.labels == ["1", "2", "10"]
    np.testing.assert_array_equal(ds.splits["train"].labels, [[0, 1, 1], [1, 0, 0]])


def test_numeric_label_names_sort_numerically(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [["a", "10"], ["b", "2"], ["c", "-1"], ["d", "1"]])
    ds = run(train=str(path), **NO_SPLITS)
    assert ds.labels == ["-1", "1", "2", "10"]  # not the string order ['-1', '1', '10', '2']
    assert ds.splits["train"].labels.tolist() == [3, 2, 0, 1]


def test_explicit_task_overrides_inference(tmp_path):
    # integer scores inferred as classes unless the task says regression
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [["a", "1"], ["b", "5"], ["c", "3"]])
    assert run(train=str(path), **NO_SPLITS).task == "single_label"
    ds = run(train=str(path), task="regression", **NO_SPLITS)
    assert ds.task == "regression"
    np.testing.assert_allclose(ds.splits["train"].labels, [1, 5, 3])
    assert not any("inferred" in n for n in ds.notes)


def test_jsonl_validation_and_test_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(6)])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "d", "label": 1}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "e", "label": 0}, {"text": "f", "label": 1}])
    ds = run(train=str(train), validation=str(dev), test=str(test))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 6, "validation": 1, "test": 2}
    assert ds.splits["validation"].labels.tolist() == [1]
    assert ds.splits["test"].texts == ["e", "f"]


def test_hf_dataset_dict_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}),
        "validation": datasets.Dataset.from_dict({"text": ["e"], "label": [1]}),
        "test": datasets.Dataset.from_dict({"text": ["f", "g"], "label": [0, 1]}),
    }).save_to_disk(str(folder))
    ds = run(train=str(folder))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 4, "validation": 1, "test": 2}
    assert ds.splits["test"].texts == ["f", "g"]


# ---------------------------------------------------------------------------------------------------------------
# splits


def rows(ds, split):
    return ds.splits[split].rows


def test_default_split_sizes_and_stratification(tmp_path):
    # 4 classes x 50; each ratio 0.1 of the file: round(50 * 0.1) = 5 per class per carved split
    ds = run(train=str(labelled(tmp_path, {"a": 50, "b": 50, "c": 50, "d": 50})))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 160, "validation": 20, "test": 20}
    for split, per_class in (("train", 40), ("validation", 5), ("test", 5)):
        assert Counter(ds.splits[split].labels.tolist()) == {0: per_class, 1: per_class, 2: per_class, 3: per_class}
    assert any("validation split: 20" in n for n in ds.notes)


def test_split_is_disjoint_and_complete(tmp_path):
    ds = run(train=str(labelled(tmp_path, {"a": 31, "b": 17, "c": 9})), validation_ratio=0.2, test_ratio=0.15)
    parts = [set(rows(ds, s)) for s in ("train", "validation", "test")]
    assert sum(len(p) for p in parts) == 57
    assert set.union(*parts) == set(range(57))
    # texts and labels travel with their rows
    for split in ("train", "validation", "test"):
        ex = ds.splits[split]
        for text, label, row in zip(ex.texts, ex.labels, ex.rows):
            assert text == f"example {row}"
            assert ds.labels[label] == ("a" if row < 31 else "b" if row < 48 else "c")


def test_split_proportions_per_class(tmp_path):
    counts = {"a": 120, "b": 45, "c": 23}
    ds = run(train=str(labelled(tmp_path, counts)), validation_ratio=0.2, test_ratio=0.1)
    for split, ratio in (("validation", 0.2), ("test", 0.1), ("train", 0.7)):
        got = Counter(ds.splits[split].labels.tolist())
        for cls, n in enumerate(counts.values()):
            assert abs(got[cls] - n * ratio) <= 1.5, (split, cls, got[cls], n * ratio)


def test_every_class_in_every_split(tmp_path):
    ds = run(train=str(labelled(tmp_path, {"big": 100, "mid": 10, "rare": 3})))
    for split in ("train", "validation", "test"):
        assert set(ds.splits[split].labels.tolist()) == {0, 1, 2}, split


def test_every_class_in_every_split_with_large_ratios(tmp_path):
    # 3 examples of a class are enough for 3 splits even when validation's share rounds to 2 of them
    ds = run(train=str(labelled(tmp_path, {"a": 3, "b": 20})), validation_ratio=0.5, test_ratio=0.3)
    for split in ("train", "validation", "test"):
        assert 0 in ds.splits[split].labels.tolist(), split


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    path = str(labelled(tmp_path, {"a": 40, "b": 40, "c": 40}))
    first, again, other = run(train=path), run(train=path), run(train=path, split_seed=14)
    for split in ("train", "validation", "test"):
        assert rows(first, split) == rows(again, split)
    assert rows(first, "validation") != rows(other, "validation")
    assert rows(first, "test") != rows(other, "test")


def test_split_rows_are_in_file_order(tmp_path):
    ds = run(train=str(labelled(tmp_path, {"a": 20, "b": 20})))
    for split in ("train", "validation", "test"):
        assert rows(ds, split) == sorted(rows(ds, split))


def test_too_few_examples_to_stratify(tmp_path):
    # train + validation + test need 3 examples of every class
    path = labelled(tmp_path, {"common": 30, "rare": 2})
    message = error(train=str(path))
    assert "'rare'" in message and "2 example" in message and "3 parts" in message
    assert "data.validation" in message and "data.test" in message


def test_single_example_class_with_one_carved_split(tmp_path):
    path = labelled(tmp_path, {"common": 30, "rare": 1})
    message = error(train=str(path), test_ratio=0)
    assert "'rare'" in message and "1 example" in message and "2 parts" in message


def test_too_few_examples_is_fine_without_carving(tmp_path):
    ds = run(train=str(labelled(tmp_path, {"common": 30, "rare": 1})), **NO_SPLITS)
    assert set(ds.splits) == {"train"} and len(ds.splits["train"]) == 31


def test_validation_ratio_rounding_to_empty_split(tmp_path):
    # regression is split at random, not by class: 5% of 8 rows rounds to 0
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [[f"t{i}", f"{i}.5"] for i in range(8)])
    message = error(train=str(path), validation_ratio=0.05, test_ratio=0)
    assert "validation split is empty" in message and "0.05" in message and "8" in message
    assert "data.validation_ratio" in message and "data.validation" in message


def test_test_ratio_rounding_to_empty_split_multi_label(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"t{i}", "label": ["a", "b"][i % 2:]} for i in range(6)])
    message = error(train=str(path), validation_ratio=0, test_ratio=0.05)
    assert "test split is empty" in message and "data.test_ratio" in message


def test_random_split_for_regression(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [[f"t{i}", f"{i}.5"] for i in range(50)])
    ds = run(train=str(path), validation_ratio=0.2, test_ratio=0.1)
    # 0.2 * 50 = 10 for validation; then 0.1 / 0.8 of the 40 left = 5 for test
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 35, "validation": 10, "test": 5}
    assert set().union(*(rows(ds, s) for s in ds.splits)) == set(range(50))


def test_validation_file_and_carved_test(tmp_path):
    train = labelled(tmp_path, {"a": 30, "b": 30})
    dev = write_csv(tmp_path / "dev.csv", ["text", "label"], [["d1", "a"], ["d2", "b"], ["d3", "a"]])
    ds = run(train=str(train), validation=str(dev), test_ratio=0.2)
    assert ds.splits["validation"].texts == ["d1", "d2", "d3"]
    assert ds.splits["validation"].labels.tolist() == [0, 1, 0]
    # test_ratio is a share of the train file: 0.2 * 30 = 6 per class
    assert len(ds.splits["test"]) == 12 and len(ds.splits["train"]) == 48
    assert Counter(ds.splits["test"].labels.tolist()) == {0: 6, 1: 6}
    assert not set(rows(ds, "train")) & set(rows(ds, "test"))
    assert not any("validation split" in n for n in ds.notes)


def test_validation_ratio_zero_gives_no_validation_split(tmp_path):
    ds = run(train=str(labelled(tmp_path, {"a": 20, "b": 20})), validation_ratio=0)
    assert set(ds.splits) == {"train", "test"}
    assert len(ds.splits["test"]) == 4 and len(ds.splits["train"]) == 36


def test_both_ratios_zero_keep_all_of_train(tmp_path):
    ds = run(train=str(labelled(tmp_path, {"a": 5, "b": 5})), **NO_SPLITS)
    assert set(ds.splits) == {"train"} and rows(ds, "train") == list(range(10))


def test_given_files_are_not_carved(tmp_path):
    train = labelled(tmp_path, {"a": 4, "b": 4})
    dev = labelled(tmp_path, {"a": 1, "b": 1}, "dev.csv")
    test = labelled(tmp_path, {"a": 2, "b": 1}, "test.csv")
    ds = run(train=str(train), validation=str(dev), test=str(test))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 8, "validation": 2, "test": 3}
