"""The HTTP API: routes, error mapping and the model's life cycle (load and warm up in the background; ready after).

    POST /v1/predict   inputs -> predictions (dynamic batching)      GET /v1/model    task, labels, version, hash
    GET /health/live   the process answers                           GET /health/ready  503 until loaded and warm,
    GET /metrics       Prometheus text                                                  and again while draining
A run whose task generates text (generation) answers OpenAI's POST /v1/chat/completions, POST /v1/completions and
GET /v1/models instead of /v1/predict (openai_api.py; decode steps shared by concurrent requests, decode.py).
A run whose task takes images (image classification) answers /v1/predict with image files as multipart uploads or
base64 in JSON (images.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from strop import __version__
from strop.errors import StropError
from strop.serve.backend import LoadedModel, load_model_for_serving, run_batch, served_meta
from strop.serve.batcher import Batcher
from strop.serve.classify import predict_classes
from strop.serve.entities import predict_entities
from strop.serve.guard import JSON, MULTIPART, Admission, GuardMiddleware, error_body
from strop.serve.images import add_image_route, warmup_images
from strop.serve.inputs import ApiError
from strop.serve.openai_api import BODY_EXAMPLES, add_openai_routes, start_decoder
from strop.serve.openapi import PREDICT_ERRORS, error_responses, publish_request_schema
from strop.serve.schema import Health, ModelInfo, PredictRequest, PredictResponse, published_request
from strop.serve.settings import ServeConfig, body_limit, read_api_key
from strop.serve.telemetry import MetricsMiddleware, Telemetry
from strop.tasks import get_task

log = logging.getLogger("strop.serve")
SWITCH_INTERVAL_S = 0.0005
WARMUP_TEXTS = ["warm up", "warming up the model with a somewhat longer sentence of several words " * 4]


def _error(status: int, code: str, message: str, headers: dict | None = None, **extra) -> Response:
    return Response(error_body(status, code, message, **extra), status, headers, media_type="application/json")


class ServerState:
    """Everything the routes share; one per app (per worker process)."""

    def __init__(self, cfg: ServeConfig, telemetry: Telemetry):
        self.cfg, self.telemetry = cfg, telemetry
        self.model: LoadedModel | None = None
        self.batcher: Batcher | None = None
        self.decoder = None  # decode.DecodeScheduler, for a model that generates
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.body_limit = cfg.max_body_bytes  # resolved by create_app once it knows the task (settings.body_limit)
        self.admission = Admission(cfg.max_concurrency, cfg.retry_after_s, telemetry.inflight.set,
                                   telemetry.rejected.inc)

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.telemetry.ready.set(1 if ready and not self.draining else 0)

    def drain(self) -> None:
        """Readiness goes to 503 at once; requests already admitted (and new ones, until the listener closes) run."""
        self.draining = True
        self.telemetry.ready.set(0)


def _warm_up(model: LoadedModel) -> None:
    p = model.predictor
    inputs = warmup_images(p.meta) if p.task.takes_images else WARMUP_TEXTS
    pairs = WARMUP_TEXTS if p.meta.get("text_pair_column") else None
    for _ in range(2):
        run_batch(p, inputs, pairs)


async def _load(state: ServerState, path: Path, loaded: LoadedModel | None) -> None:
    """Load (in a thread: the event loop keeps answering /health/live), warm up, start the batcher, mark ready."""
    cfg = state.cfg
    try:
        start = time.perf_counter()
        model = loaded or await asyncio.to_thread(load_model_for_serving, path, cfg.backend, cfg.onnx_file,
                                                  cfg.threads, cfg.precision, cfg.device)
        if model.predictor.task.generates:
            state.decoder = await start_decoder(model.predictor, cfg, state.telemetry)
        else:
            await asyncio.to_thread(_warm_up, model)
            state.batcher = Batcher(lambda inputs, pairs: run_batch(model.predictor, inputs, pairs),
                                    cfg.max_batch_tokens, cfg.max_batch_size, cfg.max_wait_ms, cfg.batching,
                                    state.telemetry.on_batch, state.telemetry.queue_depth.set)
            state.batcher.start()
        state.telemetry.model_load.set(time.perf_counter() - start)
        state.model = model
        state.set_ready(True)
        log.info("model %s (%s, %s) ready in %.2f s", model.version, model.backend, model.source.name,
                 time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - readiness stays 503 and says why; liveness stays 200
        state.load_error = str(e) if isinstance(e, StropError) else f"{type(e).__name__}: {e}"
        log.error("model failed to load: %s", state.load_error)


def install_drain_handler(state: ServerState, drain_s: float) -> None:
    """Wrap the server's SIGTERM/SIGINT handlers: drain first (ready -> 503), then hand over after drain_s."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals can only be handled in the main thread (an app run inside a test thread)
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum, frame, previous=previous):
            if state.draining:  # second signal: no more draining (uvicorn's shutdown starts now)
                previous(signum, frame)
                return
            log.info("received signal %d: readiness is now 503; closing the listener in %.1f s, then waiting for "
                     "in-flight requests", signum, drain_s)
            state.drain()
            if drain_s > 0:
                threading.Timer(drain_s, previous, (signum, None)).start()
            else:
                previous(signum, frame)

        signal.signal(sig, handler)


