"""Token classification end to end on a tiny random BERT: train/eval/predict through the CLI, HF parity of model/."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from toy_ner import toy_sentences, write_conll, write_token_jsonl

from strop.cli import main
from strop.config import load_config
from strop.data.ner import TokenExamples
from strop.data.tokens import encode_tokens
from strop.models.backbone import load_tokenizer
from strop.models.token_classifier import build_token_model


@pytest.fixture(scope="module")
def ner_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ner")
    files = {split: write_conll(tmp / f"{split}.txt", toy_sentences(n, seed))
             for split, n, seed in (("train", 96, 1), ("dev", 24, 2), ("test", 24, 3))}
    args = tiny_overrides(tiny_model, tmp / "runs", **{
        "data.train": files["train"], "data.validation": files["dev"], "data.test": files["test"],
        "train.epochs": 5, "model.max_length": 16, "ner.stride": 4, "ner.casing": "true"})
    assert main(["train", *args]) == 0
    return tmp / "runs" / "run", files, tmp


def test_train_writes_entity_metrics(ner_run):
    run_dir, _, _ = ner_run
    results = json.loads((run_dir / "results.json").read_text())
    assert results["metric"] == "f1"
    for split in ("validation", "test"):
        r = results[split]
        assert set(r["per_type"]) == {"LOC", "ORG", "PER"}
        assert r["f1"] > 0.8, r  # entity words come from fixed lists: even the tiny model learns them
        assert 0 <= r["macro_f1"] <= 1 and r["token_accuracy"] > 0.9
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "validation"]
    assert results["best_metric"] == max(r["f1"] for r in val) == results["validation"]["f1"]
    data = json.loads((run_dir / "data.json").read_text())
    # max_length 16 splits the longer toy sentences into windows
    assert data["splits"]["train"]["split_into_windows"] > 0
    assert data["splits"]["train"]["windows"] > data["splits"]["train"]["sentences"] == 96
    meta = json.loads((run_dir / "model" / "strop.json").read_text())
    assert meta["task"] == "token_classification" and meta["scheme"] == "iob2" and meta["casing"] is True
    assert meta["labels"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def test_eval_matches_training_numbers(ner_run, capsys):
    run_dir, files, tmp = ner_run
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data", str(files["test"]), "--out", str(tmp / "m.json")]) == 0
    metrics = json.loads((tmp / "m.json").read_text())
    test = json.loads((run_dir / "results.json").read_text())["test"]
    assert metrics["f1"] == pytest.approx(test["f1"]) and metrics["loss"] == pytest.approx(test["loss"], rel=1e-5)
    assert {t: v["f1"] for t, v in metrics["per_type"].items()} == \
        pytest.approx({t: v["f1"] for t, v in test["per_type"].items()})


def test_predict_raw_and_pretokenised_text(ner_run, capsys):
    run_dir, files, tmp = ner_run
    raw = tmp / "raw.txt"
    # words from the training lists (a tiny model only knows those), a double space and punctuation; the toy data has
    # no punctuation, so what the tiny model tags next to it is arbitrary: none inside the entities asserted on
    raw.write_text("today  john smith visited new york with unesco.\nnothing here\n", encoding="utf-8")
    assert main(["predict", str(run_dir), "--data", str(raw), "--out", str(tmp / "raw.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp / "raw.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    found = {(e["text"], e["type"]) for e in rows[0]["entities"]}
    assert ("john smith", "PER") in found and ("new york", "LOC") in found
    for row in rows:
        for e in row["entities"]:
            assert row["text"][e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
    # pre-tokenised JSONL and CoNLL input: tags back, offsets into the space-joined tokens
    sents = toy_sentences(5, 9)
    jsonl = write_token_jsonl(tmp / "pre.jsonl", sents)
    capsys.readouterr()
    assert main(["predict", str(run_dir), "--data", str(jsonl)]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["tokens"] for o in out] == [t for t, _ in sents]
    assert all(len(o["tags"]) == len(o["tokens"]) for o in out)
    hits = sum(o["tags"] == g for o, (_, g) in zip(out, sents))
    assert hits >= 3
    for o in out:
        assert all(o["text"][e["start"]:e["end"]] == e["text"] for e in o["entities"])
    assert main(["predict", str(run_dir), "--data", str(files["test"]), "--out", str(tmp / "c.jsonl")]) == 0
    assert len((tmp / "c.jsonl").read_text().splitlines()) == 24
    # stdin: one raw text per line
    import io
    import sys

    old = sys.stdin
    sys.stdin = io.StringIO("ken lee met maria in paris\n")
    try:
        capsys.readouterr()
        assert main(["predict", str(run_dir)]) == 0
    finally:
        sys.stdin = old
    line = json.loads(capsys.readouterr().out)
    assert {e["text"] for e in line["entities"]} >= {"ken lee", "paris"}


def test_saved_model_loads_with_plain_transformers(ner_run):
    from transformers import AutoModelForTokenClassification

    run_dir, _, _ = ner_run
    model_dir = run_dir / "model"
    ours = __import__("strop.tasks", fromlist=["load_trained"]).load_trained(model_dir)[0]
    plain = AutoModelForTokenClassification.from_pretrained(str(model_dir)).eval()
    assert plain.config.type_vocab_size == 5  # the casing feature widened the token-type embedding
    tok = load_tokenizer(model_dir)
    ex = TokenExamples([["John", "Smith", "visited", "NEW", "York"], ["UNESCO", "met", "McDonald"]], None, [])
    enc = encode_tokens(tok, ex, 16, 4, casing=True)
    width = max(enc.lengths)
    ids = torch.tensor([x + [0] * (width - len(x)) for x in enc.input_ids])
    types = torch.tensor([x + [0] * (width - len(x)) for x in enc.token_type_ids])
    mask = (torch.arange(width)[None] < torch.tensor(enc.lengths)[:, None]).long()
    assert types.max() > 0
    with torch.inference_mode():
        a = ours(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        b = plain(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(a, b)


def test_casing_rows_start_equal_to_type_zero(tiny_model):
    cfg = load_config(None, {"model.path": str(tiny_model)})
    torch.manual_seed(0)
    plain = build_token_model(cfg.model, ["O", "B-X", "I-X"], casing=False).eval()
    torch.manual_seed(0)
    cased = build_token_model(cfg.model, ["O", "B-X", "I-X"], casing=True).eval()
    ids = torch.tensor([[101, 2000, 2001, 102]])
    with torch.inference_mode():
        a = plain(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
        b = cased(input_ids=ids, token_type_ids=torch.tensor([[0, 3, 2, 0]])).logits
    torch.testing.assert_close(a, b)  # before training the shape ids change nothing
    assert np.isclose(float(cased.base_model.embeddings.token_type_embeddings.weight.detach().std(0).max()), 0.0)


def test_cli_reports_bad_ner_input_without_traceback(tiny_model, tmp_path, capsys):
    bad = tmp_path / "train.conll"
    bad.write_text("EU B-ORG\nrejects O\n\nthe O\nPeter I-PER\n", encoding="utf-8")
    args = tiny_overrides(tiny_model, tmp_path / "runs", **{"data.train": bad, "ner.invalid": "refuse"})
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "train.conll:5: invalid IOB2 sequence: I-PER follows O" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # bad input leaves nothing behind


def test_resume_gives_the_same_ner_run(tiny_model, tmp_path, monkeypatch):
    """12 steps straight == crash after step 5's checkpoint + resume (token labels, windows, casing ids)."""
    import strop
    from strop.training import checkpoint as ckpt_mod
    from strop.training import loop as loop_mod

    files = {s: write_conll(tmp_path / f"{s}.txt", toy_sentences(n, seed)) for s, n, seed in
             (("train", 40, 1), ("dev", 10, 2))}
    extra = {"data.train": files["train"], "data.validation": files["dev"], "data.test_ratio": 0,
             "train.max_steps": 12, "train.log_every": 1, "train.save_every": 1, "model.max_length": 16,
             "ner.stride": 4, "ner.casing": "true"}
    straight = strop.train(None, tiny_overrides(tiny_model, tmp_path / "a", **extra))
    real_save = ckpt_mod.save_checkpoint

    def crash_after(run_dir, model, optimizer, scheduler, state):
        path = real_save(run_dir, model, optimizer, scheduler, state)
        if state.step == 5:
            raise KeyboardInterrupt  # stands in for a killed process after its checkpoint
        return path

    monkeypatch.setattr(loop_mod, "save_checkpoint", crash_after)
    with pytest.raises(KeyboardInterrupt):
        strop.train(None, tiny_overrides(tiny_model, tmp_path / "b", **extra))
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    resumed = strop.train(resume=tmp_path / "b" / "run")

    def losses(run_dir):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if r["split"] == "train"]

    assert resumed.results["resumed_from_step"] == 5
    assert losses(resumed.run_dir) == losses(straight.run_dir) and len(losses(straight.run_dir)) == 12
    assert resumed.results["validation"] == straight.results["validation"]


