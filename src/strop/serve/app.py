"""The HTTP API: routes, error mapping and the model's life cycle (load and warm up in the background; ready after).

    POST /v1/predict   inputs -> predictions (dynamic batching)      GET /v1/model    task, labels, version, hash
    GET /health/live   the process answers                           GET /health/ready  503 until loaded and warm,
    GET /metrics       Prometheus text                                                  and again while draining
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
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
from strop.serve.backend import LoadedModel, load_model_for_serving, run_batch
from strop.serve.batcher import Batcher
from strop.serve.guard import Admission, GuardMiddleware, error_body, mask_pii
from strop.serve.schema import (
    ErrorResponse,
    Health,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    TokensInput,
)
from strop.serve.settings import ServeConfig, read_api_key
from strop.serve.telemetry import MetricsMiddleware, Telemetry

log = logging.getLogger("strop.serve")
SWITCH_INTERVAL_S = 0.0005
INLINE_TOKENIZE_CHARS = 2000
WORD = re.compile(r"\S+")
WARMUP_TEXTS = ["warm up", "warming up the model with a somewhat longer sentence of several words " * 4]


class ApiError(Exception):
    """An error answered as {"error": {...}} with this status."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _error(status: int, code: str, message: str, headers: dict | None = None, **extra) -> Response:
    return Response(error_body(status, code, message, **extra), status, headers, media_type="application/json")


class ServerState:
    """Everything the routes share; one per app (per worker process)."""

    def __init__(self, cfg: ServeConfig, telemetry: Telemetry):
        self.cfg, self.telemetry = cfg, telemetry
        self.model: LoadedModel | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
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
    pairs = WARMUP_TEXTS if p.meta.get("text_pair_column") else None
    for _ in range(2):
        run_batch(p, WARMUP_TEXTS, pairs)


async def _load(state: ServerState, path: Path, loaded: LoadedModel | None) -> None:
    """Load (in a thread: the event loop keeps answering /health/live), warm up, start the batcher, mark ready."""
    cfg = state.cfg
    try:
        start = time.perf_counter()
        model = loaded or await asyncio.to_thread(load_model_for_serving, path, cfg.backend, cfg.onnx_file,
                                                  cfg.threads, cfg.precision, cfg.device)
        await asyncio.to_thread(_warm_up, model)
        state.telemetry.model_load.set(time.perf_counter() - start)
        state.model = model
        state.batcher = Batcher(lambda inputs, pairs: run_batch(model.predictor, inputs, pairs),
                                cfg.max_batch_tokens, cfg.max_batch_size, cfg.max_wait_ms, cfg.batching,
                                state.telemetry.on_batch, state.telemetry.queue_depth.set)
        state.batcher.start()
        state.set_ready(True)
        log.info("model %s (%s, %s) ready in %.2f s", model.version, model.backend, model.source.name,
                 time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - readiness stays 503 and says why; liveness stays 200
        state.load_error = str(e) if isinstance(e, StropError) else f"{type(e).__name__}: {e}"
        log.error("model failed to load: %s", state.load_error)


def create_app(path: str | Path, cfg: ServeConfig, loaded: LoadedModel | None = None,
               handle_signals: bool = True) -> FastAPI:
    """The ASGI app serving the run (or export) at `path`; the model loads in the background after startup.
    handle_signals: drain on SIGTERM (off where the host handles shutdown itself, as Ray Serve does)."""
    telemetry = Telemetry()
    state = ServerState(cfg, telemetry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from strop.serve.server import install_drain_handler

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

    app = FastAPI(title="strop serve", version=__version__, lifespan=lifespan,
                  description="Predictions from a model fine-tuned with strop. Send 'Authorization: Bearer KEY' "
                  "when the server was started with an API key (health probes need none).")
    app.state.strop = state
    _routes(app, state)
    _handlers(app)
    api_key = read_api_key(cfg.api_key_file) if cfg.api_key_file else None
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=cfg.max_body_bytes,
                       admission=state.admission, body_timeout_s=cfg.body_timeout_s)
    app.add_middleware(MetricsMiddleware, telemetry=telemetry)  # outermost: counts the guard's answers too
    return app


ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in {
    400: "empty input or malformed JSON", 401: "missing or wrong API key", 408: "the body did not arrive in time",
    413: "body or input count over the limit",
    415: "content type is not JSON", 422: "schema violation, or a text longer than the model allows without "
    "truncate", 429: "too many requests in flight; retry after Retry-After seconds", 503: "model not ready"}.items()}


