"""strop export of a token-classification (NER) run on a tiny random BERT with the casing feature: ONNX parity per
token, int8, and the export folder behind strop predict / eval giving the same entities as the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_overrides
from toy_ner import toy_sentences, write_conll, write_token_jsonl

from strop.cli import main
from strop.errors import ExportError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TEXTS = ["Yesterday John Smith flew to New York, with UNESCO.", "ken lee met maria in paris", "nothing here at all"]


@pytest.fixture(scope="module")
def ner_export(tiny_model, tmp_path_factory):
    """A trained tiny NER run (casing on: word shapes go in as token type ids, max_length 16 so sentences split
    into windows) exported with static int8 too."""
    tmp = tmp_path_factory.mktemp("ner-export")
    files = {split: write_conll(tmp / f"{split}.txt", toy_sentences(n, seed))
             for split, n, seed in (("train", 96, 1), ("dev", 24, 2), ("test", 24, 3))}
    args = tiny_overrides(tiny_model, tmp / "runs", **{
        "data.train": files["train"], "data.validation": files["dev"], "data.test": files["test"],
        "train.epochs": 3, "model.max_length": 16, "ner.stride": 4, "ner.casing": "true"})
    assert main(["train", *args]) == 0
    run = tmp / "runs" / "run"
    assert main(["export", str(run), "--static-int8", "--threads", "1"]) == 0
    return run, files, tmp


def test_ner_export_writes_onnx_with_dynamic_axes_and_token_parity(ner_export):
    import onnxruntime as ort

    run, _, _ = ner_export
    out = run / "export"
    for name in ("model.onnx", "model.int8.onnx", "model.static-int8.onnx", "strop.json", "parity.json",
                 "tokenizer.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "strop.json").read_text())
    assert meta["task"] == "token_classification" and meta["casing"] is True
    assert meta["onnx"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]  # word shapes ride here
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert all(i.shape == ["batch", "sequence"] for i in session.get_inputs())
    logits = session.get_outputs()[0]
    assert logits.name == "logits" and len(logits.shape) == 3 and logits.shape[2] == len(meta["labels"])
    assert all(isinstance(d, str) for d in logits.shape[:2])  # batch and sequence stay symbolic

    parity = json.loads((out / "parity.json").read_text())
    assert parity["task"] == "token_classification" and parity["primary_metric"] == "f1"
    # the dev split: 24 sentences, more subword windows than that (max_length 16 splits them)
    assert "validation" in parity["held_data"]["source"] and parity["held_data"]["examples"] > 24
    assert parity["onnx"]["passed"] and parity["onnx"]["max_abs_logit_diff"] <= 1e-4
    assert parity["onnx"]["prediction_agreement"] == 1.0
    v = parity["variants"]
    assert set(v) == {"torch_fp32", "onnx_fp32", "onnx_int8", "onnx_static_int8", "torch_int8"}
    results = json.loads((run / "results.json").read_text())
    assert v["torch_fp32"]["f1"] == pytest.approx(results["validation"]["f1"])
    assert v["onnx_fp32"]["f1"] == v["torch_fp32"]["f1"] and v["onnx_fp32"]["agreement"] == 1.0
    for name in ("onnx_int8", "onnx_static_int8", "torch_int8"):
        assert v[name]["max_abs_logit_diff"] > 0 and v[name]["agreement"] >= 0.8, (name, v[name])
        assert 0 <= v[name]["f1"] <= 1 and v[name]["latency_ms_p50"] > 0


def test_ner_export_predicts_the_same_entities_as_the_run(ner_export):
    import strop

    run, _, _ = ner_export
    ours, exported = strop.load(run), strop.load(run / "export")
    assert type(exported).__name__ == "TokenPredictor" and type(exported.model).__name__ == "OnnxModel"
    a, b = ours.predict(TEXTS), exported.predict(TEXTS)
    key = lambda preds: [[(e["text"], e["type"], e["start"], e["end"]) for e in p["entities"]] for p in preds]
    assert key(a) == key(b) and any(p["entities"] for p in a)
    for pa, pb in zip(a, b):
        for ea, eb in zip(pa["entities"], pb["entities"]):
            assert eb["score"] == pytest.approx(ea["score"], abs=1e-5)
    sentences = [t for t, _ in toy_sentences(6, 11)]
    sentences[0] = [w.upper() for w in sentences[0]]  # casing: other word shapes, other token type ids
    ta, tb = ours.predict_tokens(sentences), exported.predict_tokens(sentences)
    assert [p["tags"] for p in ta] == [p["tags"] for p in tb] and key(ta) == key(tb)


def test_ner_export_feeds_word_shapes(ner_export):
    """The exported graph really uses token_type_ids (the casing feature): zeroing them changes the logits."""
    import strop
    from strop.data.ner import TokenExamples

    run, _, _ = ner_export
    exported = strop.load(run / "export")
    enc = exported.encode_examples(TokenExamples([["John", "Smith", "visited", "PARIS"]], None, []))
    from strop.data.batching import collate_inputs

    batch = collate_inputs(enc, np.arange(len(enc)))
    with_shapes = exported.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
    without = exported.model(batch["input_ids"], batch["attention_mask"], 0 * batch["token_type_ids"]).logits
    assert batch["token_type_ids"].max() > 0 and not np.allclose(with_shapes.numpy(), without.numpy())


def test_predict_and_eval_cli_accept_the_ner_export(ner_export, capsys):
    run, files, tmp = ner_export
    raw = tmp / "raw.txt"
    raw.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    rows = {}
    for name, source in (("run", run), ("export", run / "export")):
        out = tmp / f"{name}.jsonl"
        assert main(["predict", str(source), "--data", str(raw), "--out", str(out)]) == 0
        rows[name] = [json.loads(line) for line in out.read_text().splitlines()]
    strip = lambda rs: [[{k: e[k] for k in ("text", "type", "start", "end")} for e in r["entities"]] for r in rs]
    assert len(rows["run"]) == 3 and strip(rows["run"]) == strip(rows["export"])
    for r in rows["export"]:
        assert all(r["text"][e["start"]:e["end"]] == e["text"] for e in r["entities"])
    pre = write_token_jsonl(tmp / "pre.jsonl", toy_sentences(4, 5))
    capsys.readouterr()
    assert main(["predict", str(run / "export" / "model.int8.onnx"), "--data", str(pre)]) == 0
    assert all(len(r["tags"]) == len(r["tokens"]) for r in map(json.loads, capsys.readouterr().out.splitlines()))

    for name, source in (("run", run), ("export", run / "export")):
        assert main(["eval", str(source), "--data", str(files["test"]), "--out", str(tmp / f"m-{name}.json")]) == 0
    m_run, m_exp = (json.loads((tmp / f"m-{n}.json").read_text()) for n in ("run", "export"))
    assert m_exp["f1"] == pytest.approx(m_run["f1"]) and m_exp["loss"] == pytest.approx(m_run["loss"], abs=1e-5)
    test = json.loads((run / "results.json").read_text())["test"]
    assert m_exp["f1"] == pytest.approx(test["f1"])


def test_ner_export_refuses_pruning_and_distillation(ner_export, capsys):
    from strop.compress.export import ExportOptions, export_run

    run, _, _ = ner_export
    with pytest.raises(ExportError, match="token_classification run: --prune and --distill"):
        export_run(run, ExportOptions(distill=1, timing=False), log=lambda m: None)
    assert main(["export", str(run), "--prune", "heads=0.5"]) != 0
    assert "--prune and --distill support classification runs only" in capsys.readouterr().err
    assert (run / "export" / "model.onnx").is_file()  # the earlier good export is untouched


def test_ner_tolerance_breach_fails_loudly(ner_export, monkeypatch):
    import copy

    import torch

    import strop.compress.export as export_module
    from strop.compress.onnx import export_graph

    run, _, _ = ner_export

    def export_off_by_a_bit(model, inputs, path):
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            shifted.classifier.bias += 0.01
        return export_graph(shifted, inputs, path)

    monkeypatch.setattr(export_module, "export_graph", export_off_by_a_bit)
    with pytest.raises(ExportError, match=r"max \|logit difference\| 0.01 > tolerance 0.001"):
        export_module.export_run(run, export_module.ExportOptions(int8=False, timing=False), log=lambda m: None)
    failed = json.loads((run / "export.failed" / "parity.json").read_text())
    assert failed["task"] == "token_classification" and failed["onnx"]["passed"] is False