def test_in_memory_model_equals_plain_transformers_after_save(tiny_model, tmp_path):
    """The model strop trains (casing rows changed as training would) == AutoModelForTokenClassification of model/."""
    from transformers import AutoModelForTokenClassification

    from strop.models.classifier import save_model

    cfg = load_config(None, {"model.path": str(tiny_model)})
    torch.manual_seed(0)
    model = build_token_model(cfg.model, ["O", "B-X", "I-X"], casing=True).eval()
    with torch.no_grad():
        model.base_model.embeddings.token_type_embeddings.weight.add_(torch.randn(5, 32))
        model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
    tok = load_tokenizer(tiny_model)
    save_model(model, tok, tmp_path / "model", {"task": "token_classification"})
    plain = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "model")).eval()
    enc = encode_tokens(tok, TokenExamples([["Paris", "IS", "big", "McDonald", "1996"]], None, []), 16, 4,
                        casing=True)
    ids, types = torch.tensor(enc.input_ids), torch.tensor(enc.token_type_ids)
    with torch.inference_mode():
        a = model(input_ids=ids, token_type_ids=types).logits
        b = plain(input_ids=ids, token_type_ids=types).logits
        c = plain(input_ids=ids).logits  # without the shape ids plain transformers differs: documented
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_stride_too_large_for_max_length_stops_before_the_run_folder(tiny_model, tmp_path, capsys):
    train = write_conll(tmp_path / "train.conll", toy_sentences(20, 0))
    args = tiny_overrides(tiny_model, tmp_path / "runs", **{"data.train": train, "model.max_length": 16,
                                                             "ner.stride": 14})
    assert main(["train", *args]) == 2
    assert "model.max_length=16 leaves 14 subwords per window, not more than ner.stride=14" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method", ["lora", "adapter", "freeze"])