def _served_task(path: str | Path, cfg: ServeConfig, loaded: LoadedModel | None):
    """(strop.json, task) of what is served, or None when its strop.json cannot be read here: the background load
    then fails too, and readiness says why."""
    try:
        meta = loaded.predictor.meta if loaded else served_meta(path, cfg.backend)
        return meta, get_task(meta["task"])
    except (StropError, OSError, ValueError, KeyError):
        return None


def create_app(path: str | Path, cfg: ServeConfig, loaded: LoadedModel | None = None,
               handle_signals: bool = True) -> FastAPI:
    """The ASGI app serving the run (or export) at `path`; the model loads in the background after startup.
    handle_signals: drain on SIGTERM (off where the host handles shutdown itself, as Ray Serve does)."""
    telemetry = Telemetry()
    state = ServerState(cfg, telemetry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if handle_signals:
            install_drain_handler(state, cfg.drain_s)
        # the model thread holds the GIL between kernels; with the default 5 ms switch interval every socket read of
        # the event loop waits up to 5 ms for it (convoy effect), which made 429s take ~0.5 s under load
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        loader = asyncio.create_task(_load(state, Path(path), loaded))
        yield
        loader.cancel()
        if state.batcher is not None:
            await state.batcher.stop()
        if state.decoder is not None:
            await state.decoder.stop()

    api_key = read_api_key(cfg.api_key_file) if cfg.api_key_file else None
    app = FastAPI(title="strop serve", version=__version__, lifespan=lifespan,
                  description="Predictions from a model fine-tuned with strop. Send 'Authorization: Bearer KEY' "
                  "when the server was started with an API key (health probes need none).")
    app.state.strop = state
    served = _served_task(path, cfg, loaded)
    keyed = api_key is not None
    _routes(app, state, keyed)
    body_routes = _task_routes(app, path, state, keyed, served)
    _handlers(app)
    state.body_limit = body_limit(cfg, served is not None and served[1].takes_images)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=state.body_limit,
                       admission=state.admission, body_timeout_s=cfg.body_timeout_s, body_routes=body_routes)
    app.add_middleware(MetricsMiddleware, telemetry=telemetry)  # outermost: counts the guard's answers too
    return app


def _task_routes(app: FastAPI, path, state: ServerState, keyed: bool, served) -> dict:
    """The routes of the served task's inputs (texts, images, or OpenAI's for a model that generates); returns
    the guard's body routes: (method, path) -> the media types each takes."""
    meta, task = served or (None, None)
    if task is not None and task.generates:
        add_openai_routes(app, path, state, _auth(keyed), keyed, lambda: _require_ready(state))
        return {("POST", "/v1/chat/completions"): (JSON,), ("POST", "/v1/completions"): (JSON,)}
    if task is not None and task.takes_images:
        add_image_route(app, state, _auth(keyed), keyed, lambda: _require_ready(state))
        return {("POST", "/v1/predict"): (JSON, MULTIPART)}
    _predict_route(app, state, keyed)
    publish_request_schema(app, None if task is None else published_request(meta, state.cfg.max_inputs,
                                                                            task.takes_words))
    return {("POST", "/v1/predict"): (JSON,)}


def _auth(keyed: bool) -> list:
    """Route dependencies that declare the Bearer scheme in the document; GuardMiddleware does the checking."""
    return [Security(HTTPBearer(auto_error=False))] if keyed else []


def _predict_route(app: FastAPI, state: ServerState, keyed: bool) -> None:
    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True,
              dependencies=_auth(keyed),
              responses=error_responses(PREDICT_ERRORS, keyed, retry_on_503=True))
    async def predict(body: PredictRequest) -> PredictResponse:
        """Predict labels (and scores) for one or many inputs; inputs of concurrent requests are batched."""
        return await _predict(state, body)


