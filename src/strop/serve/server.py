"""Run the app under uvicorn: loopback by default, N worker processes, graceful shutdown on SIGTERM.

Shutdown (app.install_drain_handler): the first SIGTERM (or Ctrl-C) flips /health/ready to 503 at once; after
serve.drain_s the listener closes and uvicorn waits up to serve.graceful_timeout_s for in-flight requests to finish,
then the process exits.
A second signal cuts the drain short: the listener closes at once and in-flight requests still finish; a further
Ctrl-C exits without waiting for them (uvicorn's own force exit).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from strop.serve.app import create_app
from strop.serve.backend import check_target
from strop.serve.guard import configure_logging
from strop.serve.settings import ServeConfig, load_serve_config, validate_serve

log = logging.getLogger("strop.serve")
SPEC_ENV = "STROP_SERVE_SPEC"


def limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives each thread that allocates its own arena (up to 8 x cores); the tokenizer, batcher and request
    threads then each keep their high-water mark of a large input. Two arenas keep RSS flat (measured: +41 MiB vs
    +4 MiB after the same 100 hostile payloads run twice). No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def resolved_threads(cfg: ServeConfig, cores: int | None = None) -> int:
    """Inference threads per worker: serve.threads, else the worker's share of the cores less one, which stays with
    its event loop (HTTP, JSON, tokenisation). Measured on 2 cores (BENCHMARKS.md): 1 thread instead of 2 served
    1.3x the requests at 1 client (torch) and 1.2x at 32 clients (ONNX int8)."""
    cores = cores or os.cpu_count() or 1
    return cfg.threads or max(1, cores // cfg.workers - 1)


def app_from_env():
    """App factory for worker processes (uvicorn --workers spawns them and imports this)."""
    spec = json.loads(os.environ[SPEC_ENV])
    configure_logging()
    return create_app(spec["path"], load_serve_config(None, spec["config"]))


def run_server(path: str | Path, cfg: ServeConfig) -> None:
    """Serve until SIGTERM/SIGINT (blocking)."""
    import uvicorn

    validate_serve(cfg)
    check_target(path, cfg.backend, cfg.onnx_file)
    limit_malloc_arenas()
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")  # for --workers processes
    cfg = dataclasses.replace(cfg, threads=resolved_threads(cfg))
    configure_logging()
    common = dict(host=cfg.host, port=cfg.port, log_config=None, timeout_graceful_shutdown=cfg.graceful_timeout_s,
                  server_header=False)
    log.info("strop serve %s on http://%s:%d (%s backend, %d worker(s), %d thread(s) each, API key %s)", path,
             cfg.host, cfg.port, cfg.backend, cfg.workers, cfg.threads, "required" if cfg.api_key_file else "off")
    if cfg.workers == 1:
        uvicorn.run(create_app(path, cfg), **common)
        return
    os.environ[SPEC_ENV] = json.dumps({"path": str(Path(path).resolve()), "config": dataclasses.asdict(cfg)})
    uvicorn.run("strop.serve.server:app_from_env", factory=True, workers=cfg.workers, **common)
