"""Serving benchmark: throughput and latency of `strop serve` against a plain FastAPI + transformers pipeline.

Servers (one at a time, each in its own process, same model, same machine, one run):
  baseline          bench/serve_baseline.py: FastAPI endpoint calling a transformers pipeline per request
  strop-torch       strop serve RUN (dynamic batching; serve.precision=auto: bf16 where the CPU has it)
  strop-torch-fp32  strop serve RUN serve.precision=fp32 (and -bf16: serve.precision=bf16)
  strop-onnx-int8   strop serve RUN --backend onnx (model.int8.onnx; dynamic batching)
  *-nobatch         the same strop servers with serve.batching=false (one request per forward pass)
Each is driven by closed-loop clients (1, 8, 32 at a time), each request one SST-2 dev sentence, for --seconds after
a warm-up; requests/s and p50/p95/p99 latency are recorded. Results: bench/results/serve.json.

    flock /tmp/strop-bench.lock python bench/serve.py --run runs/quickstart-serve

RUN/export/ comes from `strop export`; when it is missing it is written here with the test suite's stand-in
exporter (tests/serve/serve_helpers.py: torch.onnx.export + onnxruntime dynamic int8 quantisation).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from common import REPO, RESULTS, machine

sys.path.insert(0, str(REPO / "tests" / "serve"))
from serve_helpers import export_onnx, free_port  # noqa: E402

SST2_DEV = REPO.parent / "shared" / "datasets" / "sst2" / "dev.jsonl"


def texts() -> list[str]:
    rows = [json.loads(line)["text"] for line in SST2_DEV.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(0).shuffle(rows)
    return rows


def start(kind: str, run: Path, port: int, max_length: int, log, extra: list[str] = (),
          device: str = "cpu") -> tuple[subprocess.Popen, str, callable]:
    """A server process and how to build one request body for it. device: where the baseline and the strop torch
    servers run (the onnx servers run on the CPU)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if kind == "baseline":
        cmd = [sys.executable, str(REPO / "bench" / "serve_baseline.py"), str(run / "model"), str(max_length),
               str(port), device]
        return subprocess.Popen(cmd, stdout=log, stderr=log, env=env), "/predict", lambda t: {"text": t}
    args = ["serve", str(run), "--port", str(port)]
    if "onnx" in kind:
        args += ["--backend", "onnx"]
    else:
        args += [f"serve.device={device}"]
    for precision in ("bf16", "fp32"):
        if precision in kind:
            args += [f"serve.precision={precision}"]
    if kind.endswith("nobatch"):
        args += ["serve.batching=false"]
    cmd = [sys.executable, "-c", "import sys; from strop.cli import main; sys.exit(main())", *args,
           "serve.max_concurrency=256", *extra]
    return (subprocess.Popen(cmd, stdout=log, stderr=log, env=env), "/v1/predict",
            lambda t: {"inputs": [t], "truncate": True})


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


