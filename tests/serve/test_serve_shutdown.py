"""Graceful shutdown on SIGTERM (readiness 503 at once, in-flight requests finish) and --workers N."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .serve_helpers import ServerProcess


def _gauge(url: str, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


def test_sigterm_lets_16_in_flight_requests_finish(slow_model, tmp_path):
    # one big batch that waits up to 3 s for batch-mates: all 16 requests are surely in flight when SIGTERM comes
    srv = ServerProcess(slow_model, "serve.drain_s=1.5", "serve.max_wait_ms=3000", "serve.max_batch_size=256",
                        "serve.max_batch_tokens=100000", log_path=tmp_path / "server.log")
    try:
        srv.wait_ready()
        body = json.dumps({"inputs": [" ".join(["parcel"] * 120)] * 8}).encode()

        def call(_):
            with httpx.Client(timeout=120) as client:
                return client.post(f"{srv.url}/v1/predict", content=body, headers={"content-type": "application/json"})

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(call, i) for i in range(16)]
            deadline = time.monotonic() + 30
            while _gauge(srv.url, "strop_inflight_requests") < 16:
                assert time.monotonic() < deadline, "the 16 requests never were in flight together"
                time.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            ready = httpx.get(f"{srv.url}/health/ready", timeout=5)
            live = httpx.get(f"{srv.url}/health/live", timeout=5)
            responses = [f.result() for f in futures]
        assert ready.status_code == 503 and "draining" in ready.json()["error"]["message"]
        assert live.status_code == 200
        assert [r.status_code for r in responses] == [200] * 16
        assert all(len(r.json()["predictions"]) == 8 for r in responses)
        code = srv.proc.wait(60)
        assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
        assert "received signal 15" in srv.log()
    finally:
        srv.stop()


@pytest.mark.slow
def test_workers_share_the_port_and_stop_together(single_run, tmp_path):
    srv = ServerProcess(single_run, "--workers", "2", log_path=tmp_path / "server.log")
    try:
        srv.wait_ready()
        deadline = time.monotonic() + 60
        workers = []
        while len(workers) < 2 and time.monotonic() < deadline:  # the second worker may still be loading
            workers = [p for p in psutil.Process(srv.pid).children() if "spawn" in " ".join(p.cmdline())]
            time.sleep(0.2)
        assert len(workers) == 2
        with httpx.Client(timeout=30) as client:
            # each worker loads its own model: ready answers 503 from one still loading; wait for a run of 200s
            # (the kernel spreads connections over both listeners, so 10 in a row means both are ready)
            streak = 0
            while streak < 10 and time.monotonic() < deadline:
                ok = httpx.get(f"{srv.url}/health/ready", timeout=30).status_code == 200
                streak = streak + 1 if ok else 0
                time.sleep(0 if ok else 0.2)
            codes = [client.post(f"{srv.url}/v1/predict", json={"inputs": [f"parcel {i}"]}).status_code
                     for i in range(20)]
        assert codes == [200] * 20
        assert srv.stop() in (0, -signal.SIGTERM)
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finally:
        srv.stop()
