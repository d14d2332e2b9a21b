"""Edge cases of the report, explanations and trackers: label names matplotlib or MLflow would read as syntax, the
multi-label calibration at a tuned threshold, explaining mean-pooling (few-shot) runs, and explaining an ONNX export."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import tiny_overrides, toy_rows, write_csv, write_jsonl

import strop
from strop.cli import main
from strop.errors import StropError
from strop.evaluate import report_parts as report
from strop.evaluate.report import build_report

# labels that are syntax elsewhere: `$...$` is mathtext to matplotlib; MLflow allows only [/\w.\- ] in metric names
ODD_LABELS = ["$x^$", "US$ & CA$", "C++", "what?", "a&b", "a?b", "neg (1)", "<script>"]
# ODD_LABELS as MLflow metric-name parts: each rejected character -> '_'; `a?b` collides with `a&b` (both `a_b`) and
# comes second in the sorted label list ('&' < '?'), so it is numbered
LOGGED = {"$x^$": "_x__", "US$ & CA$": "US_ _ CA_", "C++": "C__", "what?": "what_", "a&b": "a_b", "a?b": "a_b_2",
          "neg (1)": "neg _1_", "<script>": "_script_"}


def _drawn_text(monkeypatch) -> list[tuple[str, bool]]:
    """Collect (text as drawn, drawn as mathtext?) for every Text of every figure the report renders."""
    from matplotlib.text import Text

    drawn, real_png = [], report.png_html

    def png(fig):
        fig.canvas.draw()  # lays out the tick labels, so the categorical ones exist as Text
        # _preprocess_math is what matplotlib's renderer calls to decide between mathtext and plain text
        drawn.extend(t._preprocess_math(t.get_text()) for t in fig.findobj(Text) if t.get_text())
        return real_png(fig)

    monkeypatch.setattr(report, "png_html", png)
    return drawn


def test_plots_draw_user_strings_literally(monkeypatch):
    drawn = _drawn_text(monkeypatch)
    labels = ["$x^$", "US$ & CA$", "$$", r"a\$b", "plain"]
    n = len(labels)
    counts = {"examples": 15, "mean_tokens": 9.0, "max_tokens": 12, "truncated": 0,
              "label_counts": dict(zip(labels, range(1, n + 1)))}
    report.data_section({"splits": {"train": counts, "test": counts}}, None)
    report.confusion_section({"test": {"confusion_matrix": np.eye(n, dtype=int).tolist()}}, labels, "test")
    per_type = {t: {"f1": 0.5} for t in labels}  # NER entity types come from the data too
    tokens = SimpleNamespace(tokens=[], tags=[])
    report.entities_section(SimpleNamespace(tag=lambda sentences: [], labels=[]), tokens,
                            {"test": {"per_type": per_type}}, "test")
    report.calibration_section({"ece": 0.1, "bins": [{"confidence": 0.5, "accuracy": 0.4}]}, "te$t")
    for label in labels:
        assert (label, False) in drawn, label  # the label's own characters, not mathtext
    assert not [text for text, math in drawn if math]
    assert ("reliability (te$t); ECE = 0.100", False) in drawn


@pytest.fixture(scope="module")
def odd_labels_run(tiny_model, tmp_path_factory):
    """A run whose labels are ODD_LABELS, tracked in MLflow's real SQLite store, with its report."""
    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("odd")
    rows = toy_rows(64, seed=5)
    for i, r in enumerate(rows):
        r["label"] = ODD_LABELS[i % len(ODD_LABELS)]
    src = write_csv(tmp / "d.csv", rows)
    args = tiny_overrides(tiny_model, tmp / "runs", **{"data.train": src, "train.epochs": 1, "train.threads": 1,
                                                       "eval.report_explain": 0, "track": "mlflow"})
    assert main(["train", *args]) == 0
    return tmp / "runs"


def test_odd_labels_give_a_report(odd_labels_run, monkeypatch):
    run_dir = odd_labels_run / "run"
    page = (run_dir / "report.html").read_text()
    assert '<section id="confusion">' in page and "US$ &amp; CA$" in page
    assert not list(run_dir.glob("*.tmp"))  # report.html and report.json are written whole, then renamed
    drawn = _drawn_text(monkeypatch)
    build_report(run_dir, explain_k=0)
    assert all((label, False) in drawn for label in ODD_LABELS)
    assert not [text for text, math in drawn if math]


