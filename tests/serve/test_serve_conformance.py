"""HTTP conformance of `strop serve` (issue 24, item 5): the published OpenAPI document says what the server does.

Fast tests run the app in process (no model load: routing, the guard and /openapi.json need only the run's
strop.json); the slow test runs schemathesis (`st run --checks all`) against a real server for every task
(generation: the OpenAI-compatible routes; images: multipart uploads and base64 JSON, with the hooks of
schemathesis_images.py, which tell it that this API's binary strings are image files).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import httpx
import jsonschema
import pytest
from fastapi.testclient import TestClient

from strop.serve.app import create_app
from strop.serve.schema import NON_BLANK
from strop.serve.settings import load_serve_config

from .serve_helpers import ServerProcess

KEY = "conformance-test-key-0123456789"
META = {"strop_version": "0", "labels": ["a", "b"], "max_length": 32, "text_column": "text", "label_column": "label",
        "text_pair_column": None}
MODELS = {"single": {**META, "task": "single_label"},
          "pair": {**META, "task": "single_label", "text_pair_column": "text_b"},
          "ner": {**META, "task": "token_classification", "labels": ["O", "B-PER", "I-PER"]},
          "image": {"strop_version": "0", "task": "image_classification", "labels": ["a", "b"],
                    "image": {"size": 32, "channels": 3, "augment": "none"}, "image_column": None,
                    "label_column": "label", "text_column": None, "text_pair_column": None}}


def _app(tmp_path: Path, kind: str = "single", key: bool = False, max_inputs: int = 8):
    """The app for a model folder that holds only strop.json: enough for everything but predictions."""
    folder = tmp_path / kind
    folder.mkdir(exist_ok=True)
    (folder / "strop.json").write_text(json.dumps(MODELS[kind]), encoding="utf-8")
    settings = {"max_inputs": max_inputs}
    if key:
        (tmp_path / "key").write_text(KEY + "\n", encoding="utf-8")
        settings["api_key_file"] = str(tmp_path / "key")
    return create_app(folder, load_serve_config(None, settings), handle_signals=False)


def _send(app, method: str, path: str, **kwargs) -> httpx.Response:
    """One request to the app in process; without a `with` block TestClient runs no lifespan (no model load)."""
    return TestClient(app).request(method, path, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# methods a route lacks: 405 with Allow, before any content-type or body check

WRONG_METHODS = [("PUT", "/health/live", "GET"), ("POST", "/metrics", "GET"),
                 ("DELETE", "/v1/model", "GET"), ("PATCH", "/health/ready", "GET"),
                 ("PUT", "/v1/predict", "POST"), ("GET", "/v1/predict", "POST")]


@pytest.mark.parametrize("keyed", [False, True])
def test_a_method_a_route_lacks_gets_405_with_allow(tmp_path, keyed):
    app = _app(tmp_path, key=keyed)
    auth = {"Authorization": f"Bearer {KEY}"} if keyed else {}
    for method, path, allow in WRONG_METHODS:
        # a body that is not JSON: the content type used to be checked first (415)
        r = _send(app, method, path, content=b"x=1", headers={"content-type": "text/plain", **auth})
        assert r.status_code == 405, (method, path, r.text)
        assert r.headers["allow"] == allow
        assert r.json()["error"] == {"status": 405, "code": "method_not_allowed",
                                     "message": f"{method} is not allowed on {path}; it takes {allow}"}
    # an unknown path is a 404 whatever the content type; the key is still checked first
    r = _send(app, "POST", "/nowhere", content=b"x", headers={"content-type": "text/plain", **auth})
    assert r.status_code == 404
    if keyed:
        assert (_send(app, "PUT", "/metrics", content=b"x")).status_code == 401
    # the predict route itself still refuses a body that is not JSON
    r = _send(app, "POST", "/v1/predict", content=b"x=1", headers={"content-type": "text/plain", **auth})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


# --------------------------------------------------------------------------------------------------------------
# every status a route can answer is in the document, with the error body's schema and the headers it carries

ERROR_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def _statuses(spec: dict, path: str, method: str = "get") -> dict:
    return spec["paths"][path][method]["responses"]


def test_the_document_lists_every_status_with_the_error_schema(tmp_path):
    spec = _app(tmp_path, key=True).openapi()
    expected = {("/v1/predict", "post"): {"200", "400", "401", "408", "413", "415", "422", "429", "503"},
                ("/v1/model", "get"): {"200", "401", "503"}, ("/metrics", "get"): {"200", "401"},
                ("/health/ready", "get"): {"200", "503"}, ("/health/live", "get"): {"200"}}
    for (path, method), statuses in expected.items():
        responses = _statuses(spec, path, method)
        assert set(responses) == statuses, path
        for status in statuses - {"200"}:
            assert responses[status]["content"] == ERROR_REF, (path, status)
        # keyed routes declare the Bearer scheme; the probes stay open
        assert bool(spec["paths"][path][method].get("security")) == ("401" in statuses), path
    predict = _statuses(spec, "/v1/predict", "post")
    assert predict["401"]["headers"]["WWW-Authenticate"]["required"] is True
    assert predict["429"]["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 0}
    assert "Retry-After" in _statuses(spec, "/v1/model")["503"]["headers"]
    assert "headers" not in _statuses(spec, "/health/ready")["503"]  # readiness answers 503 without Retry-After
    assert list(_statuses(spec, "/metrics")["200"]["content"]) == ["text/plain"]
    error = spec["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"status", "code", "message"}


def test_without_a_key_no_route_claims_401(tmp_path):
    app = _app(tmp_path, key=False)
    spec = app.openapi()
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            assert "401" not in operation["responses"] and not operation.get("security"), (path, method)
    assert (_send(app, "GET", "/metrics")).status_code == 200


def test_401_answers_match_the_document(tmp_path):
    app = _app(tmp_path, key=True)
    for path in ("/metrics", "/v1/model"):
        r = _send(app, "GET", path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        jsonschema.validate(r.json(), _resolved(app.openapi(), "ErrorResponse"))


def _resolved(spec: dict, name: str) -> dict:
    """components/schemas/NAME with the document's components attached, for jsonschema to resolve $refs."""
    return {**spec["components"]["schemas"][name], "components": spec["components"]}


