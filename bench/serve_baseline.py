"""The baseline of bench/serve.py: a plain FastAPI endpoint calling a `transformers` pipeline once per request — the
hand-written server strop serve replaces. Same model folder, same truncation as strop.

    python bench/serve_baseline.py MODEL_DIR MAX_LENGTH PORT [DEVICE]     # DEVICE: cpu (default) or cuda
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline


class Item(BaseModel):
    text: str


def main() -> None:
    model_dir, max_length, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    classify = pipeline("text-classification", model=model_dir, tokenizer=model_dir, device=device)
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict(item: Item):  # a sync endpoint: FastAPI runs it in its thread pool, one pipeline call per request
        out = classify(item.text, truncation=True, max_length=max_length)[0]
        return {"label": out["label"], "score": out["score"]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
