"""OpenAI-compatible routes for generation runs: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

Same guard (API key, body limit, 429 admission), error body and metrics as /v1/predict; the answers come from the
decode scheduler (decode.py), which lets concurrent requests share decode steps. A request is checked whole before
anything is generated, so a stream never starts for a request that is then refused: the served model's name (404),
the values (400: empty messages, an unknown role, max_tokens < 1 or above the model's context, n > 1,
temperature / top_p out of range, empty or too many stop strings), types and unknown fields (422, by pydantic).

Prompts go through the run's chat template as in training (Generator.encode_prompt): a chat request's messages as
they are, a completion request's prompt as one user turn (a fine-tuned model answers in the format it learned).
A prompt longer than the run's model.max_length, or than the context leaves beside max_tokens, is cut from the left.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from strop.errors import StropError
from strop.generate import Generator, Settings
from strop.runs import open_run
from strop.serve.backend import LoadedModel, run_name
from strop.serve.decode import DecodeScheduler
from strop.serve.guard import mask_pii
from strop.serve.inputs import INLINE_TOKENIZE_CHARS, ApiError, is_blank, is_encodable
from strop.serve.openai_schema import (
    MAX_STOP,
    ROLES,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    Sampling,
    published_schemas,
    publish_openai_schemas,
    stream_doc,
)
from strop.serve.openapi import error_responses

log = logging.getLogger("strop.serve")
GENERATE_ERRORS = (400, 404, 408, 413, 415, 422, 429, 503)
BODY_EXAMPLES = {"/v1/chat/completions": '{"model": "NAME", "messages": [{"role": "user", "content": "hello"}]}',
                 "/v1/completions": '{"model": "NAME", "prompt": "hello"}'}
WARMUP_PROMPT = "warm up"


def context_length(config) -> int | None:
    """Most positions the model takes, from its config (a transformers config, or config.json as a dict); None
    where the config does not say."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def max_tokens_limit(context: int | None) -> int | None:
    """Largest max_tokens: the context less one position for the prompt (which is cut from the left to fit)."""
    return None if context is None else context - 1


def _served_context(path: str | Path) -> int | None:
    """The context of the model served from `path`, read from its config.json (no weights loaded)."""
    try:
        return context_length(json.loads((open_run(Path(path)) / "config.json").read_text(encoding="utf-8")))
    except (StropError, OSError, ValueError):
        return None


def add_openai_routes(app: FastAPI, path: str | Path, state, auth: list, keyed: bool,
                      require_ready: Callable[[], LoadedModel]) -> None:
    """Register the routes on `app` and publish their schemas; `state` is app.ServerState (its `decoder`)."""
    try:
        name = run_name(open_run(Path(path)))
    except StropError:  # the load fails too, and readiness says why; the document keeps a placeholder name
        name = "model"
    publish_openai_schemas(app, published_schemas(name, max_tokens_limit(_served_context(path)),
                                                  state.cfg.max_inputs))
    errors = error_responses(GENERATE_ERRORS, keyed, retry_on_503=True)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=auth,
              responses={200: {"content": stream_doc("ChatCompletionChunk")}, **errors})
    async def chat_completions(body: ChatCompletionRequest):
        """Answer a conversation as the assistant (OpenAI's chat completions; stream: true sends events)."""
        return await _chat(state, require_ready(), body)

    @app.post("/v1/completions", response_model=Completion, dependencies=auth,
              responses={200: {"content": stream_doc("Completion")}, **errors})
    async def completions(body: CompletionRequest):
        """Answer one prompt or several (OpenAI's completions; stream: true sends events)."""
        return await _complete(state, require_ready(), body)

    @app.get("/v1/models", response_model=ModelList, dependencies=auth,
             responses=error_responses((503,), keyed, retry_on_503=True))
    async def models() -> ModelList:
        """The served model: its name is the run's name (give it as `model`)."""
        model = require_ready()
        return ModelList(data=[ModelCard(id=_name(model), created=int(model.source.stat().st_mtime))])


# -- the decoder ------------------------------------------------------------------------------------------------


async def start_decoder(generator: Generator, cfg, observer) -> DecodeScheduler:
    """The running decode scheduler for `generator`, warmed up (one short request)."""
    decoder = DecodeScheduler(generator, cfg.max_batch_size, cfg.max_batch_tokens, observer)
    decoder.start()
    prompt = await asyncio.to_thread(generator.encode_prompt, WARMUP_PROMPT)
    for _ in range(2):
        await decoder.complete(prompt, generator.settings(max_new_tokens=2, stop=()))
    return decoder


# -- checking a request -----------------------------------------------------------------------------------------


def _name(model: LoadedModel) -> str:
    return model.version.split("@")[0]