def test_odd_labels_are_mlflow_metric_names(odd_labels_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{odd_labels_run / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("strop").experiment_id])
    assert run.info.status == "FINISHED"
    run_dir = odd_labels_run / "run"
    per_class = json.loads((run_dir / "results.json").read_text())["validation"]["per_class"]
    assert sorted(per_class) == sorted(ODD_LABELS)  # results.json keeps the labels as they are
    for label, logged in LOGGED.items():
        for key in ("precision", "recall", "f1", "support"):
            assert run.data.metrics[f"final_validation/per_class/{logged}/{key}"] == \
                pytest.approx(per_class[label][key]), (label, key)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["per_class"]["a?b"]["f1"]) for r in records if r["split"] == "validation"]
    history = client.get_metric_history(run.info.run_id, "validation/per_class/a_b_2/f1")
    assert val and sorted((m.step, m.value) for m in history) == val


def test_metric_names_mlflow_accepts(odd_labels_run):
    """Every name MetricNames returns is stored by the real SQLite store, and no two names become one."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from strop.track.mlflow_tracker import MetricNames

    labels = ODD_LABELS + ["a_b", "..", ".", "", "a//b", "/x", "..x", "b/", "é:ü", "x" * 300, "x" * 300 + "y"]
    names = MetricNames()
    given = [f"validation/per_class/{label}/{key}" for label in labels for key in ("precision", "recall")]
    logged = [names(g) for g in given]
    assert [names(g) for g in given] == logged  # the same name every time
    assert len(set(logged)) == len(given)
    assert names("train/loss") == "train/loss" and names("validation/per_class/a?b/f1").startswith(
        "validation/per_class/a_b_2/")
    client = MlflowClient(tracking_uri=f"sqlite:///{odd_labels_run / 'mlflow.db'}")
    run_id = client.create_run(client.get_experiment_by_name("strop").experiment_id).info.run_id
    client.log_batch(run_id, metrics=[Metric(name, float(i), 0, 0) for i, name in enumerate(logged)])
    stored = client.get_run(run_id).data.metrics
    assert {name: stored[name] for name in logged} == {name: float(i) for i, name in enumerate(logged)}


def test_multi_label_calibration_uses_the_tuned_threshold():
    probs = np.array([[0.92, 0.35], [0.15, 0.64], [0.33, 0.05]])
    labels = np.array([[1, 0], [0, 1], [0, 0]])
    cal = report.multi_label_calibration(probs, labels, threshold=0.3)
    # by hand: decisions p >= 0.3 -> [[yes, yes], [no, yes], [yes, no]]; confidence of each decision (p for yes,
    # 1 - p for no) [[.92, .35], [.85, .64], [.33, .95]]; correct [[1, 0], [1, 1], [0, 1]]. Bins of width 0.1:
    # [.3,.4): .35 .33 -> acc 0, conf .34; [.6,.7): .64 -> 1, .64; [.8,.9): .85 -> 1, .85; [.9,1]: .92 .95 -> 1, .935
    expected = [([0.3, 0.4], 2, 0.0, 0.34), ([0.6, 0.7], 1, 1.0, 0.64), ([0.8, 0.9], 1, 1.0, 0.85),
                ([0.9, 1.0], 2, 1.0, 0.935)]
    assert [(b["bin"], b["n"], b["accuracy"], b["confidence"]) for b in cal["bins"]] == \
        [(pytest.approx(e), n, a, pytest.approx(c)) for e, n, a, c in expected]
    # ECE = (2 x .34 + 1 x .36 + 1 x .15 + 2 x .065) / 6 = 1.32 / 6
    assert cal["ece"] == pytest.approx(0.22)


def test_report_calibrates_the_decisions_at_the_model_threshold(tiny_model, tmp_path):
    from strop.config import load_config
    from strop.tasks import prepare

    rows = toy_rows(60, seed=4)
    for i, r in enumerate(rows):
        r["label"] = [r["label"]] + (["urgent"] if i % 3 == 0 else [])
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{
        "data.train": src, "train.epochs": 1, "eval.report_explain": 0}))
    ex = prepare(load_config(run.run_dir / "config.yaml")).splits["test"]  # the split the report calibrates on
    probs = strop.load(run.run_dir).outputs_of(ex, 64).astype(np.float64)
    # a threshold with probabilities on both sides of it below 0.5, where |p - 0.5| + 0.5 is the wrong confidence
    threshold = float(np.round(np.quantile(probs[probs < 0.5], 0.5), 3))
    assert ((probs >= threshold) & (probs < 0.5)).any() and threshold != 0.5
    meta_path = run.run_dir / "model" / "strop.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "threshold": threshold}))
    build_report(run.run_dir, explain_k=0)
    cal = json.loads((run.run_dir / "report.json").read_text())["calibration"]

    decided = probs >= threshold
    conf = np.where(decided, probs, 1 - probs).ravel()
    correct = (decided == (ex.labels > 0.5)).ravel()
    ece, n = 0.0, 0
    for b in range(10):
        m = (conf >= b / 10) & ((conf < (b + 1) / 10) if b < 9 else (conf <= 1))
        if m.any():
            ece += abs(correct[m].mean() - conf[m].mean()) * m.sum() / conf.size
            n += int(m.sum())
    assert n == conf.size and sum(b["n"] for b in cal["bins"]) == conf.size
    assert cal["ece"] == pytest.approx(ece, abs=1e-6)


@pytest.fixture(scope="module")
def fewshot_run(tiny_model, tmp_path_factory):
    """A train.mode=fewshot run: a MeanPoolClassifier (pooling=mean, normalised embeddings)."""
    tmp = tmp_path_factory.mktemp("fewshot")
    files = {"data.train": str(write_csv(tmp / "train.csv", toy_rows(24, 1))),
             "data.test": str(write_csv(tmp / "test.csv", toy_rows(30, 3))), "data.validation_ratio": 0}
    args = tiny_overrides(tiny_model, tmp / "runs", **files, **{
        "train.mode": "fewshot", "fewshot.epochs": 2, "fewshot.batch_size": 8, "fewshot.lr": 1e-3,
        "eval.report": False, "track": "none", "train.threads": 1})
    assert main(["train", *args]) == 0
    return SimpleNamespace(run_dir=tmp / "runs" / "run", test=files["data.test"])


def test_explain_a_fewshot_run_with_rollout(fewshot_run, tmp_path):
    pytest.importorskip("captum")
    out = tmp_path / "why.json"
    assert main(["explain", str(fewshot_run.run_dir), "--text", "refund my card please", "--out", str(out)]) == 0
    (data,) = json.loads(out.read_text())
    assert data["completeness"]["within_tolerance"]
    rollout = [t["rollout"] for t in data["tokens"]]
    assert len(rollout) == len(data["tokens"]) and all(r > 0 for r in rollout)
    assert sum(rollout) == pytest.approx(1.0, abs=1e-4)
    assert [w["word"] for w in data["words"]] == ["refund", "my", "card", "please"]


def test_explain_an_onnx_export_asks_for_the_run(fewshot_run, capsys):
    pytest.importorskip("captum")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from strop.explain.attribution import explain, explain_entities

    run_dir = fewshot_run.run_dir
    assert main(["export", str(run_dir), "--no-int8", "--no-timing", "--threads", "1",
                 "--data", fewshot_run.test]) == 0
    capsys.readouterr()
    assert main(["explain", str(run_dir / "export"), "--text", "refund my card"]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "need the run's PyTorch model" in message and f"strop explain {run_dir}" in message
    predictor = strop.load(run_dir / "export")

    def no_work(*args, **kwargs):
        raise AssertionError("the export was run before the error")

    predictor.predict = no_work
    for function in (explain, explain_entities):
        with pytest.raises(StropError, match="ONNX export"):
            function(predictor, "refund my card")


def test_a_report_that_fails_does_not_fail_the_run(tiny_model, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("a plot failed")

    monkeypatch.setattr("strop.evaluate.report.build_report", broken)
    src = write_csv(tmp_path / "d.csv", toy_rows(60, 4))
    args = tiny_overrides(tiny_model, tmp_path / "runs", **{"data.train": src, "train.epochs": 1,
                                                            "track": "tensorboard"})
    assert main(["train", *args]) == 0
    run_dir = tmp_path / "runs" / "run"
    assert (run_dir / "results.json").is_file() and (run_dir / "model" / "strop.json").is_file()
    assert not (run_dir / "report.html").exists()
    printed = capsys.readouterr()
    assert "report.html not written (ValueError: a plot failed)" in " ".join((printed.out + printed.err).split())