def _routes(app: FastAPI, state: ServerState) -> None:
    bearer = HTTPBearer(auto_error=False)  # documents the scheme; GuardMiddleware does the checking

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=ERRORS,
              dependencies=[Security(bearer)])
    async def predict(body: PredictRequest) -> PredictResponse:
        """Predict labels (and scores) for one or many inputs; inputs of concurrent requests are batched."""
        return await _predict(state, body)

    @app.get("/v1/model", response_model=ModelInfo, responses={503: ERRORS[503]}, dependencies=[Security(bearer)])
    async def model_info() -> ModelInfo:
        """What is served: task, labels, version and the hash of the run's config."""
        m = _require_ready(state)
        meta, cfg = m.predictor.meta, state.cfg
        return ModelInfo(task=meta["task"], labels=meta["labels"], version=m.version, config_hash=m.config_hash,
                         backend=m.backend, precision=m.precision, device=m.device, source=m.source.name,
                         max_length=meta["max_length"],
                         text_pair=bool(meta.get("text_pair_column")), strop_version=__version__,
                         limits={"max_inputs": cfg.max_inputs, "max_body_bytes": cfg.max_body_bytes,
                                 "max_batch_tokens": cfg.max_batch_tokens, "max_wait_ms": cfg.max_wait_ms,
                                 "max_concurrency": cfg.max_concurrency})

    @app.get("/health/live", response_model=Health)
    async def live() -> Health:
        """200 while the process can answer."""
        return Health(status="alive")

    @app.get("/health/ready", response_model=Health, responses={503: ERRORS[503]})
    async def ready():
        """200 once the model is loaded and warm; 503 before that and from SIGTERM on."""
        if state.ready and not state.draining:
            return Health(status="ready")
        reason = ("draining: shutting down" if state.draining else
                  f"model failed to load: {state.load_error}" if state.load_error else "model is loading")
        return _error(503, "not_ready", reason)

    @app.get("/metrics", response_class=Response, dependencies=[Security(bearer)])
    async def metrics() -> Response:
        """Prometheus text exposition (strop_* metrics)."""
        state.telemetry.queue_depth.set(state.batcher.depth if state.batcher else 0)
        data, content_type = state.telemetry.exposition()
        return Response(data, media_type=content_type)


def _require_ready(state: ServerState) -> LoadedModel:
    if state.model is None or not state.ready:
        message = f"model failed to load: {state.load_error}" if state.load_error else \
            "the model is still loading; retry shortly (GET /health/ready says when)"
        raise ApiError(503, "not_ready", message, {"Retry-After": str(state.cfg.retry_after_s)})
    return state.model


def check_input_count(body: PredictRequest, max_inputs: int) -> None:
    """An empty request is a 400, more than serve.max_inputs inputs a 413 (every task's request)."""
    n = len(body.inputs)
    if n == 0:
        raise ApiError(400, "empty_input", "inputs is empty; send at least one text, e.g. {\"inputs\": [\"hello\"]}")
    if n > max_inputs:
        raise ApiError(413, "too_many_inputs", f"{n} inputs in one request; the limit is {max_inputs} "
                       "(serve.max_inputs): split them over several requests")


def _normalise(body: PredictRequest, pair_model: bool, max_inputs: int) -> tuple[list[str], list[str] | None]:
    """Request inputs -> (texts, pairs or None); counts and empty texts are checked here (413 / 400 / 422)."""
    check_input_count(body, max_inputs)
    texts, pairs = [], []
    for i, item in enumerate(body.inputs):
        if isinstance(item, TokensInput):
            raise ApiError(422, "wrong_input_kind", f"inputs[{i}] gives tokens, but this model classifies whole "
                           "texts; send a string or {\"text\": ...}")
        text, pair = (item, None) if isinstance(item, str) else (item.text, item.text_pair)
        if pair_model and pair is None:
            raise ApiError(422, "missing_text_pair", f"inputs[{i}]: this model classifies text pairs; send "
                           "{\"text\": ..., \"text_pair\": ...}")
        if not pair_model and pair is not None:
            raise ApiError(422, "unexpected_text_pair", f"inputs[{i}] has a text_pair, but this model classifies "
                           "single texts; send only \"text\"")
        for name, value in (("text", text), ("text_pair", pair)):
            if value is not None and not value.strip():
                raise ApiError(400, "empty_input", f"inputs[{i}] {name} is empty; every input needs some text")
            if value is not None and not _encodable(value):
                raise ApiError(422, "invalid_text", f"inputs[{i}] {name} holds an unpaired UTF-16 surrogate "
                               "(a \\ud800-\\udfff escape without its pair); send valid Unicode text")
        texts.append(text)
        pairs.append(pair)
    return texts, pairs if pair_model else None


