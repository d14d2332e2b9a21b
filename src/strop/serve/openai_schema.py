"""Bodies of the OpenAI-compatible routes (POST /v1/chat/completions, POST /v1/completions, GET /v1/models).

The request models validate types only (422 on a wrong type or an unknown field); values are checked by the routes
(openai_api.py), which answer 400 with a message naming the field. The schema a server publishes is its model's own
(`published_schemas`): the served model's name, the value ranges the routes accept, so a request the document calls
valid is one the server answers with 200 (tests/serve/test_serve_conformance.py fuzzes both directions).
Streamed answers are server-sent events whose data are ChatCompletionChunk / Completion objects, as OpenAI's.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import FastAPI
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    create_model,
)

from strop.serve.schema import NON_BLANK

Number = Annotated[float, Strict()]  # a JSON number (an int is accepted; "0.5" and true are not)


def _whole(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


# a JSON Schema integer: 5 and 5.0 (a number without a fraction is an integer there), not 5.5, "5" or true
Whole = Annotated[StrictInt, BeforeValidator(_whole)]
ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # stop strings per request, as OpenAI's API


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="only text parts")
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: StrictStr = Field(description="system, user or assistant")
    content: StrictStr | list[TextPart] = Field(description="the text, or text parts (joined by newlines)")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = Field(False, description="end the stream with a chunk that holds usage")


class Sampling(BaseModel):
    """What both routes take besides the prompt."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr = Field(description="the served model's name (GET /v1/models)")
    max_tokens: Whole | None = Field(None, description="most tokens to generate; default: the run's "
                                         "generate.max_new_tokens")
    temperature: Number | None = Field(None, description="0 = greedy (the default unless the run says otherwise); "
                                       "above 0 samples")
    top_p: Number | None = Field(None, description="sampling: keep the smallest set of tokens whose probability "
                                 "reaches top_p")
    n: Whole | None = Field(None, description="answers per prompt: only 1")
    stop: StrictStr | list[StrictStr] | None = Field(None, description="up to 4 strings that end the answer (not "
                                                     "returned)")
    stream: StrictBool = Field(False, description="send the answer as server-sent events, token by token")
    stream_options: StreamOptions | None = None
    seed: Whole | None = Field(None, description="sampling: the same seed gives the same answer")
    user: StrictStr | None = Field(None, description="accepted and ignored")


class ChatCompletionRequest(Sampling):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "my-run", "messages": [{"role": "user", "content": "name[Aromi], food[Chinese]"}]}]})
    messages: list[ChatMessage] = Field(description="the conversation so far; the model answers as the assistant")
    max_completion_tokens: Whole | None = Field(None, description="the newer name of max_tokens")


class CompletionRequest(Sampling):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "my-run", "prompt": "name[Aromi], food[Chinese]"}]})
    prompt: StrictStr | list[StrictStr] = Field(description="a prompt, or several (one choice each); each is one "
                                                "user turn in the run's chat format, as in training")


# -- responses ----------------------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens the model read (after a long prompt was cut from the left)")
    completion_tokens: int = Field(description="tokens generated (the end-of-sequence token not counted)")
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason = Field(description="stop: end of sequence or a stop string; length: max_tokens")
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix time, seconds")
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int = Field(description="the prompt's position in the request")
    text: str
    finish_reason: FinishReason | None = Field(description="null in a streamed chunk before the last")
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, description="null in streamed chunks, unless include_usage (the last)")


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta = Field(description="the first chunk gives the role, then each gives new text; the last is empty")
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "strop"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def stream_doc(chunk: str) -> dict:
    """The text/event-stream content of a 200 (stream: true). Before OpenAPI 3.2's itemSchema, a stream's `schema`
    describes one event {data, event, id, retry}: here `data` is a `chunk` (or an error, should generation fail
    mid-way) as JSON, and the last event's data is [DONE]."""
    as_json = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": f"#/components/schemas/{chunk}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}}
    event = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [{"const": "[DONE]"},
                                                                                        as_json]}},
             "description": f"with stream: true, one event per chunk: `data: <{chunk} JSON>` and a blank line; "
                            "the last is `data: [DONE]`"}
    return {"text/event-stream": {"schema": event}}

# -- the published document ---------------------------------------------------------------------------------------


def _options(model_id: str, max_tokens: int | None) -> dict:
    """Field definitions of Sampling with the ranges the routes accept (create_model form)."""
    tokens = Field(None, ge=1, le=max_tokens, description=f"1 to {max_tokens or 'any'}: the model's context less "
                   "one prompt token (longer prompts are cut from the left to leave room)")
    stop = Annotated[str, Field(min_length=1)]
    return {
        "model": (Literal[model_id], Field(description="the served model (GET /v1/models)")),
        "max_tokens": (int | None, tokens),
        "temperature": (float | None, Field(None, ge=0, le=2, description="0 = greedy; above 0 samples")),
        "top_p": (float | None, Field(None, gt=0, le=1, description="sampling: nucleus probability")),
        "n": (Literal[1] | None, Field(None, description="answers per prompt: only 1")),
        "stop": (stop | Annotated[list[stop], Field(max_length=MAX_STOP)] | None, Field(None)),
        "stream": (bool, Field(False)),
        "stream_options": (StreamOptions | None, Field(None)),
        "seed": (int | None, Field(None)),
        "user": (str | None, Field(None)),
    }


def published_schemas(model_id: str, max_tokens: int | None, max_inputs: int) -> dict[str, dict]:
    """components/schemas entries of the two request bodies as this server accepts them (with their $defs)."""
    config = ConfigDict(extra="forbid")
    message = create_model("ChatMessage", __config__=config, role=(Literal[ROLES], ...),
                           content=(str | list[TextPart], ...))
    prompt = Annotated[str, Field(min_length=1, pattern=NON_BLANK)]
    options = _options(model_id, max_tokens)
    chat = create_model("ChatCompletionRequest", __config__=ConfigDict(
        extra="forbid", json_schema_extra={"examples": [
            {"model": model_id, "messages": [{"role": "user", "content": "name[Aromi], food[Chinese]"}]}]}),
        messages=(list[message], Field(min_length=1)), max_completion_tokens=options["max_tokens"], **options)
    completion = create_model("CompletionRequest", __config__=ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"model": model_id, "prompt": "name[Aromi], food[Chinese]"}]}),
        prompt=(prompt | Annotated[list[prompt], Field(min_length=1, max_length=max_inputs)],
                Field(description=f"a prompt or 1 to {max_inputs} prompts (serve.max_inputs)")), **options)
    out = {}
    for body in (chat, completion):
        schema = body.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[body.__name__] = schema
    out["ChatCompletionChunk"] = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
    out.update(out["ChatCompletionChunk"].pop("$defs", {}))
    return out


def publish_openai_schemas(app: FastAPI, schemas: dict[str, dict]) -> None:
    """Make app.openapi() document `schemas` (published_schemas) in place of the validating models."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            generate()["components"]["schemas"].update(schemas)
        return generate()

    app.openapi = openapi