def _routes(app: FastAPI, state: ServerState, keyed: bool) -> None:
    """The routes every server has. keyed: the server has an API key, so every route but the health probes declares
    the Bearer scheme and 401."""
    auth = _auth(keyed)

    @app.get("/v1/model", response_model=ModelInfo, responses=error_responses((503,), keyed, retry_on_503=True),
             dependencies=auth)
    async def model_info() -> ModelInfo:
        """What is served: task, labels, version and the hash of the run's config."""
        m = _require_ready(state)
        meta, cfg = m.predictor.meta, state.cfg
        image = meta.get("image")
        limits = {"max_inputs": cfg.max_inputs, "max_body_bytes": state.body_limit,
                  "max_batch_tokens": cfg.max_batch_tokens, "max_wait_ms": cfg.max_wait_ms,
                  "max_concurrency": cfg.max_concurrency}
        if image:
            limits["max_image_pixels"] = cfg.max_image_pixels
        return ModelInfo(task=meta["task"], labels=meta["labels"], version=m.version, config_hash=m.config_hash,
                         backend=m.backend, precision=m.precision, device=m.device, source=m.source.name,
                         max_length=meta.get("max_length"), image_size=image["size"] if image else None,
                         text_pair=bool(meta.get("text_pair_column")), strop_version=__version__, limits=limits)

    @app.get("/health/live", response_model=Health)
    async def live() -> Health:
        """200 while the process can answer."""
        return Health(status="alive")

    @app.get("/health/ready", response_model=Health, responses=error_responses((503,), keyed=False))
    async def ready():
        """200 once the model is loaded and warm; 503 before that and from SIGTERM on."""
        if state.ready and not state.draining:
            return Health(status="ready")
        reason = ("draining: shutting down" if state.draining else
                  f"model failed to load: {state.load_error}" if state.load_error else "model is loading")
        return _error(503, "not_ready", reason)

    text = {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}

    @app.get("/metrics", response_class=Response, responses={200: text, **error_responses((), keyed)},
             dependencies=auth)
    async def metrics() -> Response:
        """Prometheus text exposition (strop_* metrics)."""
        queue = state.batcher or state.decoder
        state.telemetry.queue_depth.set(queue.depth if queue else 0)
        data, content_type = state.telemetry.exposition()
        return Response(data, media_type=content_type)


def _require_ready(state: ServerState) -> LoadedModel:
    if state.model is None or not state.ready:
        message = f"model failed to load: {state.load_error}" if state.load_error else \
            "the model is still loading; retry shortly (GET /health/ready says when)"
        raise ApiError(503, "not_ready", message, {"Retry-After": str(state.cfg.retry_after_s)})
    return state.model


async def _predict(state: ServerState, body: PredictRequest) -> PredictResponse:
    model = _require_ready(state)
    if model.predictor.task.takes_words:  # entities (raw texts or pre-split words)
        return await predict_entities(state, model, body)
    return await predict_classes(state, model, body)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        bad_json = next((x for x in errors if x.get("type") == "json_invalid"), None)
        if bad_json is not None:
            where = bad_json.get("loc", ("body", "?"))[-1]
            reason = (bad_json.get("ctx") or {}).get("error", "JSON decode error")
            return _error(400, "malformed_json", f"the body is not valid JSON ({reason} at character {where}); "
                          "send a JSON object such as {\"inputs\": [\"hello\"]}")
        # the offending input is not echoed back: it may be megabytes long, or personal data
        details = [{"loc": [str(p) for p in x.get("loc", ())], "msg": x.get("msg", ""), "type": x.get("type", "")}
                   for x in errors[:20]]
        first = details[0] if details else {"loc": [], "msg": "invalid"}
        example = BODY_EXAMPLES.get(request.url.path, '{"inputs": ["text", ...]}')
        return _error(422, "schema_violation", f"the body does not match the API schema: {'.'.join(first['loc'])}: "
                      f"{first['msg']} (see /openapi.json; expected {example})", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        allow = (getattr(e, "headers", None) or {}).get("Allow", "")
        routes = ", ".join(r.path for r in request.app.routes if r.path.startswith(("/v1/", "/health", "/metrics")))
        messages = {404: f"no route {request.url.path}; the API has {routes}",
                    405: f"{request.method} is not allowed on {request.url.path}; it takes {allow}",
                    400: "the body could not be parsed as JSON; send a JSON object such as {\"inputs\": [\"hello\"]}"}
        code = {404: "not_found", 405: "method_not_allowed", 400: "malformed_json"}.get(e.status_code, "http_error")
        return _error(e.status_code, code, messages.get(e.status_code, str(e.detail)), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal_error", "the server failed on this request; the server log has the details")