def clip_words(text: str, n: int) -> tuple[str, bool]:
    """(text up to the end of its n-th whitespace-separated word, whether anything but whitespace was cut)."""
    end = 0
    for i, match in enumerate(WORD.finditer(text)):
        if i == n:
            return text[:end], True
        end = match.end()
    return text, False


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _token_counts(model: LoadedModel, texts: list[str], pairs: list[str] | None) -> list[int]:
    """Tokens per input with special tokens, before truncation."""
    enc = model.predictor.tokenizer(texts, pairs, truncation=False, verbose=False, return_attention_mask=False,
                                    return_token_type_ids=False)
    return [len(ids) for ids in enc["input_ids"]]


async def _fit(model: LoadedModel, texts: list[str], pairs: list[str] | None,
               limit: int) -> tuple[list[str], list[str] | None, list[int], set[int]]:
    """(texts, pairs, tokens per input, indices cut), each input cut to its first `limit` words where longer.

    A word is nearly always at least one token, so an input with more words than `limit` is too long, and with
    truncation only its first `limit` words can reach the model: cutting there first keeps a 1 MB text from costing
    100+ MB of tokenizer memory. Words the tokenizer drops (zero-width or control characters) break the rule: an
    input cut yet still within `limit` tokens is counted again whole, so it is neither refused nor cut wrongly.
    """
    clipped = [clip_words(t, limit) for t in texts]
    clipped_pairs = [clip_words(t, limit) for t in pairs] if pairs is not None else None
    cut = {i for i, (_, c) in enumerate(clipped) if c} | {i for i, (_, c) in enumerate(clipped_pairs or []) if c}
    short = [t for t, _ in clipped]
    short_pairs = [t for t, _ in clipped_pairs] if clipped_pairs is not None else None
    size = sum(map(len, short)) + sum(map(len, short_pairs or []))
    # short inputs (the usual request) are counted on the event loop: a thread hop costs more than tokenizing them
    counts = _token_counts(model, short, short_pairs) if size <= INLINE_TOKENIZE_CHARS else \
        await asyncio.to_thread(_token_counts, model, short, short_pairs)
    redo = sorted(i for i in cut if counts[i] <= limit)
    if redo:
        whole = [texts[i] for i in redo]
        whole_pairs = [pairs[i] for i in redo] if pairs is not None else None
        for i, c in zip(redo, await asyncio.to_thread(_token_counts, model, whole, whole_pairs)):
            counts[i], short[i] = c, texts[i]
            if short_pairs is not None:
                short_pairs[i] = pairs[i]
            cut.discard(i)
    return short, short_pairs, counts, cut


async def _predict(state: ServerState, body: PredictRequest) -> PredictResponse:
    model = _require_ready(state)
    cfg, meta = state.cfg, model.predictor.meta
    if meta["task"] == "token_classification":
        from strop.serve.entities import predict_entities

        return await predict_entities(state, model, body)
    texts, pairs = _normalise(body, bool(meta.get("text_pair_column")), cfg.max_inputs)
    if cfg.mask_pii:
        texts = [mask_pii(t) for t in texts]
        pairs = [mask_pii(t) for t in pairs] if pairs is not None else None
    limit = meta["max_length"]
    texts, pairs, counts, cut = await _fit(model, texts, pairs, limit)
    too_long = {i for i, c in enumerate(counts) if c > limit}
    if too_long and not body.truncate:
        i = min(too_long)
        size = f"more than {limit}" if i in cut else str(counts[i])
        raise ApiError(422, "input_too_long", f"inputs[{i}] has {size} tokens; this model takes at most {limit}: "
                       "shorten it, or send \"truncate\": true to cut it")
    if cfg.log_inputs:
        for i, text in enumerate(texts):
            log.info("input %d: %s", i, mask_pii(text if pairs is None else f"{text} ||| {pairs[i]}"))
    outputs = await state.batcher.submit(texts, pairs, [min(c, limit) for c in counts])
    for i in too_long:
        outputs[i] = {**outputs[i], "truncated": True}
    return PredictResponse(model=model.version, task=meta["task"], predictions=outputs)


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
        return _error(422, "schema_violation", f"the body does not match the API schema: {'.'.join(first['loc'])}: "
                      f"{first['msg']} (see /openapi.json; expected {{\"inputs\": [\"text\", ...]}})", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        messages = {404: f"no route {request.url.path}; the API has /v1/predict, /v1/model, /health/live, "
                    "/health/ready, /metrics", 405: f"{request.method} is not allowed on {request.url.path}",
                    400: "the body could not be parsed as JSON; send a JSON object such as {\"inputs\": [\"hello\"]}"}
        code = {404: "not_found", 405: "method_not_allowed", 400: "malformed_json"}.get(e.status_code, "http_error")
        return _error(e.status_code, code, messages.get(e.status_code, str(e.detail)), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal_error", "the server failed on this request; the server log has the details")