# --------------------------------------------------------------------------------------------------------------
# the request schema is the served model's own, and what it calls valid the server accepts


def _valid(spec: dict, body: dict) -> bool:
    return jsonschema.Draft202012Validator(_resolved(spec, "PredictRequest")).is_valid(body)


def test_each_model_publishes_its_own_request_schema(tmp_path):
    single, pair, ner = (_app(tmp_path, kind, max_inputs=8).openapi() for kind in ("single", "pair", "ner"))
    cases = [  # body, valid for (single, pair, ner)
        ({"inputs": ["hello"]}, (True, False, True)),
        ({"inputs": [{"text": "hello"}], "truncate": True}, (True, False, True)),
        ({"inputs": [{"text": "hello", "text_pair": None}]}, (True, False, True)),
        ({"inputs": [{"text": "a man plays", "text_pair": "someone plays"}]}, (False, True, False)),
        ({"inputs": [{"tokens": ["Anna", "visited", "Como"]}]}, (False, False, True)),
        ({"inputs": [{"tokens": []}]}, (False, False, False)),
        ({"inputs": [{"tokens": ["Anna", " "]}]}, (False, False, False)),
        ({"inputs": [{"text": ""}]}, (False, False, False)),  # minLength 1
        ({"inputs": [" \t\u3000"]}, (False, False, False)),  # whitespace only: the server's 400 empty_input
        ({"inputs": [{"text": "a", "text_pair": " "}]}, (False, False, False)),
        ({"inputs": []}, (False, False, False)),
        ({"inputs": ["a"] * 9}, (False, False, False)),  # over serve.max_inputs=8: the server's 413
        ({"inputs": ["a"], "extra": 1}, (False, False, False)),
    ]
    for body, want in cases:
        assert (_valid(single, body), _valid(pair, body), _valid(ner, body)) == want, body
    for spec in (single, pair, ner):  # each model's example is valid for that model
        assert _valid(spec, spec["components"]["schemas"]["PredictRequest"]["examples"][0])
    assert "TextInput" not in single["components"]["schemas"]  # the validating model (every kind) is not shown
    assert single["components"]["schemas"]["PredictRequest"]["properties"]["inputs"]["maxItems"] == 8


