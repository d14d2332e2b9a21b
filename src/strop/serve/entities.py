"""POST /v1/predict for token-classification (NER) models: raw texts or pre-split words -> entity spans
(app.py hands these requests over).

Same guard, limits, batcher and metrics as classification (classify.py); what differs is the input check. A NER model reads
any length (sentences longer than max_length are split into overlapping windows), so the length limit is a cost
limit instead: one input may hold at most serve.max_batch_tokens subword tokens, a whole batch's budget (more ->
422 unless truncate, which keeps the leading words that fit). Entity offsets are characters of the text the model
saw: the input text (after PII masking when serve.mask_pii is on), or the words joined by single spaces.
"""

from __future__ import annotations

import asyncio
import logging

from strop.data.tokens import split_words
from strop.serve.guard import mask_pii
from strop.serve.inputs import (
    INLINE_TOKENIZE_CHARS,
    ApiError,
    check_input_count,
    clip_words,
    is_blank,
    is_encodable,
)
from strop.serve.schema import PredictRequest, PredictResponse, TextInput, TokensInput

log = logging.getLogger("strop.serve")


def _normalise(body: PredictRequest, max_inputs: int) -> list[str | list[str]]:
    """Request inputs -> raw texts (str) and word lists; counts and empty inputs are checked here (413/400/422)."""
    check_input_count(len(body.inputs), max_inputs)
    out: list[str | list[str]] = []
    for i, item in enumerate(body.inputs):
        if isinstance(item, TextInput) and item.text_pair is not None:
            raise ApiError(422, "unexpected_text_pair", f"inputs[{i}] has a text_pair, but this model tags single "
                           "texts; send a string, {\"text\": ...} or {\"tokens\": [...]}")
        if isinstance(item, TokensInput):
            if not item.tokens:
                raise ApiError(400, "empty_input", f"inputs[{i}].tokens is empty; send at least one word")
            for j, word in enumerate(item.tokens):
                if is_blank(word):
                    raise ApiError(400, "empty_input", f"inputs[{i}].tokens[{j}] is empty or only whitespace; "
                                   "every word needs some text")
                if not is_encodable(word):
                    raise ApiError(422, "invalid_text", f"inputs[{i}].tokens[{j}] holds an unpaired UTF-16 "
                                   "surrogate; send valid Unicode text")
            out.append(list(item.tokens))
            continue
        text = item if isinstance(item, str) else item.text
        if is_blank(text):
            raise ApiError(400, "empty_input", f"inputs[{i}] text is empty; every input needs some text")
        if not is_encodable(text):
            raise ApiError(422, "invalid_text", f"inputs[{i}] text holds an unpaired UTF-16 surrogate (a "
                           "\\ud800-\\udfff escape without its pair); send valid Unicode text")
        out.append(text)
    return out


def _words(item, word_split: str, limit: int | None) -> tuple[list[str], tuple | None, bool]:
    """(words, (text, word ends) for a text item, whether words past the first `limit` were dropped)."""
    if isinstance(item, str):
        text, cut = clip_words(item, limit) if limit is not None else (item, False)
        found = split_words(text, word_split)
        return [w for w, _, _ in found], (text, [e for _, _, e in found]), cut
    cut = limit is not None and len(item) > limit
    return (item[:limit] if cut else item), None, cut


def fit_to_token_budget(tokenizer, items: list, word_split: str, limit: int) -> tuple[list, list[int], set[int]]:
    """(items cut to at most `limit` subword tokens, tokens per item, indices of items that were longer)."""
    def encode(batch):
        enc = tokenizer(batch, is_split_into_words=True, truncation=False, verbose=False,
                        return_attention_mask=False, return_token_type_ids=False)
        return [enc.word_ids(k) for k in range(len(batch))]

    # every word is nearly always at least one token: clipping at `limit` words first bounds the tokenizer's work;
    # an item cut yet still within `limit` tokens (words the tokenizer drops, such as zero-width characters) is redone
    # whole, so it is neither refused nor cut wrongly
    prepared = [_words(item, word_split, limit) for item in items]
    word_ids = encode([p[0] for p in prepared])
    redo = [i for i, p in enumerate(prepared) if p[2] and len(word_ids[i]) <= limit]
    if redo:
        for i in redo:
            prepared[i] = _words(items[i], word_split, None)
        for i, ids in zip(redo, encode([prepared[i][0] for i in redo])):
            word_ids[i] = ids
    words = [p[0] for p in prepared]
    spans = [p[1] for p in prepared]
    long_ = {i for i, ids in enumerate(word_ids) if len(ids) > limit}
    fitted, counts = [], []
    for i in range(len(items)):
        ids = word_ids[i]
        if len(ids) > limit:
            trailing = len(ids) - max(p for p, w in enumerate(ids) if w is not None) - 1
            # the leading words whose every subword lands before the end specials: up to the first word that does not
            # (words without subwords before it are kept too)
            last = {w: p for p, w in enumerate(ids) if w is not None}
            keep = min(w for w, p in last.items() if p >= limit - trailing)
        else:
            keep = len(words[i])
        counts.append(min(len(ids), limit))
        if spans[i] is None:
            fitted.append(words[i][:keep])
        else:
            text, ends = spans[i]
            fitted.append(text if keep == len(ends) else text[:ends[keep - 1]] if keep else "")
    return fitted, counts, long_


async def predict_entities(state, model, body: PredictRequest) -> PredictResponse:
    """Entities {text, type, start, end, score} per input (and tags per word for {tokens} inputs)."""
    cfg, meta = state.cfg, model.predictor.meta
    items = _normalise(body, cfg.max_inputs)
    if cfg.mask_pii:
        items = [mask_pii(x) if isinstance(x, str) else [mask_pii(w) for w in x] for x in items]
    limit, how = cfg.max_batch_tokens, meta.get("word_split", "simple")
    size = sum(len(x) if isinstance(x, str) else sum(map(len, x)) for x in items)
    # short inputs (the usual request) are counted on the event loop: a thread hop costs more than tokenizing them
    tok = model.predictor.tokenizer
    fitted, counts, too_long = fit_to_token_budget(tok, items, how, limit) if size <= INLINE_TOKENIZE_CHARS else \
        await asyncio.to_thread(fit_to_token_budget, tok, items, how, limit)
    if too_long and not body.truncate:
        i = min(too_long)
        raise ApiError(422, "input_too_long", f"inputs[{i}] has more than {limit} tokens; one input to this "
                       f"token-classification model may have at most {limit} (serve.max_batch_tokens: longer "
                       "texts are read in windows, so this bounds the work of one input): split it over several "
                       "inputs, or send \"truncate\": true to tag only its leading words")
    if any(not x for x in fitted):
        i = next(i for i, x in enumerate(fitted) if not x)
        raise ApiError(422, "input_too_long", f"inputs[{i}]: its first word alone has more than {limit} tokens")
    if cfg.log_inputs:
        for i, x in enumerate(fitted):
            log.info("input %d: %s", i, mask_pii(x if isinstance(x, str) else " ".join(x)))
    outputs = await state.batcher.submit(fitted, None, counts)
    for i in too_long:
        outputs[i] = {**outputs[i], "truncated": True}
    return PredictResponse(model=model.version, task=meta["task"], predictions=outputs)
