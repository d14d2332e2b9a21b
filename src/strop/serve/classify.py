"""POST /v1/predict for classification and regression models (single texts or text pairs) -> labels and scores.

Same guard, limits, batcher and metrics as token classification (entities.py); what is particular here: a text pair
model needs {text, text_pair} inputs, a single-text model refuses them, and an input longer than the model's
max_length is refused (422) unless the request sets truncate.
"""

from __future__ import annotations

import asyncio
import logging

from strop.serve.backend import LoadedModel
from strop.serve.guard import mask_pii
from strop.serve.inputs import (
    INLINE_TOKENIZE_CHARS,
    ApiError,
    check_input_count,
    clip_words,
    is_blank,
    is_encodable,
)
from strop.serve.schema import PredictRequest, PredictResponse, TokensInput

log = logging.getLogger("strop.serve")


def _normalise(body: PredictRequest, pair_model: bool, max_inputs: int) -> tuple[list[str], list[str] | None]:
    """Request inputs -> (texts, pairs or None); counts and empty texts are checked here (413 / 400 / 422)."""
    check_input_count(len(body.inputs), max_inputs)
    texts, pairs = [], []
    for i, item in enumerate(body.inputs):
        if isinstance(item, TokensInput):
            raise ApiError(422, "wrong_input_kind", f"inputs[{i}] gives tokens, but this model classifies whole "
                           "texts; send a string or {\"text\": ...}")
        text, pair = (item, None) if isinstance(item, str) else (item.text, item.text_pair)
        if pair_model and pair is None:
            raise ApiError(422, "missing_text_pair", f"inputs[{i}]: this model classifies text pairs; send "
                           "{\"text\": ..., \"text_pair\": ...}")
        if not pair_model and pair is not None:
            raise ApiError(422, "unexpected_text_pair", f"inputs[{i}] has a text_pair, but this model classifies "
                           "single texts; send only \"text\"")
        for name, value in (("text", text), ("text_pair", pair)):
            if value is not None and is_blank(value):
                raise ApiError(400, "empty_input", f"inputs[{i}] {name} is empty; every input needs some text")
            if value is not None and not is_encodable(value):
                raise ApiError(422, "invalid_text", f"inputs[{i}] {name} holds an unpaired UTF-16 surrogate "
                               "(a \\ud800-\\udfff escape without its pair); send valid Unicode text")
        texts.append(text)
        pairs.append(pair)
    return texts, pairs if pair_model else None


def _token_counts(model: LoadedModel, texts: list[str], pairs: list[str] | None) -> list[int]:
    """Tokens per input with special tokens, before truncation."""
    enc = model.predictor.tokenizer(texts, pairs, truncation=False, verbose=False, return_attention_mask=False,
                                    return_token_type_ids=False)
    return [len(ids) for ids in enc["input_ids"]]


async def fit_to_max_length(model: LoadedModel, texts: list[str], pairs: list[str] | None,
                            limit: int) -> tuple[list[str], list[str] | None, list[int], set[int]]:
    """(texts, pairs, tokens per input, indices cut), each input cut to its first `limit` words where longer.

    A word is nearly always at least one token, so an input with more words than `limit` is too long, and with
    truncation only its first `limit` words can reach the model: cutting there first keeps a 1 MB text from costing
    100+ MB of tokenizer memory. Words the tokenizer drops (zero-width or control characters) break the rule: an
    input cut yet still within `limit` tokens is counted again whole, so it is neither refused nor cut wrongly.
    """
    clipped = [clip_words(t, limit) for t in texts]
    clipped_pairs = [clip_words(t, limit) for t in pairs] if pairs is not None else None
    cut = {i for i, (_, c) in enumerate(clipped) if c} | {i for i, (_, c) in enumerate(clipped_pairs or []) if c}
    short = [t for t, _ in clipped]
    short_pairs = [t for t, _ in clipped_pairs] if clipped_pairs is not None else None
    size = sum(map(len, short)) + sum(map(len, short_pairs or []))
    counts = _token_counts(model, short, short_pairs) if size <= INLINE_TOKENIZE_CHARS else \
        await asyncio.to_thread(_token_counts, model, short, short_pairs)
    redo = sorted(i for i in cut if counts[i] <= limit)
    if redo:
        whole = [texts[i] for i in redo]
        whole_pairs = [pairs[i] for i in redo] if pairs is not None else None
        for i, c in zip(redo, await asyncio.to_thread(_token_counts, model, whole, whole_pairs)):
            counts[i], short[i] = c, texts[i]
            if short_pairs is not None:
                short_pairs[i] = pairs[i]
            cut.discard(i)
    return short, short_pairs, counts, cut


async def predict_classes(state, model: LoadedModel, body: PredictRequest) -> PredictResponse:
    """Label, score and probabilities (or the value, for regression) per input; `state` is app.ServerState."""
    cfg, meta = state.cfg, model.predictor.meta
    texts, pairs = _normalise(body, bool(meta.get("text_pair_column")), cfg.max_inputs)
    if cfg.mask_pii:
        texts = [mask_pii(t) for t in texts]
        pairs = [mask_pii(t) for t in pairs] if pairs is not None else None
    limit = meta["max_length"]
    texts, pairs, counts, cut = await fit_to_max_length(model, texts, pairs, limit)
    too_long = {i for i, c in enumerate(counts) if c > limit}
    if too_long and not body.truncate:
        i = min(too_long)
        size = f"more than {limit}" if i in cut else str(counts[i])
        raise ApiError(422, "input_too_long", f"inputs[{i}] has {size} tokens; this model takes at most {limit}: "
                       "shorten it, or send \"truncate\": true to cut it")
    if cfg.log_inputs:
        for i, text in enumerate(texts):
            log.info("input %d: %s", i, mask_pii(text if pairs is None else f"{text} ||| {pairs[i]}"))
    outputs = await state.batcher.submit(texts, pairs, [min(c, limit) for c in counts])
    for i in too_long:
        outputs[i] = {**outputs[i], "truncated": True}
    return PredictResponse(model=model.version, task=meta["task"], predictions=outputs)
