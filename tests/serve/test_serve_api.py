"""The HTTP API against a real server on loopback: predictions equal strop.predict's, status codes, schema, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import strop

from .serve_helpers import ServerProcess


@pytest.fixture(scope="module")
def server(single_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = ServerProcess(single_run, "serve.max_inputs=8", "serve.max_body_bytes=20000", "serve.body_timeout_s=1",
                        "serve.max_concurrency=2", log_path=log)
    srv.wait_ready()
    yield srv
    srv.stop()


def test_predictions_match_strop_predict(server, single_run):
    texts = ["refund my card payment please", "where is the courier with my parcel", "password reset"]
    r = httpx.post(f"{server.url}/v1/predict", json={"inputs": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = strop.load(single_run).predict(texts)
    assert body["task"] == "single_label" and body["model"].startswith("single@")
    for got, want in zip(body["predictions"], expected):
        assert got["label"] == want["label"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-5)
    # the {"text": ...} form gives the same answer as a bare string
    r2 = httpx.post(f"{server.url}/v1/predict", json={"inputs": [{"text": texts[0]}]})
    assert r2.json()["predictions"][0]["probs"] == pytest.approx(body["predictions"][0]["probs"], abs=1e-6)


def test_model_info_and_health(server, single_run):
    info = httpx.get(f"{server.url}/v1/model").json()
    meta = json.loads((single_run / "model" / "strop.json").read_text())
    assert info["task"] == "single_label" and info["labels"] == meta["labels"]
    import hashlib
    assert info["config_hash"] == hashlib.sha256((single_run / "config.yaml").read_bytes()).hexdigest()
    assert info["backend"] == "torch" and info["max_length"] == meta["max_length"] and info["text_pair"] is False
    assert info["device"] == "cpu"  # the test server pins serve.device=cpu
    assert httpx.get(f"{server.url}/health/live").json() == {"status": "alive"}
    assert httpx.get(f"{server.url}/health/ready").json() == {"status": "ready"}


def _err(r):
    body = r.json()
    assert set(body) == {"error"} and body["error"]["status"] == r.status_code and body["error"]["message"]
    return body["error"]


def test_status_codes(server):
    url = f"{server.url}/v1/predict"
    cases = [
        (dict(json={"inputs": []}), 400, "empty_input"),
        (dict(json={"inputs": ["ok", "   "]}), 400, "empty_input"),
        (dict(content=b'{"inputs": ["a"', headers={"content-type": "application/json"}), 400, "malformed_json"),
        (dict(content=b'{"inputs": ["\xff\xfe"]}', headers={"content-type": "application/json"}), 400, "invalid_utf8"),
        (dict(json={"inputs": "not a list"}), 422, "schema_violation"),
        (dict(json={"texts": ["a"]}), 422, "schema_violation"),
        (dict(json={"inputs": [1, 2]}), 422, "schema_violation"),
        (dict(json={"inputs": ["a"], "truncate": "yes"}), 422, "schema_violation"),
        (dict(json={"inputs": [{"text": "a", "text_pair": "b"}]}), 422, "unexpected_text_pair"),
        (dict(json={"inputs": [{"tokens": ["a", "b"]}]}), 422, "wrong_input_kind"),
        (dict(json={"inputs": ["word " * 200]}), 422, "input_too_long"),
        (dict(json={"inputs": ["a"] * 9}), 413, "too_many_inputs"),
        (dict(json={"inputs": ["a" * 30000]}), 413, "body_too_large"),
        (dict(content=b"inputs=a", headers={"content-type": "application/x-www-form-urlencoded"}), 415,
         "unsupported_media_type"),
        (dict(content=b'{"inputs": ["a"]}'), 415, "unsupported_media_type"),
        # not JSON by RFC 8259, though Python's parser takes them
        (dict(content=b'{"inputs": ["a"], "truncate": NaN}', headers={"content-type": "application/json"}), 400,
         "malformed_json"),
        (dict(content=b'{"inputs": [-Infinity]}', headers={"content-type": "application/json"}), 400,
         "malformed_json"),
        (dict(content=b"", headers={"content-type": "application/json"}), 400, "malformed_json"),
        (dict(content=b"  \n", headers={"content-type": "application/json"}), 400, "malformed_json"),
        # repeated Content-Type: the first counts, as for the framework behind the guard
        (dict(content=b'{"inputs": ["a"]}', headers=[("content-type", "text/plain"),
                                                    ("content-type", "application/json")]), 415,
         "unsupported_media_type"),
    ]
    for kwargs, status, code in cases:
        r = httpx.post(url, **kwargs)
        assert r.status_code == status, (kwargs, r.status_code, r.text)
        assert _err(r)["code"] == code, (kwargs, r.text)
    assert httpx.get(f"{server.url}/nowhere").status_code == 404
    assert httpx.get(url).status_code == 405
    # "NaN" inside a string is text, not a constant
    assert httpx.post(url, json={"inputs": ["NaN Infinity"]}).status_code == 200
    # a text over the limit is served when the caller asks for truncation, and flagged
    r = httpx.post(url, json={"inputs": ["word " * 200, "short"], "truncate": True})
    assert r.status_code == 200
    assert r.json()["predictions"][0]["truncated"] is True and "truncated" not in r.json()["predictions"][1]


def test_words_the_tokenizer_drops_neither_refuse_nor_cut_an_input(server, single_run):
    """Zero-width spaces are words to a whitespace split but no tokens: 200 of them must not make a short input
    'too long', and with truncation the words after them must still reach the model."""
    url = f"{server.url}/v1/predict"
    text = "refund my card" + " \u200b" * 200 + " parcel delivery"
    r = httpx.post(url, json={"inputs": [text]})
    assert r.status_code == 200, r.text
    got = r.json()["predictions"][0]
    assert "truncated" not in got
    want = strop.load(single_run).predict(["refund my card parcel delivery"])[0]
    assert got["probs"] == pytest.approx(want["probs"], abs=1e-5)  # the dropped words change nothing
    # a long input is still refused, and counted by tokens when the count is known
    r = httpx.post(url, json={"inputs": [text + " word" * 200]})
    assert r.status_code == 422 and _err(r)["code"] == "input_too_long"


def test_a_stalled_upload_gets_408_and_frees_its_slot(server):
    """serve.body_timeout_s=1, max_concurrency=2: two clients that send half a body and stall would otherwise hold
    both admission slots for ever, and every other caller would get 429."""
    import socket
    import time

    socks = []
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"inputs\": [")
        socks.append(sock)
    try:
        start = time.monotonic()
        for sock in socks:
            sock.settimeout(10)
            chunks = []  # the whole response: head and body may arrive in separate segments (connection: close)
            while chunk := sock.recv(4096):
                chunks.append(chunk)
            head = b"".join(chunks).decode("latin-1")
            assert head.startswith("HTTP/1.1 408") and "body_timeout" in head and "serve.body_timeout_s" in head
        assert time.monotonic() - start < 5
    finally:
        for sock in socks:
            sock.close()
    assert httpx.post(f"{server.url}/v1/predict", json={"inputs": ["refund"]}).status_code == 200


def test_openapi_matches_behaviour(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    op = spec["paths"]["/v1/predict"]["post"]
    # this server has no API key, so no route claims 401 (tests/serve/test_serve_conformance.py has the keyed case)
    assert set(op["responses"]) == {"200", "400", "408", "413", "415", "422", "429", "503"}
    assert op["requestBody"]["content"]["application/json"]
    assert {"/v1/model", "/health/live", "/health/ready", "/metrics"} <= set(spec["paths"])
    schema = spec["components"]["schemas"]["PredictRequest"]
    assert schema["required"] == ["inputs"] and schema["additionalProperties"] is False
    # the run's own inputs: a single-text classifier takes strings or {text}, at most serve.max_inputs=8 of them
    inputs = schema["properties"]["inputs"]
    assert inputs["maxItems"] == 8 and inputs["minItems"] == 1
    assert [k.get("$ref", k.get("type")) for k in inputs["items"]["anyOf"]] == [
        "string", "#/components/schemas/SingleTextInput"]
    assert "text_pair" not in spec["components"]["schemas"]["SingleTextInput"]["required"]
    err = spec["components"]["schemas"]["ErrorDetail"]
    assert {"status", "code", "message"} <= set(err["required"])


def test_metrics_parse_and_count(server):
    url = f"{server.url}/v1/predict"
    before = _samples(httpx.get(f"{server.url}/metrics").text)
    httpx.post(url, json={"inputs": ["billing refund", "parcel delivery"]})
    httpx.post(url, json={"inputs": []})
    after = _samples(httpx.get(f"{server.url}/metrics").text)
    key200 = ("strop_http_requests_total", (("method", "POST"), ("route", "/v1/predict"), ("status", "200")))
    key400 = ("strop_http_requests_total", (("method", "POST"), ("route", "/v1/predict"), ("status", "400")))
    assert after[key200] - before.get(key200, 0) == 1 and after[key400] - before.get(key400, 0) == 1
    assert after[("strop_inputs_total", ())] - before[("strop_inputs_total", ())] == 2
    assert after[("strop_queue_depth_inputs", ())] == 0 and after[("strop_model_load_seconds", ())] > 0
    assert after[("strop_batch_size_inputs_count", ())] > before[("strop_batch_size_inputs_count", ())]
    assert ("strop_http_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "/v1/predict"),
                                                           ("status_class", "2xx"))) in after
    # a client that leaves before its body arrives is not a server error (5xx alerts page people)
    import socket
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"inputs\": [")
    import time
    key499 = ("strop_http_requests_total", (("method", "POST"), ("route", "/v1/predict"), ("status", "499")))
    deadline = time.monotonic() + 10
    while (counted := _samples(httpx.get(f"{server.url}/metrics").text)).get(key499, 0) < 2:
        assert time.monotonic() < deadline, "the aborted uploads were never counted"
        time.sleep(0.1)
    assert not [k for k, v in counted.items() if k[0] == "strop_http_requests_total" and v
                and dict(k[1])["route"] == "/v1/predict" and dict(k[1])["status"].startswith("5")]
    # raw paths never become label values: unknown routes collapse into one
    httpx.get(f"{server.url}/random-{id(after)}")
    routes = {dict(labels).get("route") for (name, labels) in _samples(httpx.get(f"{server.url}/metrics").text)}
    assert routes <= {None, "/v1/predict", "/v1/model", "/health/live", "/health/ready", "/metrics",
                      "/openapi.json", "/docs", "unmatched"}


def _samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "strop-alerts.yml"


def test_alert_rules_parse_and_use_served_metrics(server):
    """promtool is not installed here: check the rule file's structure and that every metric and label value it
    reads is one the server exposes (a renamed metric would silently never fire)."""
    import re

    import yaml

    rules = yaml.safe_load(ALERTS.read_text())
    exposed = _samples(httpx.get(f"{server.url}/metrics").text)
    names = {name for name, _ in exposed}
    families = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in names}
    labels = {k for _, labels in exposed for k, _ in labels}
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {"StropHighP99Latency", "StropHighErrorRate", "StropQueueBacklog"}
    for a in alerts:
        assert set(a) <= {"alert", "expr", "for", "labels", "annotations"} and a["labels"]["severity"]
        assert re.fullmatch(r"\d+[smh]", a["for"]) and a["annotations"]["summary"]
        expr = a["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
        for metric in re.findall(r"\bstrop_[a-z_]+", expr):
            assert metric in names or metric in families, f"{a['alert']}: {metric} is not exposed"
        for label in re.findall(r"(\w+)\s*=~?\s*\"", expr):
            assert label in labels, f"{a['alert']}: label {label} is not exposed"
