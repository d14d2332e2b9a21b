"""Issue 24 item 4: few-shot mode keeps its few examples for training, and no summary presents the metrics of a
split too small to mean anything.

The data is the issue's: 8 examples per class of 2 classes (16 rows) and a test file of 10 per class. A tenth of
8 rounds to 1 per class, so a carved validation split is 2 rows (the 0.0000 / MCC -1.0 of the issue)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_overrides, toy_rows, write_csv

from strop.config import load_config
from strop.data.split import too_small_to_score
from strop.tasks import get_task
from strop.errors import ConfigError
from strop.run import prepare_data, train

FEWSHOT = {"train.mode": "fewshot", "fewshot.epochs": 1, "fewshot.batch_size": 8, "fewshot.lr": 1e-3,
           "eval.report": False, "track": "none"}
HELD_OUT_NOTE = "few-shot mode: data.validation_ratio=0, so none of the 16 labelled rows of data.train"


def _two_classes(n: int, seed: int) -> list[dict]:
    """toy_rows without the 'account' topic: n * 2/3 rows, half billing, half shipping."""
    return [r for r in toy_rows(n, seed) if r["label"] != "account"]


def _files(tmp_path) -> dict:
    """data.train: 8 rows per class; data.test: 10 per class (20 rows, just enough to be scored). No ratio set."""
    return {"data.train": str(write_csv(tmp_path / "train.csv", _two_classes(24, 1))),
            "data.test": str(write_csv(tmp_path / "test.csv", _two_classes(30, 3)))}


def _run(tiny_model, tmp_path, **extra):
    return train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{**_files(tmp_path), **FEWSHOT, **extra}))


def _saved(run_dir) -> tuple[dict, dict]:
    """(config.yaml, data.json) of a run folder."""
    return (yaml.safe_load((run_dir / "config.yaml").read_text()),
            json.loads((run_dir / "data.json").read_text()))


def _sizes(data: dict) -> dict:
    return {split: info["examples"] for split, info in data["splits"].items()}


def _printed(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())  # rich wraps long lines


def test_explicit_fewshot_keeps_every_row_for_training_and_says_so(tiny_model, tmp_path, capsys):
    res = _run(tiny_model, tmp_path)
    config, data = _saved(res.run_dir)
    assert _sizes(data) == {"train": 16, "test": 20}  # no validation carved from the 16
    assert config["data"]["validation_ratio"] == 0.0  # resolved and recorded, so the run reproduces
    printed = _printed(capsys)
    assert printed.count(HELD_OUT_NOTE) == 1
    assert "validation" not in res.results and res.results["small_splits"] == {}
    assert "test metrics not shown" not in printed and res.results["test"]["n"] == 20

    # `strop train runs/x/config.yaml` sees the recorded 0: the same split, and the line is not printed again
    cfg = load_config(res.run_dir / "config.yaml")
    ds, _, mode = prepare_data(cfg)
    assert mode == "fewshot" and {s: len(e) for s, e in ds.splits.items()} == {"train": 16, "test": 20}
    assert HELD_OUT_NOTE not in _printed(capsys)


def test_auto_choosing_fewshot_keeps_every_row(tiny_model, tmp_path, capsys):
    res = _run(tiny_model, tmp_path, **{"train.mode": "auto"})
    config, data = _saved(res.run_dir)
    assert res.results["train_mode"] == "fewshot"
    assert _sizes(data) == {"train": 16, "test": 20} and config["data"]["validation_ratio"] == 0.0
    printed = _printed(capsys)
    assert "train.mode=auto: at most 8 training examples per class" in printed and HELD_OUT_NOTE in printed


def test_auto_decides_on_the_whole_training_file(tmp_path):
    """The mode sets how much is held out, so it is decided before anything is: 8 per class > 7 is standard (on the
    7 per class left after a 0.1 split it would have been few-shot), which then carves the usual 0.1."""
    cfg = load_config(None, {**_files(tmp_path), "train.mode": "auto", "fewshot.auto_max_per_class": 7})
    ds, _, mode = prepare_data(cfg)
    assert mode == "standard" and cfg.data.validation_ratio == 0.1
    # 0.1 of 8 rounds to 1 row per class (data/split.carve keeps at least one)
    assert {s: len(e) for s, e in ds.splits.items()} == {"train": 14, "test": 20, "validation": 2}


@pytest.mark.parametrize("mode", ["fewshot", "auto"])
def test_a_ratio_the_user_set_is_kept(tmp_path, capsys, mode):
    cfg = load_config(None, {**_files(tmp_path), "train.mode": mode, "data.validation_ratio": 0.25})
    ds, _, chosen = prepare_data(cfg)
    assert chosen == "fewshot" and cfg.data.validation_ratio == 0.25
    # 0.25 of 8 = 2 rows per class held out, stratified
    assert {s: len(e) for s, e in ds.splits.items()} == {"train": 12, "test": 20, "validation": 4}
    assert "few-shot mode: data.validation_ratio=0" not in _printed(capsys)


def test_a_validation_file_is_kept(tiny_model, tmp_path, capsys):
    val = str(write_csv(tmp_path / "validation.csv", _two_classes(30, 2)))  # 10 per class: scored
    res = _run(tiny_model, tmp_path, **{"data.validation": val})
    _, data = _saved(res.run_dir)
    assert _sizes(data) == {"train": 16, "validation": 20, "test": 20}
    printed = _printed(capsys)
    assert "few-shot mode: data.validation_ratio=0" not in printed  # the file decides: nothing carved, no news
    assert res.results["small_splits"] == {} and res.results["validation"]["n"] == 20
    assert "metrics not shown" not in printed


def test_a_split_too_small_prints_why_instead_of_its_metrics(tiny_model, tmp_path, capsys):
    """The issue's run: the user holds out 1 of 8 per class. results.json keeps the numbers (it is a record); the
    printed summary and report.html give the reason instead of presenting them."""
    res = _run(tiny_model, tmp_path, **{"data.validation_ratio": 0.125, "eval.report": True})
    config, data = _saved(res.run_dir)
    assert config["data"]["validation_ratio"] == 0.125 and _sizes(data) == {"train": 14, "validation": 2, "test": 20}
    why = "2 rows for 2 classes, fewer than 10 per class (needs 20)"
    results = json.loads((res.run_dir / "results.json").read_text())
    assert results["small_splits"] == {"validation": why}
    assert results["validation"]["n"] == 2 and 0 <= results["validation"]["accuracy"] <= 1

    err = capsys.readouterr().err
    printed = " ".join(err.split())
    assert f"validation metrics not shown: {why}, too few for the numbers to mean anything" in printed
    table_rows = [line.split()[1] for line in err.splitlines() if line.startswith("│")]
    assert "test" in table_rows and "validation" not in table_rows  # the table scores test only

    page = (res.run_dir / "report.html").read_text()
    assert f"validation metrics not shown: {why}" in page
    assert "per class (test)" in page and "per class (validation)" not in page


def test_a_split_with_every_row_small_prints_no_table(tiny_model, tmp_path, capsys):
    tiny_test = str(write_csv(tmp_path / "tiny_test.csv", _two_classes(9, 3)))  # 6 rows: 3 per class
    res = _run(tiny_model, tmp_path, **{"data.test": tiny_test})
    assert res.results["small_splits"] == {"test": "6 rows for 2 classes, fewer than 10 per class (needs 20)"}
    err = capsys.readouterr().err
    assert "test metrics not shown" in " ".join(err.split()) and "│" not in err


@pytest.mark.parametrize("rows, task, labels, why", [
    (20, "single_label", 2, None),  # 10 per class: enough
    (19, "single_label", 2, "19 rows for 2 classes, fewer than 10 per class (needs 20)"),
    (1000, "single_label", 3, None),  # a rare class in a large test set does not disqualify it (average per class)
    (10, "regression", 1, None),
    (9, "token_classification", 9, "9 rows, fewer than 10"),
])
def test_too_small_to_score(rows, task, labels, why):
    classes = labels if get_task(task).class_per_row else None  # as run.small_splits asks the task
    assert too_small_to_score(rows, classes) == why


def test_resuming_with_the_original_command_keeps_the_resolved_ratio(tiny_model, tmp_path):
    """config.yaml holds the resolved 0.1; the command line leaves it empty. Resuming with that command must not read
    as a changed setting (check_resumable), and the run continues on the split it started with."""
    files = {"data.train": str(write_csv(tmp_path / "train.csv", toy_rows(60, 1))), "track": "none",
             "eval.report": False}
    args = tiny_overrides(tiny_model, tmp_path / "runs", **files, **{"train.max_steps": 6, "train.save_every": 4})
    run = train(None, args)
    (run.run_dir / "results.json").unlink()  # as if killed after the step-4 checkpoint
    resumed = train(None, args, resume=True)
    assert resumed.results["resumed_from_step"] == 4
    assert yaml.safe_load((run.run_dir / "config.yaml").read_text())["data"]["validation_ratio"] == 0.1


def test_tuning_a_fewshot_run_without_validation_is_refused_before_training(tiny_model, tmp_path):
    pytest.importorskip("optuna")
    from strop.tune import tune

    out = tmp_path / "runs"
    args = tiny_overrides(tiny_model, out, **{**_files(tmp_path), **FEWSHOT, "name": "toy",
                                              "tune.space": "{fewshot.lr: {log_uniform: [1e-4, 1e-2]}}"})
    with pytest.raises(ConfigError, match="give data.validation or set data.validation_ratio"):
        tune(None, args, trials=1)
    assert not (out / "toy-trial-0").exists()  # refused before the trial's run folder was made
