"""One end-to-end test per CLI verb on a tiny random BERT: the files written and the numbers inside them."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_overrides, toy_rows, write_csv, write_jsonl

from strop.cli import main


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def trained(tiny_model, toy_splits, tmp_path):
    args = tiny_overrides(tiny_model, tmp_path / "runs", **{"data.train": toy_splits["train"],
                                                             "data.validation": toy_splits["validation"],
                                                             "data.test": toy_splits["test"]})
    assert main(["train", *args]) == 0
    return tmp_path / "runs" / "run", toy_splits


def test_train_writes_the_run_folder(trained):
    run_dir, _ = trained
    for name in ("config.yaml", "metrics.jsonl", "results.json", "data.json", "model/strop.json",
                 "model/model.safetensors", "model/config.json", "model/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["train"]["lr"] == 1e-2 and cfg["name"] == "run" and cfg["model"]["pooling"] == "cls"

    records = _records(run_dir)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "validation"]
    # 90 examples / batch 8 = 12 steps per epoch, 4 epochs, logged every 4 steps, evaluated each epoch
    assert [r["step"] for r in train] == list(range(4, 49, 4))
    assert [r["step"] for r in val] == [12, 24, 36, 48]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 and r["samples_per_s"] > 0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]

    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 48 and results["metric"] == "accuracy"
    assert results["best_metric"] == max(r["accuracy"] for r in val)
    # the restored best weights reproduce the best validation accuracy exactly (fp32)
    assert results["validation"]["accuracy"] == results["best_metric"]
    assert results["test"]["n"] == 30 and 0 <= results["test"]["accuracy"] <= 1
    assert sum(map(sum, results["test"]["confusion_matrix"])) == 30

    meta = json.loads((run_dir / "model" / "strop.json").read_text())
    assert meta["task"] == "single_label" and meta["labels"] == ["account", "billing", "shipping"]
    assert meta["text_column"] == "text" and meta["label_column"] == "label"
    data = json.loads((run_dir / "data.json").read_text())
    assert data["splits"]["train"]["label_counts"] == {"account": 30, "billing": 30, "shipping": 30}


def test_tensorboard_events_hold_the_logged_metrics(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = trained
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    records = _records(run_dir)
    train_loss = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    events = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in events] == [s for s, _ in train_loss]
    assert [v for _, v in events] == pytest.approx([v for _, v in train_loss], rel=1e-6)
    val_acc = [(r["step"], r["accuracy"]) for r in records if r["split"] == "validation"]
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("validation/accuracy")] == val_acc


def test_eval_verb_matches_training_results(trained, tmp_path, capsys):
    run_dir, splits = trained
    out = tmp_path / "eval.json"
    assert main(["eval", str(run_dir), "--data", str(splits["test"]), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    results = json.loads((run_dir / "results.json").read_text())
    assert metrics["accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert metrics["loss"] == pytest.approx(results["test"]["loss"], rel=1e-4)
    assert json.loads(capsys.readouterr().out)["n"] == 30


def test_predict_verb_keeps_columns_and_order(trained, tmp_path):
    run_dir, splits = trained
    rows = toy_rows(25, seed=9)
    for i, row in enumerate(rows):
        row["id"] = f"r{i}"
    src = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run_dir), "--data", str(src), "--out", str(out)]) == 0
    got = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    assert [g["text"] for g in got] == [r["text"] for r in rows]
    for g in got:
        probs = {k[5:]: float(v) for k, v in g.items() if k.startswith("prob_")}
        assert set(probs) == {"account", "billing", "shipping"}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert g["prediction"] == max(probs, key=probs.get)
        assert float(g["score"]) == pytest.approx(max(probs.values()), abs=1e-6)

    import strop

    direct = strop.load(run_dir).predict([r["text"] for r in rows])
    assert [d["label"] for d in direct] == [g["prediction"] for g in got]

    jsonl_out = tmp_path / "preds.jsonl"
    assert main(["predict", str(run_dir), "--data", str(src), "--out", str(jsonl_out)]) == 0
    lines = [json.loads(x) for x in jsonl_out.read_text().splitlines()]
    # the input's gold 'label' column is kept; the predicted label sits beside it
    assert [x["pred_label"] for x in lines] == [d["label"] for d in direct] and lines[0]["id"] == "r0"
    assert [x["label"] for x in lines] == [r["label"] for r in rows]


def test_predict_from_stdin_subprocess(trained):
    run_dir, _ = trained
    proc = subprocess.run([sys.executable, "-m", "strop.cli", "predict", str(run_dir)], input="my refund please\n\n"
                          "where is the parcel\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [x["text"] for x in lines] == ["my refund please", "where is the parcel"]
    assert all(x["label"] in ("account", "billing", "shipping") for x in lines)


def test_predict_and_eval_inputs_and_outputs_are_checked_first_and_kept(trained, tmp_path, capsys):
    run_dir, splits = trained
    # input columns named like outputs are kept; the outputs go beside them
    src = write_csv(tmp_path / "in.csv", [{"text": "refund my card", "prediction": "x", "score": "5"}])
    out = tmp_path / "p.csv"
    assert main(["predict", str(run_dir), "--data", str(src), "--out", str(out)]) == 0
    (row,) = list(csv.DictReader(out.open(encoding="utf-8")))
    assert row["prediction"] == "x" and row["score"] == "5"
    assert row["pred_prediction"] in ("account", "billing", "shipping") and 0 < float(row["pred_score"]) <= 1
    # a file in another encoding, named as such
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text\ncaf\xe9 refund\n".encode("latin-1"))
    assert main(["predict", str(run_dir), "--data", str(latin), "--out", str(out)]) == 2
    assert "UTF-8" in capsys.readouterr().err
    assert main(["predict", str(run_dir), "--data", str(latin), "--encoding", "latin-1", "--out", str(out)]) == 0
    assert next(csv.DictReader(out.open(encoding="utf-8")))["text"] == "caf\xe9 refund"
    # a wrong output name fails before any work and leaves no folder behind
    assert main(["predict", str(run_dir), "--data", str(src), "--out", str(tmp_path / "new" / "p.txt")]) == 2
    assert ".jsonl or .csv" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["eval", str(run_dir), "--data", str(splits["test"]), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    # eval --out creates its folder
    assert main(["eval", str(run_dir), "--data", str(splits["test"]), "--out", str(tmp_path / "m" / "m.json")]) == 0
    assert json.loads((tmp_path / "m" / "m.json").read_text())["n"] == 30


def test_predict_stdin_is_utf8_and_crlf_safe(trained):
    run_dir, _ = trained
    cmd = [sys.executable, "-m", "strop.cli", "predict", str(run_dir)]
    proc = subprocess.run(cmd, input="my refund please\r\nwhere is the parcel\r\n".encode(), capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["text"] for x in proc.stdout.splitlines()] == ["my refund please", "where is the parcel"]
    proc = subprocess.run(cmd, input=b"fine\ncaf\xe9 refund\n", capture_output=True, timeout=120)
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    assert b"stdin line 2 is not valid UTF-8" in proc.stderr


def test_bad_input_exits_2_without_traceback(tmp_path, tiny_model):
    bad = write_csv(tmp_path / "bad.csv", [{"sentence": "hi there", "y": "a"}, {"sentence": "", "y": "b"}])
    proc = subprocess.run([sys.executable, "-m", "strop.cli", "train", f"data.train={bad}", "data.label_column=lbl",
                           f"output_dir={tmp_path / 'runs'}", f"model.path={tiny_model}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "data.label_column='lbl' not found" in proc.stderr and "['sentence', 'y']" in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written

    proc = subprocess.run([sys.executable, "-m", "strop.cli", "train", f"data.train={bad}", "train.lrr=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.lrr" in proc.stderr and "train.lr" in proc.stderr


def test_eval_unknown_run_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--data", str(tmp_path / "x.csv")]) == 2
    assert "not found" in capsys.readouterr().err


def test_help_config_lists_every_field(capsys):
    from strop.config import all_keys

    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key in all_keys():
        assert key in out, key


@pytest.mark.parametrize("task", ["multi_label", "regression", "pairs"])
def test_other_tasks_end_to_end(task, tiny_model, tmp_path):
    rows = toy_rows(80, seed=4, pairs=task == "pairs")
    extra = {}
    if task == "multi_label":
        for i, r in enumerate(rows):
            r["label"] = [r["label"]] + (["urgent"] if i % 3 == 0 else [])
        src = write_jsonl(tmp_path / "ml.jsonl", rows)
    elif task == "regression":
        for r in rows:
            r["label"] = {"account": 0.5, "billing": 2.25, "shipping": 4.0}[r["label"]]
        src = write_jsonl(tmp_path / "reg.jsonl", rows)
    else:
        src = write_csv(tmp_path / "pairs.csv", rows)
    out = tmp_path / "runs"
    assert main(["train", *tiny_overrides(tiny_model, out, **{"data.train": src, "train.epochs": 3}, **extra)]) == 0
    run_dir = out / "run"
    meta = json.loads((run_dir / "model" / "strop.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    import strop

    predictor = strop.load(run_dir)
    if task == "multi_label":
        assert meta["task"] == "multi_label" and meta["labels"] == ["account", "billing", "shipping", "urgent"]
        assert 0.05 <= meta["threshold"] <= 0.95 and "exact_match" in results["test"]
        pred = predictor.predict(["refund card please"])[0]
        assert set(pred["probs"]) == set(meta["labels"])
    elif task == "regression":
        assert meta["task"] == "regression" and {"pearson", "spearman", "rmse", "mae"} <= set(results["test"])
        assert isinstance(predictor.predict(["refund card"])[0]["value"], float)
    else:
        assert meta["text_pair_column"] == "sentence2"
        pred = predictor.predict(["refund card"], pairs=["please help"])[0]
        assert pred["label"] in meta["labels"]
        with pytest.raises(Exception, match="pairs"):
            predictor.predict(["refund card"])


def test_api_train_and_load(tiny_model, toy_splits, tmp_path):
    import strop

    run = strop.train(None, {"data.train": str(toy_splits["train"]), "model.path": str(tiny_model),
                             "output_dir": str(tmp_path / "runs"), "train.epochs": 1, "train.precision": "fp32",
                             "train.batch_size": 8})
    assert run.model_dir.is_dir() and run.results["steps"] == 9  # 72 train examples after carving / 8
    preds = strop.load(run.run_dir).predict(["hello refund", "parcel courier"])
    assert len(preds) == 2 and all(p["label"] in ("account", "billing", "shipping") for p in preds)


def test_bench_verb_reports_peaks_and_throughput(capsys):
    assert main(["bench", "--steps", "7"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["peak_gflops"]["fp32"] > 1 and result["peak_gflops"]["bf16"] > 1
    probe = result["training_probe"]
    assert probe["steps_timed"] == 2 and probe["samples_per_s"] > 0 and probe["tokens_per_s"] > probe["samples_per_s"]


def test_python_dash_m_strop_is_the_cli():
    """`python -m strop` (what `torchrun ... -m strop train` runs) is the same CLI as the `strop` command."""
    proc = subprocess.run([sys.executable, "-m", "strop", "train", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--resume" in proc.stdout
