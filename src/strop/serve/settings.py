"""Typed serving config: code defaults <- the `serve:` section of a YAML file <- `serve.key=value` overrides.

Same rules as the training config (strop.config): one line of doc per field, unknown keys fail naming the nearest.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from strop.config import apply_mapping, doc, nest_key, parse_override, read_yaml
from strop.errors import ConfigError


@dataclass
class ServeConfig:
    host: str = doc("127.0.0.1", "address to bind; anything but loopback needs api_key_file")
    port: int = doc(8000, "TCP port (0 = any free port)")
    workers: int = doc(1, "server processes on this machine, each with its own copy of the model")
    backend: str = doc("torch", "torch = the run's model/ via strop.predict; onnx = RUN/export/*.onnx via ONNX "
                       "Runtime", ("torch", "onnx"))
    onnx_file: str | None = doc(None, "ONNX file inside the export folder; empty = model.int8.onnx if present, "
                                "else model.onnx")
    precision: str = doc("auto", "torch backend: auto = bf16 where the CPU computes it natively (as training "
                         "evaluates: 1.7x the batched throughput here, scores move by ~1e-3), else fp32; fp32 = the "
                         "exact numbers of `strop predict`", ("auto", "bf16", "fp32"))
    device: str = doc("auto", "torch backend: auto = the GPU when one is visible, else the CPU; cpu; cuda (fails at "
                      "start when no GPU is visible). The onnx backend runs on the CPU", ("auto", "cpu", "cuda"))
    threads: int = doc(0, "intra-op threads per worker for inference; 0 = cores / workers - 1 (one core per "
                           "worker stays with its event loop), at least 1")
    api_key_file: str | None = doc(None, "file holding the API key (first line); clients send "
                                   "'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
    max_body_bytes: int | None = doc(None, "largest request body; larger ones get 413 before they are read in "
                                     "full; empty = 1 MiB for text models, 16 MiB for image models (an X-ray PNG is "
                                     "several MB, and base64 in JSON adds a third)")
    max_image_pixels: int = doc(16_777_216, "image models: most pixels (width x height, from the file's header) "
                                "an uploaded image may have; larger ones get 413 before any pixel is decoded "
                                "(a decompression bomb declares billions). Default 4096 x 4096")
    body_timeout_s: float = doc(30.0, "most seconds a request body may take to arrive; slower uploads get 408, so "
                                "stalled clients cannot hold admission slots")
    max_inputs: int = doc(64, "most inputs in one request; more get 413")
    batching: bool = doc(True, "group concurrent requests into batches (false = one request per forward pass)")
    max_batch_tokens: int = doc(8192, "token budget of one batch: inputs x longest input (padded tokens); "
                                "generation: sequences decoding together x longest prompt + max_tokens")
    max_batch_size: int = doc(64, "most inputs in one batch (generation: most sequences sharing a decode step)")
    max_wait_ms: float = doc(5.0, "how long the first input of a batch may wait for batch-mates (only while "
                             "recent batches held several requests: a lone client is not delayed)")
    max_concurrency: int = doc(64, "requests admitted at once (queued or running); more get 429 at once")
    retry_after_s: int = doc(1, "Retry-After seconds sent with 429")
    mask_pii: bool = doc(False, "mask emails, phone, card, IBAN and IP numbers in model inputs (logs: always)")
    log_inputs: bool = doc(False, "log every input (PII-masked) at INFO; for debugging")
    drain_s: float = doc(0.0, "on SIGTERM: seconds to keep serving with /health/ready = 503 (lets a load "
                         "balancer notice) before refusing new connections")
    graceful_timeout_s: float = doc(30.0, "on SIGTERM: most seconds to wait for in-flight requests")
    ray_min_replicas: int = doc(1, "strop serve --ray: fewest replicas of the autoscaling deployment")
    ray_max_replicas: int = doc(2, "strop serve --ray: most replicas of the autoscaling deployment")


TEXT_BODY_BYTES, IMAGE_BODY_BYTES = 1 << 20, 16 << 20  # serve.max_body_bytes when it is empty


def body_limit(cfg: ServeConfig, images: bool) -> int:
    """The request body limit in bytes: serve.max_body_bytes, else the default for the model's inputs."""
    return cfg.max_body_bytes or (IMAGE_BODY_BYTES if images else TEXT_BODY_BYTES)