def test_an_image_model_documents_its_two_bodies(tmp_path):
    app = _app(tmp_path, "image", key=True, max_inputs=8)
    spec = app.openapi()
    operation = spec["paths"]["/v1/predict"]["post"]
    content = operation["requestBody"]["content"]
    assert content == {"application/json": {"schema": {"$ref": "#/components/schemas/ImagePredictRequest"}},
                       "multipart/form-data": {"schema": {"$ref": "#/components/schemas/ImageUpload"}}}
    # every status the route can answer, as for texts (413 also for an image over serve.max_image_pixels)
    assert set(operation["responses"]) == {"200", "400", "401", "408", "413", "415", "422", "429", "503"}
    upload = spec["components"]["schemas"]["ImageUpload"]
    assert upload["properties"]["image"]["items"] == {"type": "string", "format": "binary"}
    assert (upload["required"], upload["properties"]["image"]["maxItems"]) == (["image"], 8)
    png = spec["components"]["schemas"]["ImagePredictRequest"]["examples"][0]["inputs"][0]["image"]
    cases = [({"inputs": [{"image": png}]}, True), ({"inputs": [{"image": png}] * 8}, True),
             ({"inputs": [{"image": png}] * 9}, False), ({"inputs": []}, False), ({"inputs": [png]}, False),
             ({"inputs": [{"image": ""}]}, False), ({"inputs": [{"image": png, "text": "x"}]}, False),
             ({"inputs": [{"text": "hello"}]}, False)]
    for body, valid in cases:
        validator = jsonschema.Draft202012Validator(_resolved(spec, "ImagePredictRequest"))
        assert validator.is_valid(body) == valid, body
    assert "PredictRequest" not in spec["components"]["schemas"]  # no text body on an image model
    auth = {"Authorization": f"Bearer {KEY}"}
    r = _send(app, "POST", "/v1/predict", content=b"x", headers={"content-type": "image/png", **auth})
    assert r.status_code == 415 and "'Content-Type: multipart/form-data'" in r.json()["error"]["message"]
    assert "'Content-Type: application/json'" in r.json()["error"]["message"]
    assert _send(app, "PUT", "/v1/predict", headers=auth).status_code == 405


def test_the_non_blank_pattern_is_what_the_server_checks():
    """NON_BLANK matches exactly the characters str.strip() keeps, so a text the schema accepts is never the
    server's 400 empty_input; surrogates are left out (JSON texts cannot carry them valid)."""
    pattern = re.compile(NON_BLANK)
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    mismatched = [hex(ord(c)) for c in chars if bool(pattern.search(c)) != bool(c.strip())]
    assert mismatched == []
    assert pattern.search(" \u2003 x ") and not pattern.search(" \u2003\n\x1c")


# --------------------------------------------------------------------------------------------------------------
# schemathesis against a real server, one per task (slow)

SCHEMATHESIS_CONFIG = """
# 413 is this API's documented answer to more inputs than serve.max_inputs (maxItems in the schema), a negative
# case schemathesis generates; the other statuses are its defaults
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
"""


@pytest.mark.slow
@pytest.mark.parametrize("run, operations", [("single_run", 5), ("pair_run", 5), ("ner_run", 5),
                                             ("generation_run", 7), ("image_run", 5)])
def test_schemathesis_finds_no_failure(run, operations, request, tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.skip("schemathesis is not installed: pip install 'strop[dev]'")
    (tmp_path / "key").write_text(KEY + "\n", encoding="utf-8")
    (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG, encoding="utf-8")
    srv = ServerProcess(request.getfixturevalue(run), "--api-key-file", str(tmp_path / "key"),
                        "serve.max_inputs=8", log_path=tmp_path / "server.log")
    try:
        srv.wait_ready()
        cmd = [st, "--config-file", str(tmp_path / "schemathesis.toml"), "run", f"{srv.url}/openapi.json",
               "-H", f"Authorization: Bearer {KEY}", "--checks", "all", "-n", "300", "--seed", "7",
               "--generation-database", "none", "--no-color", "--report", "junit",
               "--report-junit-path", str(tmp_path / "junit.xml")]
        # the hooks only concern binary and base64 strings, which only the image model's document has
        path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
        hooks = {"SCHEMATHESIS_HOOKS": "schemathesis_images", "PYTHONPATH": path}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={**os.environ, **hooks})
    finally:
        srv.stop()
    out = done.stdout + done.stderr
    print(out[-3000:])  # the summary: requests and checks per operation (pytest -s shows it)
    assert done.returncode == 0, out[-6000:]
    suite = ElementTree.parse(tmp_path / "junit.xml").getroot()
    # every operation of the document was tested (predict or the three OpenAI routes, model, metrics, both probes),
    # none failed
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == (str(operations), "0", "0"), \
        out[-6000:]
    assert "Traceback" not in (tmp_path / "server.log").read_text(encoding="utf-8", errors="replace")
