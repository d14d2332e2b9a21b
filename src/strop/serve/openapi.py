"""The OpenAPI document a server publishes (/openapi.json): what this server does, status by status.

Every route lists each error status it can answer with the error body's schema (ErrorResponse), 401 only where the
server was started with an API key, and the headers those answers always carry (Allow on a 405 is not listed: a
method a route lacks has no operation to list it under). The body of POST /v1/predict is the served model's own
(schema.published_request; an image model's two bodies: schema.published_image_schemas), so a request the
document calls valid is one the server accepts; an OpenAPI fuzzer (schemathesis,
tests/serve/test_serve_conformance.py) checks both directions.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from strop.serve.schema import ErrorResponse

ERROR_TEXTS = {
    400: "empty input, a value out of range, malformed JSON / multipart / base64, or an undecodable image",
    401: "missing or wrong API key",
    404: "the body names a model this server does not serve (GET /v1/models lists it)",
    408: "the body did not arrive in time",
    413: "body, input count or an image's pixel count over the limit",
    415: "content type is not one the route takes (JSON; image models also multipart/form-data)",
    422: "schema violation, or a text longer than the model allows without truncate",
    429: "too many requests in flight; retry after Retry-After seconds",
    503: "model not ready",
}
HEADERS = {
    401: {"WWW-Authenticate": {"description": "the scheme to authenticate with: Bearer", "required": True,
                               "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before retrying (serve.retry_after_s)", "required": True,
                          "schema": {"type": "integer", "minimum": 0}}},
}
RETRY_AFTER_503 = {"Retry-After": {"description": "seconds to wait before retrying (serve.retry_after_s)",
                                   "required": True, "schema": {"type": "integer", "minimum": 0}}}
PREDICT_ERRORS = (400, 408, 413, 415, 422, 429, 503)
REQUEST_SCHEMAS = ("PredictRequest", "TextInput", "TokensInput")  # the validating models, every input kind


def error_responses(statuses: tuple[int, ...], keyed: bool, retry_on_503: bool = False) -> dict:
    """FastAPI `responses=` for these error statuses, plus 401 when the route needs the server's API key.
    retry_on_503: the route's 503 carries Retry-After (routes that wait for the model; readiness answers without)."""
    out = {}
    for status in sorted({*statuses, *((401,) if keyed else ())}):
        out[status] = {"model": ErrorResponse, "description": ERROR_TEXTS[status]}
        headers = RETRY_AFTER_503 if status == 503 and retry_on_503 else HEADERS.get(status)
        if headers:
            out[status]["headers"] = headers
    return out


def publish_schemas(app: FastAPI, schemas: dict[str, dict]) -> None:
    """Make app.openapi() hold `schemas` in components/schemas (bodies a route reads itself and documents with
    openapi_extra, as the image route's two bodies)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            generate()["components"]["schemas"].update(schemas)
        return generate()  # FastAPI's method returns the document it built (and changed here) once

    app.openapi = openapi


def request_body(bodies: dict[str, str]) -> dict:
    """An operation's requestBody (for openapi_extra): media type -> the name of its schema in components."""
    content = {media: {"schema": {"$ref": f"#/components/schemas/{name}"}} for media, name in bodies.items()}
    return {"requestBody": {"required": True, "content": content}}


def publish_request_schema(app: FastAPI, request_model: type[BaseModel] | None) -> None:
    """Make app.openapi() document `request_model` as the body of POST /v1/predict (None: leave PredictRequest,
    which takes every input kind, as when the model's strop.json could not be read)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None and request_model is not None:
            schemas = generate()["components"]["schemas"]
            for name in REQUEST_SCHEMAS:
                schemas.pop(name, None)
            body = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas["PredictRequest"] = body
        return generate()  # FastAPI's method returns the document it built (and changed here) once

    app.openapi = openapi