def _check_model(asked: str, model: LoadedModel) -> None:
    if asked not in (_name(model), model.version):
        raise ApiError(404, "model_not_found", f"model {asked[:100]!r} is not served here; this server serves "
                       f"{_name(model)!r} (GET /v1/models)")


def _settings(gen: Generator, body: Sampling, max_tokens: int | None, limit: int | None) -> Settings:
    """The request's decoding settings over the run's defaults; 400 naming the field for a value out of range."""
    if body.n not in (None, 1):
        raise ApiError(400, "unsupported_n", f"n={body.n}: this server returns one answer per prompt; send n=1 (or "
                       "leave it out) and repeat the request for more answers")
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, "invalid_max_tokens", f"max_tokens={max_tokens}: generate at least 1 token")
    if max_tokens is not None and limit is not None and max_tokens > limit:
        raise ApiError(400, "invalid_max_tokens", f"max_tokens={max_tokens} is above this model's limit of {limit} "
                       f"(its context holds {limit + 1} tokens, and the prompt needs at least one); ask for fewer")
    if body.temperature is not None and not 0 <= body.temperature <= 2:
        raise ApiError(400, "invalid_temperature", f"temperature={body.temperature} must be in [0, 2] (0 = greedy)")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise ApiError(400, "invalid_top_p", f"top_p={body.top_p} must be in (0, 1]")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stop is not None and (len(stop) > MAX_STOP or any(not x for x in stop)):
        raise ApiError(400, "invalid_stop", f"stop: give at most {MAX_STOP} non-empty strings (got {len(stop)}, "
                       f"{sum(not x for x in stop)} empty)")
    default = gen.defaults.max_new_tokens if limit is None else min(gen.defaults.max_new_tokens, limit)
    return gen.settings(max_new_tokens=max_tokens or default, temperature=body.temperature, top_p=body.top_p,
                        stop=stop)


def _turns(body: ChatCompletionRequest) -> list[dict]:
    """The messages as {role, content} turns; 400 for none or an unknown role, 422 for unencodable text."""
    if not body.messages:
        raise ApiError(400, "empty_messages", "messages is empty; send at least one, e.g. [{\"role\": \"user\", "
                       "\"content\": \"hello\"}]")
    turns = []
    for i, m in enumerate(body.messages):
        if m.role not in ROLES:
            raise ApiError(400, "unknown_role", f"messages[{i}].role={m.role[:40]!r} is not one of {list(ROLES)}")
        content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content)
        if not is_encodable(content):
            raise ApiError(422, "invalid_text", f"messages[{i}].content holds an unpaired UTF-16 surrogate; send "
                           "valid Unicode text")
        turns.append({"role": m.role, "content": content})
    return turns


def _prompts(body: CompletionRequest, max_inputs: int) -> list[str]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise ApiError(400, "empty_input", "prompt is an empty list; send a prompt, e.g. \"hello\"")
    if len(prompts) > max_inputs:
        raise ApiError(413, "too_many_inputs", f"{len(prompts)} prompts in one request; the limit is {max_inputs} "
                       "(serve.max_inputs): split them over several requests")
    for i, text in enumerate(prompts):
        if is_blank(text):
            raise ApiError(400, "empty_input", f"prompt[{i}] is empty; every prompt needs some text")
        if not is_encodable(text):
            raise ApiError(422, "invalid_text", f"prompt[{i}] holds an unpaired UTF-16 surrogate; send valid "
                           "Unicode text")
    return prompts


def _encode_all(gen: Generator, prompts: list, room: int | None) -> list[list[int]]:
    """Token ids per prompt, each cut from the left to `room` tokens (None: no further cut)."""
    out = []
    for prompt in prompts:
        try:
            ids = gen.encode_prompt(prompt)
        except Exception as e:  # noqa: BLE001 - a template that refuses these messages (e.g. roles must alternate)
            raise ApiError(400, "template_refused", f"the model's chat template cannot render this conversation: "
                           f"{str(e)[:300]}") from None
        out.append(ids[-room:] if room is not None and len(ids) > room else ids)
    return out


async def _encode(state, model: LoadedModel, prompts: list, settings: Settings) -> list[list[int]]:
    gen, cfg = model.predictor, state.cfg
    if cfg.mask_pii:
        prompts = [mask_pii(p) if isinstance(p, str) else [{**t, "content": mask_pii(t["content"])} for t in p]
                   for p in prompts]
    if cfg.log_inputs:
        for i, p in enumerate(prompts):
            log.info("prompt %d: %s", i, mask_pii(p if isinstance(p, str) else json.dumps(p, ensure_ascii=False)))
    context = context_length(gen.model.config)
    room = None if context is None else context - settings.max_new_tokens
    size = sum(len(p) if isinstance(p, str) else sum(len(t["content"]) for t in p) for p in prompts)
    if size <= INLINE_TOKENIZE_CHARS:  # a thread hop costs more than tokenizing a short prompt
        return _encode_all(gen, prompts, room)
    return await asyncio.to_thread(_encode_all, gen, prompts, room)


