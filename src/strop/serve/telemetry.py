"""Prometheus metrics, `strop_` prefix, base units (seconds, bytes). Label values are bounded: the route label is
the route's template (or "unmatched"), never the raw path, and status is the numeric code.

Each server process keeps its own registry; with --workers N every worker answers /metrics for itself (scrape each
worker, or run one worker per container, as is usual with Prometheus).
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SPEED_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Telemetry:
    """The server's metrics in their own registry (several apps in one process do not collide)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("strop_http_requests", "HTTP requests answered, by route template, method and "
                                "status code", ["route", "method", "status"], registry=r)
        self.latency = Histogram("strop_http_request_duration_seconds", "wall time from request start to the end "
                                 "of the response, by route template and status class (2xx, 4xx, 5xx)",
                                 ["route", "status_class"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("strop_batch_size_inputs", "inputs per model forward pass",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("strop_batch_padded_tokens", "padded tokens per forward pass (inputs x "
                                      "longest input)", buckets=(64, 256, 1024, 4096, 16384, 65536), registry=r)
        self.batch_seconds = Histogram("strop_batch_duration_seconds", "model time per forward pass",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.inputs = Counter("strop_inputs", "inputs predicted", registry=r)
        self.queue_depth = Gauge("strop_queue_depth_inputs", "inputs waiting for a batch (generation: requests "
                                 "waiting to join the decoding batch)", registry=r)
        self.inflight = Gauge("strop_inflight_requests", "prediction requests admitted and not yet answered",
                              registry=r)
        self.rejected = Counter("strop_rejected_requests", "prediction requests refused with 429 (queue full)",
                                registry=r)
        self.model_load = Gauge("strop_model_load_seconds", "time to load and warm up the model", registry=r)
        self.ready = Gauge("strop_ready", "1 when the model is loaded and warm and the server is not draining",
                           registry=r)
        self._generation_metrics(r)

    def _generation_metrics(self, r: CollectorRegistry) -> None:
        """Generation (the OpenAI-compatible routes): what serve.decode.DecodeScheduler reports."""
        self.ttft = Histogram("strop_time_to_first_token_seconds", "from a generation request's arrival at the "
                              "decoder to its first token (queueing and prefill)", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.token_speed = Histogram("strop_generation_tokens_per_second", "per request: generated tokens / seconds "
                                     "from its first token to its last", buckets=SPEED_BUCKETS, registry=r)
        self.prompt_tokens = Counter("strop_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("strop_completion_tokens", "tokens generated (usage.completion_tokens)",
                                         registry=r)
        self.step_rows = Histogram("strop_decode_step_sequences", "sequences one decode step advanced (above 1: "
                                   "concurrent requests shared the forward pass)", buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("strop_decode_step_seconds", "model time per decode step",
                                      buckets=LATENCY_BUCKETS, registry=r)

    def on_batch(self, inputs: int, padded_tokens: int, seconds: float) -> None:
        self.batch_size.observe(inputs)
        self.batch_tokens.observe(padded_tokens)
        self.batch_seconds.observe(seconds)
        self.inputs.inc(inputs)

    # the decode scheduler's observer (serve.decode.Observer)

    def decode_step(self, rows: int, seconds: float) -> None:
        self.step_rows.observe(rows)
        self.step_seconds.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        if completion_tokens > 1 and seconds > 0:  # a rate needs two tokens: the first one's time is the TTFT
            self.token_speed.observe((completion_tokens - 1) / seconds)

    def waiting(self, n: int) -> None:
        self.queue_depth.set(n)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts every response (including the guard's 401/413/415) with its route template and latency."""

    def __init__(self, app, telemetry: Telemetry):
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), None

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        failed = True
        try:
            await self.app(scope, receive, send_wrapper)
            failed = False
        finally:
            if status is None:  # no answer sent: our failure (500), or the client left first (499, as nginx logs it)
                status = 500 if failed else 499
            route = route_label(scope)
            self.telemetry.requests.labels(route, scope["method"] if scope["method"] in KNOWN_METHODS else "other",
                                           str(status)).inc()
            self.telemetry.latency.labels(route, f"{status // 100}xx").observe(time.perf_counter() - start)


KNOWN_METHODS = {"GET", "POST", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"}
ROUTES = ("/v1/predict", "/v1/model", "/health/live", "/health/ready", "/metrics", "/openapi.json", "/docs",
          "/v1/chat/completions", "/v1/completions", "/v1/models")


def route_label(scope) -> str:
    """A bounded label: one of our route templates, else 'unmatched' (never the raw, user-chosen path)."""
    route = scope.get("route")
    path = getattr(route, "path", None) or scope.get("path", "")
    return path if path in ROUTES else "unmatched"
