"""Request and response bodies of the HTTP API (pydantic; they are also the OpenAPI schema).

Inputs are plain texts, text pairs, or pre-split tokens (token classification, task `token_classification`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr


class TextInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr = Field(description="the text (first text of a pair)")
    text_pair: StrictStr | None = Field(None, description="second text, for models trained on text pairs")


class TokensInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[StrictStr] = Field(description="pre-split words, for token-classification (NER) models")


Input = StrictStr | TextInput | TokensInput


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"inputs": ["I was charged twice", {"text": "a man plays", "text_pair": "someone plays"}]}]})
    inputs: list[Input] = Field(description="one or more inputs: a string, {text, text_pair} or {tokens} ({tokens} "
                                "and no text_pair for token-classification models); at least 1, at most "
                                "serve.max_inputs (else 400 / 413)")
    truncate: StrictBool = Field(False, description="cut inputs longer than the model's max_length instead of "
                                 "answering 422")


class Entity(BaseModel):
    text: str = Field(description="the entity's text: source[start:end]")
    type: str = Field(description="entity type, e.g. PER (the tag without its B-/I- prefix)")
    start: int = Field(description="first character of the span in the input text (for {tokens} inputs: in the "
                       "tokens joined by single spaces)")
    end: int = Field(description="one past the last character")
    score: float = Field(description="mean probability of the entity's word tags")


class Prediction(BaseModel):
    label: str | None = Field(None, description="single-label: the most probable label")
    score: float | None = Field(None, description="single-label: its probability")
    labels: list[str] | None = Field(None, description="multi-label: labels at or above the saved threshold")
    probs: dict[str, float] | None = Field(None, description="probability of every label")
    value: float | None = Field(None, description="regression: the predicted value")
    entities: list[Entity] | None = Field(None, description="token classification: entity spans")
    tags: list[str] | None = Field(None, description="token classification of {tokens} inputs: one tag per word, in "
                                   "the training files' scheme")
    truncated: bool | None = Field(None, description="true when the input was cut to max_length")


class PredictResponse(BaseModel):
    model: str = Field(description="model version (run name @ weights hash)")
    task: str
    predictions: list[Prediction] = Field(description="one per input, in input order")


class ModelInfo(BaseModel):
    task: str
    labels: list[str]
    version: str
    config_hash: str = Field(description="sha256 of the run's resolved config.yaml")
    backend: str
    precision: str = Field(description="torch: fp32 or bf16; onnx: fp32 or int8")
    device: str = Field(description="where the model runs: cpu or cuda")
    source: str = Field(description="file name the weights came from")
    max_length: int
    text_pair: bool = Field(description="whether inputs must be text pairs")
    strop_version: str
    limits: dict[str, int | float]


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str = Field(description="what was wrong and what to do")
    details: list[dict] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str
