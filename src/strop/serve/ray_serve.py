"""`strop serve --ray`: the same app as replicas of a Ray Serve deployment with autoscaling, for many machines.

Each replica runs the whole strop app (guard, batching, telemetry) on its own copy of the model; Ray's HTTP proxy
spreads requests over replicas and the autoscaler adds replicas (up to serve.ray_max_replicas) when each one holds
more than `TARGET_ONGOING` requests. Connect to an existing cluster with RAY_ADDRESS=ray://head:10001 (or `auto`);
without it a local Ray instance starts.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from pathlib import Path

from strop.errors import StropError
from strop.serve.settings import ServeConfig

TARGET_ONGOING = 16  # requests per replica before the autoscaler adds one; batching wants several in flight


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise StropError("strop serve --ray needs Ray Serve: pip install 'strop[ray]'") from None
    return ray, serve


class StropReplica:
    """One Ray Serve replica: the strop ASGI app with its model, batcher and guard; requests are passed through."""

    def __init__(self, path: str, settings: dict):
        from strop.serve.app import create_app
        from strop.serve.settings import load_serve_config

        self.app = create_app(path, load_serve_config(None, settings), handle_signals=False)
        self._lifespan = None

    async def _started(self):
        if self._lifespan is None:
            self._lifespan = self.app.router.lifespan_context(self.app)
            await self._lifespan.__aenter__()
        return self.app.state.strop

    async def __call__(self, request):
        from starlette.responses import Response

        await self._started()
        messages = []

        async def send(message):
            messages.append(message)

        await self.app(dict(request.scope), request.receive, send)
        start = next(m for m in messages if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", [])
                   if k.lower() != b"content-length"}
        return Response(body, status_code=start["status"], headers=headers)

    async def check_health(self):
        """Ray restarts a replica whose model failed to load."""
        state = await self._started()
        if state.load_error:
            raise RuntimeError(state.load_error)


def deployment(path: str | Path, cfg: ServeConfig):
    """The bound Ray Serve application for the run (or export) at `path`."""
    _, serve = _import_ray()
    settings = dataclasses.asdict(dataclasses.replace(cfg, threads=cfg.threads or 1, workers=1))
    replica = serve.deployment(
        StropReplica, name="strop",
        autoscaling_config={"min_replicas": cfg.ray_min_replicas, "max_replicas": cfg.ray_max_replicas,
                            "target_ongoing_requests": TARGET_ONGOING, "upscale_delay_s": 5,
                            "downscale_delay_s": 60},
        max_ongoing_requests=cfg.max_concurrency,
        ray_actor_options={"num_cpus": settings["threads"]},
        health_check_period_s=5)
    return replica.bind(str(Path(path).resolve()), settings)


def start_ray(path: str | Path, cfg: ServeConfig, address: str | None = None, num_cpus: int | None = None):
    """Start (or join) Ray, start Serve's HTTP proxy on cfg.host:cfg.port and deploy; returns the app handle."""
    import os

    ray, serve = _import_ray()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(deployment(path, cfg), name="strop", route_prefix="/", blocking=False)


def run_ray(path: str | Path, cfg: ServeConfig) -> None:
    """Serve on Ray until SIGTERM/SIGINT, then shut the deployment down."""
    from strop.serve.backend import check_target
    from strop.serve.settings import validate_serve

    validate_serve(cfg)
    check_target(path, cfg.backend, cfg.onnx_file)
    ray, serve = _import_ray()
    start_ray(path, cfg)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"strop serve --ray: http://{cfg.host}:{cfg.port} ({cfg.ray_min_replicas}-{cfg.ray_max_replicas} replicas)",
          flush=True)
    while not stop.is_set():
        time.sleep(0.5)
    serve.shutdown()
    ray.shutdown()