def _limit(model: LoadedModel) -> int | None:
    return max_tokens_limit(context_length(model.predictor.model.config))


# -- answering --------------------------------------------------------------------------------------------------


def _usage(results: list[dict]) -> dict:
    prompt, completion = sum(r["prompt_tokens"] for r in results), sum(r["tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _chat(state, model: LoadedModel, body: ChatCompletionRequest):
    _check_model(body.model, model)
    turns = _turns(body)
    asked = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    settings = _settings(model.predictor, body, asked, _limit(model))
    (ids,) = await _encode(state, model, [turns], settings)
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": _name(model)}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(_chat_chunks(state.decoder, ids, settings, body.seed, head, usage))
    result = await state.decoder.complete(ids, settings, body.seed)
    return ChatCompletion(**head, usage=_usage([result]), choices=[{
        "index": 0, "message": {"role": "assistant", "content": result["text"]},
        "finish_reason": result["finish_reason"]}])


async def _complete(state, model: LoadedModel, body: CompletionRequest):
    _check_model(body.model, model)
    prompts = _prompts(body, state.cfg.max_inputs)
    settings = _settings(model.predictor, body, body.max_tokens, _limit(model))
    ids = await _encode(state, model, prompts, settings)
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": _name(model)}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(_completion_chunks(state.decoder, ids, settings, body.seed, head, usage))
    seeds = [None if body.seed is None else body.seed + i for i in range(len(ids))]
    results = await asyncio.gather(*(state.decoder.complete(p, settings, s) for p, s in zip(ids, seeds)))
    return Completion(**head, usage=_usage(results), choices=[
        {"index": i, "text": r["text"], "finish_reason": r["finish_reason"]} for i, r in enumerate(results)])


# -- streaming --------------------------------------------------------------------------------------------------


def _sse(events: AsyncIterator[dict | str]) -> StreamingResponse:
    async def lines():
        async for event in events:
            yield f"data: {event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)}\n\n"

    # no proxy buffering: each event goes out as it is made
    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _merged(decoder: DecodeScheduler, prompts: list[list[int]], settings: Settings,
                  seed: int | None) -> AsyncIterator[tuple[int, str | dict]]:
    """(prompt index, text piece or result) of every prompt's stream, as they come."""
    if len(prompts) == 1:
        async for item in decoder.stream(prompts[0], settings, seed):
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, prompt: list[int]):
        try:
            async for item in decoder.stream(prompt, settings, None if seed is None else seed + i):
                queue.put_nowait((i, item))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which ends the stream with it
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
    try:
        left = len(prompts)
        while left:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            left -= isinstance(item, dict)
            yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def _events(items: AsyncIterator, make: Callable, end: Callable, usage_chunk: Callable | None):
    """Chunks from `make(index, piece)` / `end(index, result)`, the usage chunk if asked, [DONE]; a failure mid-way
    ends the stream with an error event."""
    results = []
    try:
        async for i, item in items:
            if isinstance(item, dict):
                results.append(item)
                yield end(i, item)
            elif item:
                yield make(i, item)
    except Exception as e:  # the status line is sent: the error travels as an event
        log.exception("generation failed mid-stream")
        yield {"error": {"status": 500, "code": "generation_failed", "message": f"{type(e).__name__}: {e}"}}
    else:
        if usage_chunk is not None:
            yield usage_chunk(_usage(results))
    yield "[DONE]"


def _chat_chunks(decoder, ids, settings, seed, head: dict, usage: bool):
    def chunk(delta: dict, finish: str | None) -> dict:
        out = {**head, "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return {**out, "usage": None} if usage else out

    async def events():
        yield chunk({"role": "assistant", "content": ""}, None)
        async for event in _events(_merged(decoder, [ids], settings, seed),
                                   lambda i, piece: chunk({"content": piece}, None),
                                   lambda i, result: chunk({}, result["finish_reason"]),
                                   (lambda u: {**head, "object": "chat.completion.chunk", "choices": [],
                                               "usage": u}) if usage else None):
            yield event

    return events()


def _completion_chunks(decoder, ids, settings, seed, head: dict, usage: bool):
    def chunk(i: int, text: str, finish: str | None) -> dict:
        out = {**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}
        return {**out, "usage": None} if usage else out

    return _events(_merged(decoder, ids, settings, seed), lambda i, piece: chunk(i, piece, None),
                   lambda i, result: chunk(i, "", result["finish_reason"]),
                   (lambda u: {**head, "choices": [], "usage": u}) if usage else None)