def test_peft_methods_for_token_classification(tiny_model, tmp_path, method):
    """PEFT on NER: the word-shape embedding trains with the head; the reloaded run scores what training scored;
    a LoRA adapter folder loads onto the base (casing rows included) with the same predictions."""
    import strop

    files = {split: write_conll(tmp_path / f"{split}.txt", toy_sentences(n, seed))
             for split, n, seed in (("train", 96, 1), ("dev", 24, 2), ("test", 24, 3))}
    args = tiny_overrides(tiny_model, tmp_path / "runs", **{
        "data.train": files["train"], "data.validation": files["dev"], "data.test": files["test"],
        "train.epochs": 3, "model.max_length": 16, "ner.stride": 4, "ner.casing": "true", "peft.method": method,
        "peft.unfrozen_layers": 1, "eval.report_explain": 0})
    assert main(["train", *args]) == 0
    run_dir = tmp_path / "runs" / "run"
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 < results["trainable_params"] < results["total_params"]
    again = strop.load(run_dir).evaluate_file(files["test"])
    assert again["f1"] == pytest.approx(results["test"]["f1"]) and again["loss"] == pytest.approx(
        results["test"]["loss"], rel=1e-4)
    report = (run_dir / "report.html").read_text()
    assert '<section id="entities">' in report
    if method == "lora":
        texts = ["john smith visited Paris", "Unesco met maria"]
        a = strop.load(run_dir / "adapter").predict(texts)
        b = strop.load(run_dir).predict(texts)
        assert a == b


def test_explain_entities(ner_run, tmp_path):
    """NER explanations: one per predicted entity, complete (attributions add up to the logit difference), one
    attribution per word of the text; the CLI writes them."""
    import strop
    from strop.explain.attribution import explain_entities

    run_dir, _, _ = ner_run
    predictor = strop.load(run_dir)
    text = "yesterday john smith met maria in paris"
    found = explain_entities(predictor, text)
    entities = predictor.predict([text])[0]["entities"]
    assert len(found) == len(entities) >= 2
    for ex, ent in zip(found, entities):
        assert ex.target == f"B-{ent['type']} '{ent['text']}'"
        assert ex.completeness["within_tolerance"], ex.completeness
        assert [w["word"] for w in ex.words()] == text.split()
    out = tmp_path / "why.json"
    assert main(["explain", str(run_dir), "--text", text, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data) == len(entities) and all(d["completeness"]["within_tolerance"] for d in data)


@pytest.mark.parametrize("content, message", [
    (b'{"tokens": ["john", "smith"]}\n{"tokens": [\n', r"bad\.jsonl:2:\d+: invalid JSON"),
    (b'{"text": "caf\xe9 in paris"}\n', r"bad\.jsonl.*not valid utf-8"),
    (b'{"label": 3}\n', r"bad\.jsonl:1: expected an object with 'tokens'"),
])
def test_predict_bad_jsonl_is_a_clear_error(ner_run, tmp_path, capsys, content, message):
    run_dir, _, _ = ner_run
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    assert main(["predict", str(run_dir), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err, re.I) and "Traceback" not in err, err
