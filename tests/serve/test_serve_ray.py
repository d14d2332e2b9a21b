"""Ray Serve deployment on a local Ray instance: requests through Ray's proxy reach a strop replica (slow: Ray
takes tens of seconds to start)."""

from __future__ import annotations

import time

import httpx
import pytest

import strop

from .serve_helpers import free_port

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


def test_ray_serve_deployment(single_run):
    from ray import serve

    from strop.serve.ray_serve import start_ray
    from strop.serve.settings import load_serve_config

    cfg = load_serve_config(None, {"port": free_port(), "ray_min_replicas": 1, "ray_max_replicas": 2,
                                   "precision": "fp32", "device": "cpu"})
    url = f"http://127.0.0.1:{cfg.port}"
    try:
        start_ray(single_run, cfg, num_cpus=2)
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Ray Serve deployment never became ready"
            time.sleep(1)
        texts = ["refund my card payment please", "where is my parcel"]
        r = httpx.post(f"{url}/v1/predict", json={"inputs": texts}, timeout=30)
        assert r.status_code == 200, r.text
        want = strop.load(single_run).predict(texts)
        assert [p["label"] for p in r.json()["predictions"]] == [w["label"] for w in want]
        assert httpx.post(f"{url}/v1/predict", json={"inputs": []}, timeout=30).status_code == 400
        assert httpx.get(f"{url}/v1/model", timeout=30).json()["task"] == "single_label"
        app = serve.status().applications["strop"]
        assert app.status == "RUNNING"
        dep = app.deployments["strop"]
        assert dep.status == "HEALTHY" and 1 <= dep.replica_states.get("RUNNING", 0) <= 2
    finally:
        serve.shutdown()
        ray.shutdown()