def _section(mapping: dict, path: Path | None) -> dict:
    """The `serve:` mapping of a YAML file (a full run config may hold other sections; only `serve` is read)."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path} must hold a mapping with a `serve:` section")
    section = mapping.get("serve", {}) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: `serve` must be a mapping of keys, not {section!r}")
    return section


def load_serve_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> ServeConfig:
    """Resolve the serving config; overrides are 'serve.max_wait_ms=2' strings or a {'max_wait_ms': 2} dict."""
    cfg = ServeConfig()
    if path is not None:
        path = Path(path)
        _apply_serve(cfg, _section(read_yaml(path, "serve config file"), path))
    items = overrides.items() if isinstance(overrides, dict) else \
        (parse_override(o, ServeConfig, "serve.") for o in overrides or [])
    for key, value in items:
        key = key.removeprefix("serve.")
        _apply_serve(cfg, nest_key(key, value))
    validate_serve(cfg)
    return cfg


def _apply_serve(cfg: ServeConfig, mapping: dict) -> None:
    names = [f.name for f in dataclasses.fields(ServeConfig)]
    for key in mapping:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean 'serve.{near[0]}'?" if near else "; run `strop serve --help-config` for the list"
            raise ConfigError(f"unknown serve config key 'serve.{key}'{hint}")
    apply_mapping(cfg, mapping, "serve.")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_serve(cfg: ServeConfig) -> None:
    """Value checks; each message names the field and the value."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"serve.{f.name}={getattr(cfg, f.name)!r} is not one of {list(choices)}")
    positive = ("workers", "max_body_bytes", "max_image_pixels", "body_timeout_s", "max_inputs", "max_batch_tokens",
                "max_batch_size", "max_concurrency", "ray_min_replicas", "ray_max_replicas")
    for name in positive:
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise ConfigError(f"serve.{name}={getattr(cfg, name)} must be > 0")
    for name in ("max_wait_ms", "drain_s", "graceful_timeout_s", "threads", "retry_after_s"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"serve.{name}={getattr(cfg, name)} must be >= 0")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"serve.port={cfg.port} must be in 0..65535")
    if cfg.ray_max_replicas < cfg.ray_min_replicas:
        raise ConfigError(f"serve.ray_max_replicas={cfg.ray_max_replicas} must be >= serve.ray_min_replicas="
                          f"{cfg.ray_min_replicas}")
    if cfg.backend == "onnx" and cfg.precision == "bf16":
        raise ConfigError("serve.precision=bf16 applies to the torch backend; an ONNX export's precision is its "
                          "file (model.onnx fp32, model.int8.onnx int8: serve.onnx_file)")
    if cfg.backend == "onnx" and cfg.device == "cuda":
        raise ConfigError("serve.device=cuda applies to the torch backend; the onnx backend runs on ONNX Runtime's "
                          "CPU provider (use --backend torch to serve on the GPU)")
    if cfg.device == "cuda":
        from strop.device import resolve_device

        resolve_device("cuda", "serve.device")
    if not is_loopback(cfg.host) and not cfg.api_key_file:
        raise ConfigError(f"serve.host={cfg.host!r} is not a loopback address: binding it without an API key would "
                          "let anyone on the network use the model; give --api-key-file FILE (or bind 127.0.0.1)")


def read_api_key(path: str | Path) -> bytes:
    """The key from the first line of `path`; an empty or short key is refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"serve.api_key_file={str(path)!r} not found; write the key into that file (one line)")
    lines = path.read_text(encoding="utf-8").splitlines()
    key = lines[0].strip() if lines else ""
    if len(key) < 16:
        raise ConfigError(f"serve.api_key_file={str(path)!r}: the key must be at least 16 characters (got "
                          f"{len(key)}); e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}")
    return key.encode("utf-8")


def help_lines() -> list[tuple[str, str, str]]:
    rows = []
    for f in dataclasses.fields(ServeConfig):
        default = f.default
        text = f.metadata.get("doc", "") + (f" [{'|'.join(f.metadata['choices'])}]" if f.metadata.get("choices")
                                            else "")
        rows.append((f"serve.{f.name}", "" if default is None else repr(default), text))
    return rows
