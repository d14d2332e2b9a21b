"""train.mode=fewshot: run folder, saved-model parity, pair weighting, seeding, head parity, errors, auto switch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_overrides, toy_rows, write_csv

import strop
from strop.cli import main
from strop.config import load_config
from strop.errors import ConfigError, DataError
from strop.run import train

# a random 32-wide BERT needs a high lr before the contrastive loss moves (as tiny_overrides' train.lr)
FEWSHOT = {"train.mode": "fewshot", "fewshot.epochs": 4, "fewshot.batch_size": 8, "fewshot.lr": 1e-3,
           "eval.report": False, "track": "none"}


def _files(tmp_path, n_train=24, n_test=30):
    """8 training examples per class (3 classes) and a test file."""
    return {"data.train": str(write_csv(tmp_path / "train.csv", toy_rows(n_train, 1))),
            "data.test": str(write_csv(tmp_path / "test.csv", toy_rows(n_test, 3))), "data.validation_ratio": 0}


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fewshot_writes_a_normal_run_folder_and_predict_matches(tiny_model, tmp_path):
    args = tiny_overrides(tiny_model, tmp_path / "runs", **_files(tmp_path), **{**FEWSHOT, "eval.report": True,
                                                                               "track": "tensorboard"})
    assert main(["train", *args]) == 0
    run_dir = tmp_path / "runs" / "run"
    for name in ("config.yaml", "metrics.jsonl", "results.json", "data.json", "report.html", "model/strop.json",
                 "model/model.safetensors", "model/head.safetensors", "model/config.json", "model/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["train"]["mode"] == "fewshot" and cfg["model"]["pooling"] == "mean"
    meta = json.loads((run_dir / "model" / "strop.json").read_text())
    assert meta["pooling"] == "mean" and meta["normalize"] is True and meta["train_mode"] == "fewshot"
    assert meta["labels"] == ["account", "billing", "shipping"]

    records = _records(run_dir)
    # 24 examples / batch 8 = 3 contrastive steps per epoch, 4 epochs, logged every 4 steps (tiny_overrides)
    assert [r["step"] for r in records if r["split"] == "train"] == [4, 8, 12]
    head = [r for r in records if r["split"] == "fewshot_head"]
    assert len(head) == 1 and head[0]["head"] == "logistic" and 0 <= head[0]["train_accuracy"] <= 1
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train_mode"] == "fewshot" and results["steps"] == 12 and results["test"]["n"] == 30
    assert results["train_seconds"] > 0 and results["train_cpu_seconds"] > 0

    # the saved run predicts exactly what training evaluated in memory (fp32): same accuracy, same confusion matrix

    test = [r for r in toy_rows(30, 3)]
    preds = strop.load(run_dir).predict([r["text"] for r in test])
    labels = meta["labels"]
    confusion = np.zeros((3, 3), dtype=int)
    for r, p in zip(test, preds):
        confusion[labels.index(r["label"]), labels.index(p["label"])] += 1
    assert confusion.tolist() == results["test"]["confusion_matrix"]
    assert np.trace(confusion) / 30 == pytest.approx(results["test"]["accuracy"])


def test_fewshot_run_exports_to_onnx_with_parity(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    files = _files(tmp_path)
    assert main(["train", *tiny_overrides(tiny_model, tmp_path / "runs", **files, **FEWSHOT)]) == 0
    run_dir = tmp_path / "runs" / "run"
    assert main(["export", str(run_dir), "--no-int8", "--no-timing", "--threads", "1",
                 "--data", files["data.test"]]) == 0
    parity = json.loads((run_dir / "export" / "parity.json").read_text())
    # the normalisation in front of the head is traced into the graph: same logits, same predictions
    assert parity["onnx"]["passed"] and parity["onnx"]["max_abs_logit_diff"] <= 1e-5
    assert parity["onnx"]["prediction_agreement"] == 1.0
    assert json.loads((run_dir / "export" / "strop.json").read_text())["normalize"] is True


def _fewshot_model(tiny_model, tmp_path, seed=7, **extra):
    tmp_path.mkdir(exist_ok=True)
    """(model after train_fewshot, train Encoded, cfg) without the run machinery around it."""
    from strop.data.batching import encode
    from strop.models.backbone import load_tokenizer
    from strop.tasks import build_model, get_task, prepare
    from strop.track import NoTracker
    from strop.training.fewshot import train_fewshot

    over = {**_files(tmp_path), **FEWSHOT, "model.path": str(tiny_model), "model.pooling": "mean",
            "train.precision": "fp32", "train.threads": 2, "train.seed": seed, **extra}
    cfg = load_config(None, over)
    ds = prepare(cfg)
    tok = load_tokenizer(tiny_model)
    enc = encode(tok, ds.splits["train"], cfg.model.max_length)
    torch.manual_seed(seed)
    model = build_model(get_task(ds.task), cfg, ds.labels)
    model.normalize = True
    train_fewshot(model, enc, cfg, get_task(ds.task), ds.labels, torch.device("cpu"), "fp32", NoTracker(), tmp_path)
    return model.eval(), enc, tok, ds


def test_saved_model_gives_the_in_memory_logits_and_the_head_is_the_fitted_regression(tiny_model, tmp_path):
    from strop.data.batching import collate_inputs
    from strop.models.classifier import save_model
    from strop.tasks import load_trained
    from strop.training.fewshot import embed_all, fit_logistic

    model, enc, tok, ds = _fewshot_model(tiny_model, tmp_path)
    batch = collate_inputs(enc, np.arange(len(enc)))
    with torch.no_grad():
        logits = model(**batch).logits
    # the linear head on the normalised embeddings is the logistic regression fitted on them
    x = embed_all(model, enc, 16, torch.device("cpu"), "fp32")
    w, b = fit_logistic(x, torch.as_tensor(enc.labels), len(ds.labels), 1.0)
    torch.testing.assert_close(logits, x @ w.T + b, atol=1e-5, rtol=1e-5)

    save_model(model, tok, tmp_path / "model", {"task": "single_label", "labels": ds.labels, "pooling": "mean",
                                                "normalize": True})
    loaded, _, _, _ = load_trained(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, logits)


def test_same_seed_same_training_other_seed_other_batches(tiny_model, tmp_path):
    a, *_ = _fewshot_model(tiny_model, tmp_path / "a", seed=7)
    b, *_ = _fewshot_model(tiny_model, tmp_path / "b", seed=7)
    c, *_ = _fewshot_model(tiny_model, tmp_path / "c", seed=8)
    torch.testing.assert_close(a.classifier.weight, b.classifier.weight, atol=0, rtol=0)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_pair_targets_weigh_positives_and_negatives_equally():
    from strop.training.fewshot import pair_targets

    labels = torch.tensor([0, 0, 0, 1, 1, 2])  # 4 positive pairs (3 + 1), 11 negative pairs, each counted once
    target, weight = pair_targets(labels)
    assert torch.equal(weight.tril(), torch.zeros(6, 6))  # i < j only: no self-pairs, no pair twice
    pos, neg = weight[target.bool()].sum(), weight[~target.bool()].sum()
    assert float(pos) == pytest.approx(0.5) and float(neg) == pytest.approx(0.5)
    assert int((weight[target.bool()] > 0).sum()) == 4 and int((weight[~target.bool()] > 0).sum()) == 11
    _, only_neg = pair_targets(torch.tensor([0, 1, 2]))
    assert float(only_neg.sum()) == pytest.approx(1.0)


def test_supcon_loss_is_lower_when_classes_cluster():
    from strop.training.fewshot import cosine_pair_loss, supcon_loss

    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0], [1.0, 0.01], [0, 1.0], [0.01, 1.0]])
    mixed = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0.01], [0.01, 1.0]])
    clustered, mixed = (torch.nn.functional.normalize(t, dim=-1) for t in (clustered, mixed))
    assert supcon_loss(clustered, labels, 0.1) < supcon_loss(mixed, labels, 0.1)
    assert cosine_pair_loss(clustered, labels) < 1e-3 < cosine_pair_loss(mixed, labels)


def test_logistic_head_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    from strop.training.fewshot import fit_logistic

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    y = np.repeat([0, 1, 2], 10)
    x[np.arange(30), y] += 1.5  # separable-ish, so the L2 term matters
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ref = sklearn.LogisticRegression(C=1.0, max_iter=1000, tol=1e-10).fit(x, y)
    w, b = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), 3, 1.0)
    ours = torch.softmax(torch.from_numpy(x) @ w.T + b, -1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x), atol=1e-4)


def test_auto_mode_switches_to_fewshot_for_a_tiny_training_set(tiny_model, tmp_path, capsys):
    over = {**_files(tmp_path), **FEWSHOT, "train.mode": "auto"}
    res = train(None, tiny_overrides(tiny_model, tmp_path / "runs", **over))
    assert res.results["train_mode"] == "fewshot"
    assert "train.mode=auto: at most 8 training examples per class" in capsys.readouterr().err
    res = train(None, tiny_overrides(tiny_model, tmp_path / "runs", **over, **{"fewshot.auto_max_per_class": 7,
                                                                               "name": "standard"}))
    assert res.results["train_mode"] == "standard"


@pytest.mark.parametrize("extra, error, words", [
    ({"train.resume": "auto"}, ConfigError, "train.resume='auto' is not supported"),
    ({"fewshot.lr": 0}, ConfigError, "fewshot.lr=0"),
    ({"fewshot.loss": "triplet"}, ConfigError, "fewshot.loss='triplet' is not one of"),
])
def test_config_errors(extra, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, {"train.mode": "fewshot", **extra})


def test_unsupported_data_and_peft_are_clear_errors(tiny_model, tmp_path):
    rows = toy_rows(24, 1)
    # multi-label data inferred from the labels (no task= given): refused before the run folder exists
    multi = [{"text": r["text"], "label": f"{r['label']}|billing"} for r in rows]
    over = {**_files(tmp_path), **FEWSHOT, "data.train": write_csv(tmp_path / "multi.csv", multi),
            "data.label_delimiter": "|", "data.test": None}
    with pytest.raises(ConfigError, match="does not support task='multi_label'.*single-label classification"):
        train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{k: v for k, v in over.items() if v is not None}))
    with pytest.raises(ConfigError, match="peft.method='lora' is not supported"):
        train(None, tiny_overrides(tiny_model, tmp_path / "runs", **_files(tmp_path), **FEWSHOT,
                                   **{"peft.method": "lora"}))
    one = rows[:-3] + [{"text": "a lone refund question", "label": "refund"}]
    with pytest.raises(DataError, match=r"at least 2 training examples of every class.*'refund': 1"):
        train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{**_files(tmp_path), **FEWSHOT,
                                                                     "data.train": write_csv(tmp_path / "one.csv", one)}))
    assert not (tmp_path / "runs" / "run").exists()
