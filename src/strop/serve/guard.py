"""What stands between the network and the model: API keys, body limits, content types, and PII masking.

GuardMiddleware is plain ASGI so it acts before any route reads the body: a body over the limit is refused on its
Content-Length (or once the streamed bytes pass the limit) without being read in full.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re

# --------------------------------------------------------------------------------------------------------------
# PII masking: our own patterns, each candidate checked (Luhn for cards, mod-97 for IBANs, ipaddress for IPs), so
# order numbers and dates are not masked as cards; the spaCy models Presidio would download are not available here.

EMAIL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]){11,30}\b")
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]*\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{2,5}(?:[ .-]?\d{2,5}){1,5}(?![\w])")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters -> 10..35, the number mod 97 is 1."""
    s = re.sub(r"[ -]", "", text).upper()
    if not 15 <= len(s) <= 34:
        return False
    digits = "".join(str(int(c, 36)) for c in s[4:] + s[:4])
    return int(digits) % 97 == 1


def _ip_ok(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _phone_ok(text: str) -> bool:
    digits = sum(c.isdigit() for c in text)
    # a phone number has 7..15 digits (E.164) and is written with a + or separators, not as one run of digits
    return 7 <= digits <= 15 and (text.startswith("+") or "(" in text or bool(re.search(r"\d[ .-]\d", text)))


def _sub(pattern: re.Pattern, tag: str, check, text: str) -> str:
    return pattern.sub(lambda m: tag if check(m.group(0)) else m.group(0), text)


def mask_pii(text: str) -> str:
    """Replace emails, IBANs, card numbers, IP addresses and phone numbers with <EMAIL>, <IBAN>, <CREDIT_CARD>,
    <IP_ADDRESS>, <PHONE>."""
    text = _sub(EMAIL, "<EMAIL>", lambda s: True, text)
    text = _sub(IBAN, "<IBAN>", iban_ok, text)
    text = _sub(CARD, "<CREDIT_CARD>", lambda s: luhn_ok(re.sub(r"\D", "", s)), text)
    text = _sub(IPV4, "<IP_ADDRESS>", _ip_ok, text)
    text = _sub(IPV6, "<IP_ADDRESS>", lambda s: s.count(":") >= 2 and _ip_ok(s), text)
    return _sub(PHONE, "<PHONE>", _phone_ok, text)


class MaskingFilter(logging.Filter):
    """Masks PII in every log record that passes the handler it is attached to (message and arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not leak the raw arguments either
            message = str(record.msg)
        record.msg, record.args = mask_pii(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_pii(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = mask_pii(record.exc_text)
        record.exc_info = None
        return True


def configure_logging(level: int = logging.INFO) -> None:
    """One stderr handler on the root logger with PII masking; uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(MaskingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


# --------------------------------------------------------------------------------------------------------------
# errors and the ASGI guard


def error_body(status: int, code: str, message: str, **extra) -> bytes:
    """The JSON every error response carries: {"error": {"status", "code", "message", ...}}."""
    return json.dumps({"error": {"status": status, "code": code, "message": message, **extra}}).encode()


async def send_error(send, status: int, code: str, message: str, headers: dict | None = None) -> None:
    body = error_body(status, code, message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _non_json_constant(text: str) -> str | None:
    """NaN, Infinity or -Infinity outside strings (Python's json module, and so FastAPI, accepts them), else None."""
    if "NaN" not in text and "Infinity" not in text:  # the usual body: no parse here
        return None
    found = []

    def refuse(name):
        found.append(name)
        return None

    try:
        json.loads(text, parse_constant=refuse)
    except ValueError:
        return None  # malformed anyway: FastAPI's parser answers with where
    return found[0] if found else None


JSON, MULTIPART = "application/json", "multipart/form-data"
SEND_AS = {JSON: "JSON with 'Content-Type: application/json'",
           MULTIPART: "files with 'Content-Type: multipart/form-data' (e.g. curl -F image=@x.png)"}


def media_type(content_type: str) -> str:
    """'Multipart/Form-Data; boundary=x' -> 'multipart/form-data'."""
    return content_type.split(";", 1)[0].strip().lower()


def _is_json(content_type: str) -> bool:
    media = media_type(content_type)
    return media == JSON or (media.startswith("application/") and media.endswith("+json"))


def _replay(body: bytes, receive):
    """An ASGI `receive` that hands the route the body already read, then waits for the disconnect."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as a server would

    return replay


class Admission:
    """At most `limit` prediction requests in flight (queued or running); the next one is refused at once."""

    def __init__(self, limit: int, retry_after_s: int, on_change=None, on_reject=None):
        self.limit, self.retry_after_s, self.inflight = limit, retry_after_s, 0
        self.on_change, self.on_reject = on_change or (lambda n: None), on_reject or (lambda: None)

    def enter(self) -> bool:
        if self.inflight >= self.limit:
            self.on_reject()
            return False
        self.inflight += 1
        self.on_change(self.inflight)
        return True

    def leave(self) -> None:
        self.inflight -= 1
        self.on_change(self.inflight)


class GuardMiddleware:
    """API key (constant-time), admission (429), JSON content type (415), body limit (413), UTF-8 (400) — in this
    order, before any route runs: a refused request costs no body reading and no model work.

    Health probes stay open without a key so orchestrators can probe; everything else needs it when one is set.
    Only the routes that read a body (`body_routes`: (method, path) -> the media types it accepts, JSON by
    default) are admitted and have their body checked: any other request goes straight to the router, so a method
    a route lacks gets 405 with Allow, and an unknown path 404, whatever its content type. A JSON body is checked
    here (UTF-8, not empty, no NaN); a multipart one only for its size, the route parses it.
    """

    OPEN_PATHS = ("/health/live", "/health/ready")

    def __init__(self, app, api_key: bytes | None, max_body_bytes: int, admission: Admission | None = None,
                 body_timeout_s: float = 30.0, body_routes: dict | None = None):
        self.app, self.api_key, self.max_body_bytes, self.admission = app, api_key, max_body_bytes, admission
        self.body_timeout_s = body_timeout_s
        self.body_routes = body_routes if body_routes is not None else {("POST", "/v1/predict"): (JSON,)}

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        # compare_digest takes the same time wherever the first differing byte is
        return given is not None and hmac.compare_digest(given, self.api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:  # the first of repeated headers wins, as Starlette reads them
            headers.setdefault(name, value)
        if self.api_key is not None and scope["path"] not in self.OPEN_PATHS and not self._authorized(headers):
            return await send_error(send, 401, "unauthorized", "missing or wrong API key; send the header "
                                    "'Authorization: Bearer KEY' (or 'X-API-Key: KEY')",
                                    {"WWW-Authenticate": "Bearer"})
        accepted = self.body_routes.get((scope["method"], scope["path"]))
        if accepted is None:
            return await self.app(scope, receive, send)
        if self.admission is None:
            return await self._checked(scope, receive, send, headers, accepted)
        if not self.admission.enter():
            a = self.admission
            return await send_error(send, 429, "overloaded", f"the server is at its limit of {a.limit} requests in "
                                    f"flight; retry after {a.retry_after_s} s", {"Retry-After": a.retry_after_s})
        try:
            await self._checked(scope, receive, send, headers, accepted)
        finally:
            self.admission.leave()

    async def _checked(self, scope, receive, send, headers, accepted: tuple[str, ...]):
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        media = media_type(content_type)
        if media not in accepted and not (JSON in accepted and _is_json(content_type)):
            return await send_error(send, 415, "unsupported_media_type",
                                    f"content type {content_type or '(none)'!r} is not accepted; send "
                                    f"{' or '.join(SEND_AS[m] for m in accepted)}")
        body = await self._read_body(scope, receive, send, headers)
        if body is None:
            return
        if media == MULTIPART:  # binary parts: the route parses them (serve/images.py)
            return await self.app(scope, _replay(body, receive), send)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await send_error(send, 400, "invalid_utf8", f"the body is not valid UTF-8 (byte {e.start}); "
                                    "encode the JSON as UTF-8")
        if not text.strip():
            return await send_error(send, 400, "malformed_json", "the body is empty; send a JSON object such as "
                                    "{\"inputs\": [\"hello\"]}")
        constant = _non_json_constant(text)
        if constant is not None:
            return await send_error(send, 400, "malformed_json", f"the body is not valid JSON: {constant} is not a "
                                    "JSON value (RFC 8259); send numbers as finite numbers and texts as strings")

        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope, receive, send, headers) -> bytes | None:
        """The whole body, or None after answering 413/408/400. Stops reading as soon as the limit is passed, or
        when the body has not arrived whole within body_timeout_s (a stalled upload must not hold its slot)."""
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        too_large = (f"request body is larger than the limit of {limit} bytes; send fewer or shorter inputs per "
                     "request (serve.max_body_bytes)")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await send_error(send, 400, "bad_content_length", f"Content-Length {declared[:40]!r} is not a number")
                return None
            if length > limit:
                await send_error(send, 413, "body_too_large", too_large, {"Connection": "close"})
                return None
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                await send_error(send, 408, "body_timeout", f"the request body did not arrive within "
                                 f"{self.body_timeout_s:g} s; send it at once (serve.body_timeout_s)",
                                 {"Connection": "close"})
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_error(send, 413, "body_too_large", too_large, {"Connection": "close"})
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
