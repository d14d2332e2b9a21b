"""`strop serve`: an HTTP API for a finished run or its ONNX export.

app.py (routes, life cycle), classify.py, entities.py and images.py (POST /v1/predict for classification, token
classification and images), inputs.py (the input checks both share), schema.py (request and response bodies), openapi.py (the
published document), batcher.py (dynamic batching), guard.py (auth, limits, PII masking), telemetry.py (Prometheus),
backend.py (torch or ONNX Runtime behind strop.predict.Predictor), settings.py (the typed `serve:` config),
server.py (uvicorn: loopback by default, workers, graceful shutdown).
"""

from __future__ import annotations

from strop.errors import StropError


def require_serve_extra() -> None:
    """Fail with the fix when the optional serving dependencies are missing."""
    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise StropError(f"strop serve needs {', '.join(missing)}: pip install 'strop[serve]'")