async def drive(url: str, body, sentences: list[str], clients: int, seconds: float, warmup: float) -> dict:
    """Closed loop: `clients` tasks each send one request after another; latencies after the warm-up count."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def client(i: int) -> None:
        nonlocal errors
        k = i
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            r = await http.post(url, json=body(sentences[k % len(sentences)]))
            t1 = time.perf_counter()
            k += clients
            if t0 >= measure_from and t1 <= stop_at:
                if r.status_code == 200:
                    latencies.append(t1 - t0)
                else:
                    errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(i) for i in range(clients)))
    lat = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": errors, "seconds": seconds,
            "throughput_rps": round(len(latencies) / seconds, 2),
            **{f"p{q}_ms": round(float(np.percentile(lat, q)), 1) if len(lat) else None for q in (50, 95, 99)}}


def bench_server(kind: str, run: Path, max_length: int, sentences: list[str], args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = RESULTS / f"serve-{kind}.log"
    with open(log_path, "wb") as log:
        proc, path, body = start(kind, run, port, max_length, log, args.set, args.device)
        try:
            wait_ready(url, proc, "/health" if kind == "baseline" else "/health/ready")
            points = []
            for clients in args.clients:
                point = asyncio.run(drive(url + path, body, sentences, clients, args.seconds, args.warmup))
                point["loadavg"] = [round(x, 2) for x in os.getloadavg()]
                print(f"{kind:>22} {clients:>3} clients: {point['throughput_rps']:8.1f} req/s  p50 "
                      f"{point['p50_ms']} ms  p95 {point['p95_ms']} ms  p99 {point['p99_ms']} ms  errors "
                      f"{point['errors']}  load {point['loadavg'][0]}", flush=True)
                points.append(point)
        finally:
            proc.terminate()
            proc.wait(60)
    log_path.unlink(missing_ok=True)
    return {"server": kind, "points": points}


def ceiling(run: Path, sentences: list[str], n: int = 256, batch: int = 32) -> dict:
    """The most batching can give, without a server: texts/s of the served model through strop's Predictor on one
    thread (the inference threads `strop serve` uses on 2 cores), one text per call vs `batch` texts per call (each
    call cut into length-sorted sub-batches as the server does), for each backend/precision served here."""
    import torch

    import strop
    from strop.device import bf16_linear_weights
    from strop.serve.backend import onnx_predictor

    torch.set_num_threads(1)
    texts = sentences[:n]
    out = {}
    for name in ("torch-fp32", "torch-bf16", "onnx-int8"):
        if name == "onnx-int8":
            predictor = onnx_predictor(run, "model.int8.onnx", 1)[0]
        else:
            predictor = strop.load(run, precision=name.split("-")[1])
            if name == "torch-bf16":
                bf16_linear_weights(predictor.model)
        rates = {}
        for size in (1, batch):
            predictor.predict(texts[:batch], batch_size=size)  # warm-up
            start = time.perf_counter()
            for i in range(0, len(texts), size):
                predictor.predict(texts[i:i + size], batch_size=size)
            rates[size] = len(texts) / (time.perf_counter() - start)
        out[name] = {"texts_per_s_batch_1": round(rates[1], 1), f"texts_per_s_batch_{batch}": round(rates[batch], 1),
                     "ratio": round(rates[batch] / rates[1], 2)}
        print(f"ceiling {name:>10}: batch 1 {rates[1]:7.1f} texts/s, batch {batch} {rates[batch]:7.1f} texts/s, "
              f"{rates[batch] / rates[1]:.2f}x", flush=True)
    return out


def ratios(results: dict) -> dict:
    def at(kind, clients):
        return next(p for p in results[kind]["points"] if p["clients"] == clients)
    out = {}
    top = max(p["clients"] for r in results.values() for p in r["points"])
    for kind in results:
        if kind == "baseline" or "baseline" not in results:
            continue
        s, b = at(kind, top), at("baseline", top)
        out[f"{kind}_vs_baseline_at_{top}"] = {"throughput_x": round(s["throughput_rps"] / b["throughput_rps"], 2),
                                              "p99_ms": [s["p99_ms"], b["p99_ms"]]}
    for kind in ("strop-torch", "strop-torch-fp32", "strop-torch-bf16", "strop-onnx-int8"):
        if kind in results and f"{kind}-nobatch" in results:
            s, n = at(kind, top), at(f"{kind}-nobatch", top)
            out[f"{kind}_batching_on_vs_off_at_{top}"] = {
                "throughput_x": round(s["throughput_rps"] / n["throughput_rps"], 2), "p95_ms": [s["p95_ms"], n["p95_ms"]]}
    return out


def table(report: dict) -> str:
    """The results as a markdown table (for BENCHMARKS.md)."""
    lines = ["| server | clients | req/s | p50 ms | p95 ms | p99 ms | errors | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, result in report["servers"].items():
        for p in result["points"]:
            lines.append(f"| {kind} | {p['clients']} | {p['throughput_rps']:.1f} | {p['p50_ms']} | {p['p95_ms']} | "
                         f"{p['p99_ms']} | {p['errors']} | {p['loadavg'][0]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished run folder (runs/<name>)")
    ap.add_argument("--table", action="store_true", help="print bench/results/serve.json as a markdown table")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per point")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring, per point")
    ap.add_argument("--servers", default="baseline,strop-torch,strop-onnx-int8,strop-torch-nobatch,"
                    "strop-onnx-int8-nobatch,strop-torch-fp32,strop-torch-fp32-nobatch")
    ap.add_argument("--set", action="append", default=[], help="a serve setting for every strop server, e.g. "
                    "--set serve.max_wait_ms=2 (repeatable)")
    ap.add_argument("--out", default="serve.json", help="results file name in bench/results/")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the baseline and the strop torch "
                    "servers run (serve.device); the onnx servers always run on the CPU")
    ap.add_argument("--ceiling", action="store_true", help="only measure the model's own batch-1 vs batch-32 "
                    "throughput on one thread (what batching can give at most), into bench/results/serve_ceiling.json")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads((RESULTS / args.out).read_text())))
        return
    if args.run is None:
        ap.error("--run RUN is required")
    mach = machine()
    meta = json.loads((args.run / "model" / "strop.json").read_text())
    export = args.run / "export"
    if not (export / "model.int8.onnx").is_file():
        print(f"no {export}/model.int8.onnx: exporting with the test suite's stand-in exporter", flush=True)
        export_onnx(args.run)
    sentences = texts()
    if args.ceiling:
        report = {"machine": mach, "command": "python bench/serve.py " + " ".join(sys.argv[1:]), "run": str(args.run),
                  "ceiling": ceiling(args.run, sentences), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
        (RESULTS / "serve_ceiling.json").write_text(json.dumps(report, indent=2))
        return
    results = {}
    for kind in args.servers.split(","):
        results[kind] = bench_server(kind, args.run, meta["max_length"], sentences, args)
    report = {"machine": mach, "command": "python bench/serve.py " + " ".join(sys.argv[1:]),
              "run": str(args.run), "max_length": meta["max_length"], "strop_settings": args.set,
              "device": args.device, "requests": "one SST-2 dev sentence each",
              "servers": results, "ratios": ratios(results), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(report, indent=2))
    print(table(report))
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
