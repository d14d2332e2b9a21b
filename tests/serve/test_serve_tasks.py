"""Every classification task over HTTP (pairs, multi-label, regression), the ONNX backend, auth and the bind rule."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

import strop

from .serve_helpers import ThreadServer

TEXTS = ["refund my card payment please", "where is the courier with my parcel", "password reset for login",
         "invoice again today"]


def _predict(url: str, inputs: list, **kw) -> list[dict]:
    r = httpx.post(f"{url}/v1/predict", json={"inputs": inputs}, **kw)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_pairs(pair_run):
    pairs = ["please help", "my order", "need this", "about today"]
    want = strop.load(pair_run).predict(TEXTS, pairs)
    with ThreadServer(pair_run) as srv:
        got = _predict(srv.url, [{"text": t, "text_pair": p} for t, p in zip(TEXTS, pairs)])
        assert [g["label"] for g in got] == [w["label"] for w in want]
        np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-5)
        r = httpx.post(f"{srv.url}/v1/predict", json={"inputs": ["no pair given"]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "missing_text_pair"
        assert httpx.get(f"{srv.url}/v1/model").json()["text_pair"] is True


def test_multi_label_and_regression(multi_run, regression_run):
    want = strop.load(multi_run).predict(TEXTS)
    with ThreadServer(multi_run) as srv:
        got = _predict(srv.url, TEXTS)
    assert [g["labels"] for g in got] == [w["labels"] for w in want]
    assert all(set(g) == {"labels", "probs"} for g in got)
    np.testing.assert_allclose([list(g["probs"].values()) for g in got], [list(w["probs"].values()) for w in want],
                               atol=1e-5)
    want = strop.load(regression_run).predict(TEXTS)
    with ThreadServer(regression_run) as srv:
        got = _predict(srv.url, TEXTS)
        assert httpx.get(f"{srv.url}/v1/model").json()["task"] == "regression"
    assert all(set(g) == {"value"} for g in got)
    np.testing.assert_allclose([g["value"] for g in got], [w["value"] for w in want], atol=1e-5)


def test_bf16_precision_serves_what_a_bf16_predictor_predicts(single_run):
    """serve.precision=bf16 stores the Linear weights in bf16 and runs under autocast: the same numbers as autocast
    over fp32 weights (Predictor(precision='bf16'), as training evaluates), close to fp32."""
    want = strop.load(single_run, precision="bf16").predict(TEXTS, batch_size=1)
    fp32 = strop.load(single_run).predict(TEXTS)
    with ThreadServer(single_run, precision="bf16", batching=False) as srv:
        got = [_predict(srv.url, [t])[0] for t in TEXTS]
        info = httpx.get(f"{srv.url}/v1/model").json()
    assert info["backend"] == "torch" and info["precision"] == "bf16"
    assert [g["label"] for g in got] == [w["label"] for w in want]
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-6)
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in fp32], atol=2e-2)
    from strop.device import cpu_has_bf16

    with ThreadServer(single_run, precision="auto") as srv:  # the default: bf16 where the CPU has it
        assert httpx.get(f"{srv.url}/v1/model").json()["precision"] == ("bf16" if cpu_has_bf16() else "fp32")


def test_onnx_backend_matches_torch(single_run, single_export):
    want = strop.load(single_run).predict(TEXTS)
    with ThreadServer(single_run, backend="onnx", onnx_file="model.onnx") as srv:
        got = _predict(srv.url, TEXTS)
        info = httpx.get(f"{srv.url}/v1/model").json()
    assert info["backend"] == "onnx" and info["source"] == "model.onnx"
    np.testing.assert_allclose([list(g["probs"].values()) for g in got], [list(w["probs"].values()) for w in want],
                               atol=1e-4)
    # int8 is picked by default; quantisation moves probabilities a little but keeps their shape
    with ThreadServer(single_export, backend="onnx") as srv:
        got8 = _predict(srv.url, TEXTS)
        assert httpx.get(f"{srv.url}/v1/model").json()["source"] == "model.int8.onnx"
    np.testing.assert_allclose([list(g["probs"].values()) for g in got8], [list(w["probs"].values()) for w in want],
                               atol=0.05)


def test_api_key(single_run, tmp_path):
    key = "k" * 20 + "-secret"
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    with ThreadServer(single_run, api_key_file=str(key_file)) as srv:
        url = f"{srv.url}/v1/predict"
        assert httpx.post(url, json={"inputs": ["a"]}).status_code == 401
        assert httpx.post(url, json={"inputs": ["a"]}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(url, json={"inputs": ["a"]}, headers={"X-API-Key": key[:-1]}).status_code == 401
        r = httpx.post(url, json={"inputs": ["a"]}, headers={"Authorization": "Bearer wrong"})
        assert r.headers["www-authenticate"] == "Bearer" and "API key" in r.json()["error"]["message"]
        assert httpx.post(url, json={"inputs": ["a"]}, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.post(url, json={"inputs": ["a"]}, headers={"X-API-Key": key}).status_code == 200
        assert httpx.get(f"{srv.url}/metrics").status_code == 401
        assert httpx.get(f"{srv.url}/v1/model").status_code == 401
        # probes stay open for orchestrators
        assert httpx.get(f"{srv.url}/health/ready").status_code == 200
        # the key is checked before the body: an unauthenticated caller learns nothing about limits
        assert httpx.post(url, content=b"x" * 2_000_000, headers={"content-type": "text/plain"}).status_code == 401


def _serve_cli(capsys, *args: str) -> tuple[int, str, str]:
    from strop.cli import main

    code = main(["serve", *args])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())  # rich wraps long messages


def test_cli_refuses_unsafe_settings(single_run, tmp_path, capsys):
    code, _, err = _serve_cli(capsys, str(single_run), "--host", "0.0.0.0")
    assert code == 2 and "not a loopback address" in err and "--api-key-file" in err
    short = tmp_path / "short"
    short.write_text("abc")
    code, _, err = _serve_cli(capsys, str(single_run), "--host", "0.0.0.0", "--api-key-file", str(short))
    assert code == 2 and "at least 16 characters" in err
    code, _, err = _serve_cli(capsys, str(single_run), "serve.max_wiat_ms=3")
    assert code == 2 and "did you mean 'serve.max_wait_ms'" in err
    code, _, err = _serve_cli(capsys, str(tmp_path), "--backend", "onnx")
    assert code == 2 and "holds no ONNX export" in err and "strop export" in err
    code, _, err = _serve_cli(capsys, str(tmp_path / "missing"))
    assert code == 2 and "not found" in err
    code, out, _ = _serve_cli(capsys, "--help-config")
    assert code == 0 and "serve.max_batch_tokens" in out and "serve.mask_pii" in out


def test_shipped_serve_yaml_loads(tmp_path):
    from pathlib import Path

    from strop.errors import ConfigError
    from strop.serve.settings import load_serve_config

    example = Path(__file__).resolve().parents[2] / "deploy" / "serve.yaml"
    cfg = load_serve_config(example, ["serve.port=9001"])
    assert cfg.backend == "onnx" and cfg.drain_s == 5 and cfg.port == 9001 and cfg.max_wait_ms == 5.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve:\n  max_batch_tokens: 0\n")
    with pytest.raises(ConfigError, match=r"serve.max_batch_tokens=0 must be > 0"):
        load_serve_config(bad)
    with pytest.raises(ConfigError, match=r"serve.precision=bf16 applies to the torch backend"):
        load_serve_config(None, ["serve.backend=onnx", "serve.precision=bf16"])
    with pytest.raises(ConfigError, match=r"serve.device=cuda applies to the torch backend"):
        load_serve_config(None, ["serve.backend=onnx", "serve.device=cuda"])
    import torch

    if not torch.cuda.is_available():  # refused before a server starts, naming the setting
        with pytest.raises(ConfigError, match=r"serve.device=cuda but no CUDA GPU is visible; use serve.device=auto"):
            load_serve_config(None, ["serve.device=cuda"])
    assert load_serve_config(None).device == "auto"
    # text settings keep their text, with or without the serve. prefix (YAML would read 007 as 7, 0x10 as 16)
    cfg = load_serve_config(None, ["serve.api_key_file=007", "onnx_file=0x10", "serve.port=8001"])
    assert cfg.api_key_file == "007" and cfg.onnx_file == "0x10" and cfg.port == 8001


def test_auto_device_serves_on_what_this_machine_has(single_run):
    """serve.device=auto: the GPU when one is visible (checked against the CPU's numbers there), else the CPU."""
    import torch

    want = strop.load(single_run).predict(TEXTS)
    with ThreadServer(single_run, device="auto") as srv:
        got = _predict(srv.url, TEXTS)
        info = httpx.get(f"{srv.url}/v1/model").json()
    assert info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert [g["label"] for g in got] == [w["label"] for w in want]
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-4)


def test_inference_threads_leave_each_event_loop_a_core():
    from strop.serve.server import resolved_threads
    from strop.serve.settings import load_serve_config

    cfg = load_serve_config(None)
    assert resolved_threads(cfg, cores=2) == 1 and resolved_threads(cfg, cores=16) == 15
    assert resolved_threads(load_serve_config(None, ["serve.workers=4"]), cores=16) == 3
    assert resolved_threads(load_serve_config(None, ["serve.workers=2"]), cores=2) == 1  # never below 1
    assert resolved_threads(load_serve_config(None, ["serve.threads=2"]), cores=2) == 2  # as set
