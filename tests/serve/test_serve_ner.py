"""Serving a token-classification (NER) run over HTTP: entities equal strop.predict's (torch and the ONNX export),
raw and pre-split inputs, the limits and malformed requests, metrics."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import strop

from .serve_helpers import ServerProcess, ThreadServer

TEXTS = ["Yesterday John Smith flew to New York, with UNESCO.", "ken lee met maria in paris"]
TOKENS = [["the", "report", "on", "acme", "corp", "from", "Berlin"], ["ANNA", "BERG", "visited", "lake", "como"]]
FIELDS = ("text", "type", "start", "end")


def _key(preds: list[dict]) -> list:
    return [[tuple(e[k] for k in FIELDS) for e in p["entities"]] for p in preds]


def _check_same(got: list[dict], want: list[dict]) -> None:
    assert _key(got) == _key(want)
    for g, w in zip(got, want):
        assert [e["score"] for e in g["entities"]] == pytest.approx([e["score"] for e in w["entities"]], abs=1e-5)


@pytest.fixture(scope="module")
def ner_server(ner_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = ServerProcess(ner_run, "serve.max_inputs=8", "serve.max_body_bytes=20000", "serve.max_batch_tokens=40",
                        log_path=log)
    srv.wait_ready()
    yield srv
    srv.stop()


def test_entities_match_strop_predict(ner_server, ner_run):
    predictor = strop.load(ner_run)
    want_raw, want_tok = predictor.predict(TEXTS), predictor.predict_tokens(TOKENS)
    assert any(p["entities"] for p in want_raw + want_tok)  # the tiny model finds something to compare
    inputs = [TEXTS[0], {"tokens": TOKENS[0]}, {"text": TEXTS[1]}, {"tokens": TOKENS[1]}]
    r = httpx.post(f"{ner_server.url}/v1/predict", json={"inputs": inputs})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "token_classification" and body["model"].startswith("ner@")
    got = body["predictions"]
    _check_same([got[0], got[2]], want_raw)
    _check_same([got[1], got[3]], want_tok)
    assert [got[1]["tags"], got[3]["tags"]] == [p["tags"] for p in want_tok]
    assert "tags" not in got[0] and "label" not in got[0]
    for p, source in zip(got, [TEXTS[0], " ".join(TOKENS[0]), TEXTS[1], " ".join(TOKENS[1])]):
        for e in p["entities"]:
            assert set(e) == {"text", "type", "start", "end", "score"} and source[e["start"]:e["end"]] == e["text"]
    info = httpx.get(f"{ner_server.url}/v1/model").json()
    assert info["task"] == "token_classification" and info["labels"] == predictor.labels


def _err(r) -> str:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["status"] == r.status_code and body["error"]["message"]
    return body["error"]["code"]


def test_ner_status_codes_and_truncation(ner_server):
    url = f"{ner_server.url}/v1/predict"
    long_text = "john smith visited paris today " * 20  # 100 words > serve.max_batch_tokens=40
    cases = [
        (dict(json={"inputs": []}), 400, "empty_input"),
        (dict(json={"inputs": ["ok", "  "]}), 400, "empty_input"),
        (dict(json={"inputs": [{"tokens": []}]}), 400, "empty_input"),
        (dict(json={"inputs": [{"tokens": ["paris", " "]}]}), 400, "empty_input"),
        (dict(json={"inputs": [{"tokens": ["a", 3]}]}), 422, "schema_violation"),
        (dict(json={"inputs": [{"tokens": "paris"}]}), 422, "schema_violation"),
        (dict(json={"inputs": [{"tokens": ["a"], "text": "a"}]}), 422, "schema_violation"),
        (dict(json={"inputs": [{"text": "a", "text_pair": "b"}]}), 422, "unexpected_text_pair"),
        (dict(json={"inputs": [long_text]}), 422, "input_too_long"),
        (dict(json={"inputs": [{"tokens": long_text.split()}]}), 422, "input_too_long"),
        (dict(json={"inputs": ["a"] * 9}), 413, "too_many_inputs"),
        (dict(json={"inputs": [{"tokens": ["a"] * 12000}]}), 413, "body_too_large"),
        (dict(content=b'{"inputs": [{"tokens": ["a"', headers={"content-type": "application/json"}), 400,
         "malformed_json"),
        (dict(content=b'{"inputs": ["a"]}', headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    ]
    for kwargs, status, code in cases:
        r = httpx.post(url, **kwargs)
        assert r.status_code == status, (kwargs, r.status_code, r.text)
        assert _err(r) == code, (kwargs, r.text)
    # a long sentence (more words than max_length=16, fewer tokens than the 40 budget) is read in windows: no cut
    r = httpx.post(url, json={"inputs": ["john smith met ken lee in paris and berlin with maria from unesco "
                                         "and acme corp today"]})
    assert r.status_code == 200 and "truncated" not in r.json()["predictions"][0]
    # with truncate the leading words that fit are tagged, and the prediction says it was cut
    r = httpx.post(url, json={"inputs": [long_text, {"tokens": long_text.split()}, "paris"], "truncate": True})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert preds[0]["truncated"] is True and preds[1]["truncated"] is True and "truncated" not in preds[2]
    assert 0 < len(preds[1]["tags"]) < 100
    # truncation cannot help a single word of more subwords (92) than the budget (40)
    r = httpx.post(url, json={"inputs": ["xqz" * 30], "truncate": True})
    assert r.status_code == 422 and _err(r) == "input_too_long" and "first word alone" in r.json()["error"]["message"]
    assert all(e["end"] <= len(long_text) and long_text[e["start"]:e["end"]] == e["text"]
               for e in preds[0]["entities"])
    assert httpx.get(f"{ner_server.url}/health/ready").status_code == 200  # alive after all of it


def test_ner_metrics_count_inputs_and_batches(ner_server):
    def samples():
        out = {}
        for family in text_string_to_metric_families(httpx.get(f"{ner_server.url}/metrics").text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    before = samples()
    assert httpx.post(f"{ner_server.url}/v1/predict", json={"inputs": [TEXTS[1], {"tokens": TOKENS[0]}]}
                      ).status_code == 200
    after = samples()
    assert after[("strop_inputs_total", ())] - before[("strop_inputs_total", ())] == 2
    assert after[("strop_batch_size_inputs_count", ())] > before[("strop_batch_size_inputs_count", ())]
    assert after[("strop_queue_depth_inputs", ())] == 0


def test_ner_onnx_export_serves_the_same_entities(ner_run):
    from strop.compress.export import ExportOptions, export_run

    export_run(ner_run, ExportOptions(timing=False, threads=1), log=lambda m: None)
    predictor = strop.load(ner_run)
    want_raw, want_tok = predictor.predict(TEXTS), predictor.predict_tokens(TOKENS)
    with ThreadServer(ner_run, backend="onnx", onnx_file="model.onnx") as srv:
        r = httpx.post(f"{srv.url}/v1/predict", json={"inputs": [*TEXTS, *({"tokens": t} for t in TOKENS)]})
        info = httpx.get(f"{srv.url}/v1/model").json()
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert info["backend"] == "onnx" and info["task"] == "token_classification"
    _check_same(got[:2], want_raw)
    _check_same(got[2:], want_tok)
    assert [g["tags"] for g in got[2:]] == [w["tags"] for w in want_tok]
    # the int8 file (picked by default) serves too: same response shape, entities inside the texts
    with ThreadServer(ner_run / "export", backend="onnx") as srv:
        r = httpx.post(f"{srv.url}/v1/predict", json={"inputs": TEXTS})
        assert r.status_code == 200 and httpx.get(f"{srv.url}/v1/model").json()["source"] == "model.int8.onnx"
    for p, text in zip(r.json()["predictions"], TEXTS):
        assert all(text[e["start"]:e["end"]] == e["text"] for e in p["entities"])


def test_ner_pii_masking_offsets_index_the_masked_text(ner_run):
    from strop.serve.guard import mask_pii

    text = "John Smith wrote to john.smith@example.com from Paris and Berlin"
    with ThreadServer(ner_run, mask_pii=True) as srv:
        r = httpx.post(f"{srv.url}/v1/predict", json={"inputs": [text, {"tokens": text.split()}]})
    assert r.status_code == 200, r.text
    masked = mask_pii(text)
    assert masked != text and "example.com" not in masked
    raw, split = r.json()["predictions"]
    assert all(masked[e["start"]:e["end"]] == e["text"] for e in raw["entities"])
    assert len(split["tags"]) == len(text.split())  # masking replaces a word, never removes one
    assert not any("example.com" in e["text"] for e in raw["entities"] + split["entities"])


def test_fit_cuts_to_whole_words_within_the_token_budget(ner_run):
    from strop.models.backbone import load_tokenizer
    from strop.serve.entities import fit_to_token_budget

    tok = load_tokenizer(ner_run / "model")
    items = ["paris " * 30, ["berlin"] * 30, "short one", "xqz" * 30]  # < 100 chars: wordpieces, not [UNK]
    fitted, counts, long_ = fit_to_token_budget(tok, items, "simple", 12)
    assert long_ == {0, 1, 3} and counts[2] == len(tok("short one")["input_ids"]) and max(counts) == 12
    # special tokens ([CLS], [SEP]) plus the leading whole words that fit; texts cut at a word end
    assert fitted[0] == "paris " * 9 + "paris" and fitted[1] == ["berlin"] * 10 and fitted[2] == "short one"
    assert fitted[3] == ""  # one word longer than the budget on its own: predict_entities answers 422


def test_fit_is_not_fooled_by_words_without_tokens(ner_run):
    """Zero-width spaces split as words but give no subwords: they must not make an input 'too long', nor cut the
    words after them; a word without subwords before the cut point is kept, not counted against the budget."""
    from strop.models.backbone import load_tokenizer
    from strop.serve.entities import fit_to_token_budget

    tok = load_tokenizer(ner_run / "model")
    text = "paris" + " \u200b" * 40 + " berlin"
    tokens = ["paris"] + ["\u200b"] * 40 + ["berlin"]
    fitted, counts, long_ = fit_to_token_budget(tok, [text, tokens], "simple", 12)
    assert long_ == set() and fitted == [text, tokens] and counts == [4, 4]  # [CLS] paris berlin [SEP]
    # over the budget: the cut falls after the last word that fits, zero-token words before it included
    fitted, counts, long_ = fit_to_token_budget(tok, [["\u200b", "paris"] + ["berlin"] * 20], "simple", 6)
    assert long_ == {0} and fitted[0] == ["\u200b", "paris"] + ["berlin"] * 3 and counts == [6]
