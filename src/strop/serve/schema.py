"""Request and response bodies of the HTTP API (pydantic; they are also the OpenAPI schema).

Inputs are plain texts, text pairs, or pre-split tokens (token classification, task `token_classification`).
PredictRequest takes every kind, so that the predict routes can answer a wrong kind with a message that names it;
the schema a server publishes is its model's own (`published_request`): only the kinds that model takes, texts with
at least one non-whitespace character, at most serve.max_inputs inputs.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, create_model

# a character str.strip() keeps (not one of the 29 that str.isspace() is true for): the published pattern of every
# text. Listed rather than written \S, because JSON Schema patterns are ECMA-262 regexes, whose \s is another set than
# Python's; written with \u escapes, which ECMA-262, Python and Rust regexes read alike
NON_BLANK = r"[^\t\n\u000b\f\r\u001c-\u001f \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


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
    max_length: int | None = Field(description="most tokens per input (null for image models)")
    image_size: int | None = Field(None, description="image models: the side images are resized to")
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


# --------------------------------------------------------------------------------------------------------------
# the published request schema: what one served model takes (documentation; PredictRequest validates)

Text = Annotated[str, Field(min_length=1, pattern=NON_BLANK)]


class SingleTextInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Text = Field(description="the text")
    text_pair: None = Field(None, description="not used: this model classifies single texts (null is accepted)")


class TextPairInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Text = Field(description="the first text of the pair")
    text_pair: Text = Field(description="the second text of the pair")


class WordsInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[Text] = Field(min_length=1, description="pre-split words; entity offsets index them joined by "
                               "single spaces")


def published_request(meta: dict, max_inputs: int, takes_words: bool) -> type[BaseModel]:
    """The request body the model with strop.json `meta` takes: a pair model {text, text_pair} only, a model whose
    task takes pre-split words (token classification) also {tokens}, any other a string or {text}."""
    if meta.get("text_pair_column"):
        kinds: tuple = (TextPairInput,)
        example = [{"text": "a man plays a guitar", "text_pair": "someone makes music"}]
    elif takes_words:
        kinds = (Text, SingleTextInput, WordsInput)
        example = ["Anna Berg flew to Paris", {"tokens": ["Anna", "Berg", "visited", "Como"]}]
    else:
        kinds = (Text, SingleTextInput)
        example = ["I was charged twice", {"text": "where is my parcel?"}]
    one = kinds[0] if len(kinds) == 1 else Union[kinds]  # noqa: UP007 - a Union built from a tuple
    inputs = Field(min_length=1, max_length=max_inputs, description=f"1 to {max_inputs} inputs (serve.max_inputs)")
    truncate = Field(False, description="cut inputs longer than the model takes instead of answering 422")
    config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"inputs": example}]})
    return create_model("PredictRequest", __config__=config, inputs=(list[one], inputs), truncate=(bool, truncate))


# --------------------------------------------------------------------------------------------------------------
# image models: POST /v1/predict takes image files as multipart uploads or base64 in JSON

IMAGE_FORMATS = "PNG, JPEG, TIFF, BMP or another format Pillow reads"


class ImageInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: StrictStr = Field(description=f"an image file ({IMAGE_FORMATS}), base64-encoded")


class ImagePredictRequest(BaseModel):
    """What the route validates a JSON body with: any number of inputs, so that none and too many are answered
    400 and 413 (as for texts); the published schema (`published_image_schemas`) states the bounds."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[ImageInput]


def published_image_schemas(max_inputs: int) -> dict[str, dict]:
    """components/schemas of the two bodies an image model takes: ImagePredictRequest (JSON, base64 images) and
    ImageUpload (multipart/form-data, one `image` file part per image)."""
    image = Annotated[str, Field(min_length=1, description=f"an image file ({IMAGE_FORMATS}), base64-encoded",
                                 json_schema_extra={"format": "byte", "contentEncoding": "base64"})]
    one = create_model("ImageInput", __config__=ConfigDict(extra="forbid"), image=(image, ...))
    config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"inputs": [{"image": SMALL_PNG}]}]})
    body = create_model("ImagePredictRequest", __config__=config, inputs=(list[one], Field(
        min_length=1, max_length=max_inputs, description=f"1 to {max_inputs} images (serve.max_inputs)")))
    schemas = body.model_json_schema(ref_template="#/components/schemas/{model}")
    out = schemas.pop("$defs", {})
    out["ImagePredictRequest"] = schemas
    out["ImageUpload"] = {
        "type": "object", "title": "ImageUpload", "additionalProperties": False, "required": ["image"],
        "properties": {"image": {
            "type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
            "maxItems": max_inputs,
            "description": f"1 to {max_inputs} image files ({IMAGE_FORMATS}), each a part named `image` with a "
                           "filename (curl -F image=@a.png -F image=@b.png)"}}}
    return out


# a 1x1 grey PNG: the example of a valid body
SMALL_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="
