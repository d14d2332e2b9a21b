"""Continuous batching for generation: concurrent requests share decode steps, one forward pass for every sequence.

One background task runs the decode loop; each step runs on one inference thread (the event loop stays free for
HTTP, health checks and 429s) and
  1. drops the sequences whose client left;
  2. runs ONE forward pass for the sequences already decoding: each feeds its last token, over the KV cache of
     all of them (a transformers DynamicCache, rows left-padded to a common length, the padding masked, as
     batched `generate` pads);
  3. admits waiting requests while the token budget allows: each is prefilled alone (no padding, so its numbers are
     those of Generator.predict for one prompt), and its cache joins the batch cache;
  4. picks each row's next token with its own settings (argmax, or temperature -> top-p -> a draw from the
     request's own seeded torch.Generator), sends the text it makes visible to its request, and retires rows that
     hit EOS, a stop string or max_tokens.
A request thus joins at the next step, not after the batch in flight: it waits at most one step (plus the prefills
admitted with it). Text is held back while it may be the start of a stop string or ends in half a UTF-8 character,
so a stream never shows what the final answer cuts; the final text and token count come from Generator.finish, as
for `strop predict`.

Caches are merged layer by layer (transformers' DynamicLayer keys / values, full attention). A model whose cache has
other layers (sliding windows, linear attention) decodes one sequence at a time instead (a warning says so).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from strop.generate import Generator, Settings
from strop.serve.worker import BackgroundLoop

log = logging.getLogger("strop.serve")


class Observer:
    """What the scheduler reports (serve.telemetry.Telemetry implements it); these defaults do nothing."""

    def decode_step(self, rows: int, seconds: float) -> None:
        """rows: sequences the step's forward pass advanced (more than 1: requests shared it)."""

    def first_token(self, seconds: float) -> None:
        """seconds from submission to the request's first token."""

    def finished(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        """seconds: from the first token to the last."""

    def waiting(self, n: int) -> None:
        """requests waiting to join the batch."""


@dataclass
class _Sequence:
    """One request decoding: its prompt, settings, generated ids and what its client has been sent."""

    prompt: list[int]
    settings: Settings
    events: asyncio.Queue  # text pieces (str), then the result (dict) or an exception
    rng: torch.Generator | None  # sampling only
    submitted: float = field(default_factory=time.perf_counter)
    first_at: float | None = None
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    cancelled: bool = False
    done: bool = False

    @property
    def budget(self) -> int:
        """Most cache positions this sequence can take: prompt plus answer."""
        return len(self.prompt) + self.settings.max_new_tokens


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not to send yet: a possible start of a stop string, or a U+FFFD that a later
    token may complete into a character."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), n, -1):
            if text.endswith(stop[:k]):
                n = k
                break
    return n


def pick_tokens(logits: torch.Tensor, rows: list[_Sequence]) -> list[int]:
    """Next token per row of logits (rows, vocab): argmax where greedy, else sampled with the row's settings
    (temperature, then the smallest set of tokens whose probability reaches top_p, as transformers' TopP warper)."""
    tokens = logits.argmax(-1).tolist()
    for i, seq in enumerate(rows):
        s = seq.settings
        if s.temperature == 0:
            continue
        # shifted so the best score is 0, in float64: a temperature as small as 1e-300 then gives 0 and -inf (the
        # greedy token), where float32 logits / temperature would overflow to inf - inf = nan
        scores = (logits[i].double() - logits[i].max()) / s.temperature
        if s.top_p < 1:
            ordered, order = scores.sort()
            drop = ordered.softmax(-1).cumsum(-1) <= 1 - s.top_p
            drop[-1] = False  # keep at least the most probable token
            scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        tokens[i] = int(torch.multinomial(scores.softmax(-1), 1, generator=seq.rng))
    return tokens


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, heads, seq, dim) -> (batch, heads, width, dim), zeros in front (masked positions)."""
    return F.pad(t, (0, 0, width - t.shape[-2], 0))


def mergeable(cache) -> bool:
    """Whether rows of `cache` can be joined, dropped and padded layer by layer (full-attention DynamicLayers)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers < 4.56 keeps caches as lists of tensors
        return False
    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def forward_arguments(model) -> tuple[str, dict]:
    """(the forward argument that takes the KV cache, what makes a prefill compute the last position's logits only):
    `cache` from transformers 5.25 on, `past_key_values` before; `logits_to_keep` where the model has it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper takes **kwargs
    params = inspect.signature(inner.forward).parameters
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return "cache" if "cache" in params else "past_key_values", last_only


def cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class _Batch:
    """The sequences decoding together: their KV cache, attention mask (rows, cached positions) and last tokens
    (picked, not yet fed)."""

    def __init__(self):
        self.rows: list[_Sequence] = []
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.last: list[int] = []

    def join(self, seq: _Sequence, cache, token: int, device: torch.device) -> None:
        """Add a prefilled sequence: both caches are left-padded to the longer one."""
        mask = torch.ones((1, len(seq.prompt)), dtype=torch.long, device=device)
        if not self.rows:
            self.rows, self.cache, self.mask, self.last = [seq], cache, mask, [token]
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                               F.pad(mask, (width - mask.shape[1], 0))])
        self.rows.append(seq)
        self.last.append(token)

    def keep(self, keep: list[int]) -> None:
        """Keep rows `keep` (indices); cut the leading columns that are padding in every row left."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.last = [], None, None, []
            return
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[idx]
        start = int(mask.any(0).nonzero()[0])
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, start:], layer.values[idx, :, start:]
        self.mask = mask[:, start:]
        self.rows = [self.rows[i] for i in keep]
        self.last = [self.last[i] for i in keep]


class DecodeScheduler(BackgroundLoop):
    """Decodes every submitted request in one shared batch. max_rows: most sequences decoding together;
    max_tokens: most cache positions of the batch, counted as rows x longest (prompt + max_new_tokens), so the
    cache's memory is bounded (a lone request is always admitted)."""

    def __init__(self, generator: Generator, max_rows: int, max_tokens: int, observer: Observer | None = None):
        self.gen, self.max_rows, self.max_tokens = generator, max_rows, max_tokens
        self.observer = observer or Observer()
        self._waiting: deque[_Sequence] = deque()
        self._batch = _Batch()
        self._arrived = asyncio.Event()
        self._cache_arg, self._last_only = forward_arguments(generator.model)
        super().__init__("strop-decode")

    @property
    def depth(self) -> int:
        """Requests waiting to join."""
        return len(self._waiting)

    async def stream(self, prompt: list[int], settings: Settings, seed: int | None = None) -> AsyncIterator:
        """Yield the answer's text pieces as they are decided, then its result {text, finish_reason, tokens,
        prompt_tokens} (a dict, last). Leaving the loop early (client gone) frees the sequence's row."""
        if self._worker is None or self._worker.done():
            raise RuntimeError("the decode loop is not running")
        rng = None
        if settings.temperature > 0:
            rng = torch.Generator(device=self.gen.device)
            rng.manual_seed(secrets.randbits(63) if seed is None else seed % 2**63)
        seq = _Sequence(prompt, settings, asyncio.Queue(), rng)
        self._waiting.append(seq)
        self.observer.waiting(len(self._waiting))
        self._arrived.set()
        try:
            while True:
                item = await seq.events.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if isinstance(item, dict):
                    return
        finally:
            seq.cancelled = True

    async def complete(self, prompt: list[int], settings: Settings, seed: int | None = None) -> dict:
        """The whole answer: {text, finish_reason, tokens, prompt_tokens}."""
        async for item in self.stream(prompt, settings, seed):
            if isinstance(item, dict):
                return item
        raise RuntimeError("the decode loop ended without an answer")

    # -- the loop -----------------------------------------------------------------------------------------------

    def _admit(self) -> list[_Sequence]:
        """Waiting requests that fit the batch now, oldest first."""
        rows = [r for r in self._batch.rows if not r.cancelled]
        longest = max((r.budget for r in rows), default=0)
        joining: list[_Sequence] = []
        while self._waiting and len(rows) + len(joining) < self.max_rows:
            seq = self._waiting[0]
            if seq.cancelled:
                self._waiting.popleft()
                continue
            width = max(longest, seq.budget)
            if (rows or joining) and width * (len(rows) + len(joining) + 1) > self.max_tokens:
                break
            longest = width
            joining.append(self._waiting.popleft())
        return joining

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._batch.rows and not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            joining = self._admit()
            self.observer.waiting(len(self._waiting))
            try:
                sends = await loop.run_in_executor(self._executor, self._step, joining)
            except Exception as e:  # a failed batched forward fails every sequence in it
                log.exception("decode step failed")
                for seq in self._batch.rows + joining:
                    seq.events.put_nowait(e)
                self._batch = _Batch()
                continue
            for seq, item in sends:
                seq.events.put_nowait(item)

    def _step(self, joining: list[_Sequence]) -> list[tuple[_Sequence, object]]:
        """One decode step (inference thread): what to send to whom."""
        batch = self._batch
        batch.keep([i for i, r in enumerate(batch.rows) if not r.cancelled])
        start = time.perf_counter()
        picked: list[tuple[_Sequence, int]] = []
        with torch.inference_mode():  # bf16, when asked for, is in the weights (Generator.__init__), as in predict
            if batch.rows:
                picked += zip(batch.rows, pick_tokens(self._decode(batch), batch.rows))
                self.observer.decode_step(len(batch.rows), time.perf_counter() - start)
            sends = []
            for seq in joining:
                try:
                    picked.append((seq, self._prefill(seq)))
                except Exception as e:  # noqa: BLE001 - a prompt the model cannot take fails alone
                    sends.append((seq, e))
        batch.last = [token for _, token in picked]
        for seq, token in picked:
            sends += [(seq, item) for item in self._advance(seq, token)]
        batch.keep([i for i, r in enumerate(batch.rows) if not r.done])
        return sends

    def _decode(self, batch: _Batch) -> torch.Tensor:
        """Feed every row its last token: next-token logits (rows, vocab), float32."""
        dev = self.gen.device
        mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=torch.long, device=dev)], 1)
        # a row's position is its count of real tokens, as batched generate counts them under left padding
        positions = mask.sum(1, keepdim=True) - 1
        out = self.gen.model(input_ids=torch.tensor(batch.last, device=dev)[:, None], attention_mask=mask,
                             position_ids=positions, use_cache=True, **{self._cache_arg: batch.cache})
        batch.mask, batch.cache = mask, cache_of(out)
        return out.logits[:, -1].float()

    def _prefill(self, seq: _Sequence) -> int:
        """Run the prompt alone, join its cache to the batch; its first token."""
        ids = torch.tensor([seq.prompt], device=self.gen.device)
        out = self.gen.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **self._last_only)
        if self.max_rows > 1 and not mergeable(cache_of(out)):
            log.warning("this model's KV cache is not a plain DynamicCache: sequences decode one at a time")
            self.max_rows = 1
        (token,) = pick_tokens(out.logits[:, -1].float(), [seq])
        self._batch.join(seq, cache_of(out), token, self.gen.device)
        return token

    def _advance(self, seq: _Sequence, token: int) -> list:
        """Take the row's new token: the text it makes visible (if any), and the result when the row is done."""
        now = time.perf_counter()
        if seq.first_at is None:
            seq.first_at = now
            self.observer.first_token(now - seq.submitted)
        seq.ids.append(token)
        s, tok = seq.settings, self.gen.tokenizer
        text = tok.decode(seq.ids, skip_special_tokens=True)
        seq.done = token == self.gen.eos or len(seq.ids) >= s.max_new_tokens or any(x in text for x in s.stop)
        if seq.done:
            result = {**self.gen.finish(seq.ids, s), "prompt_tokens": len(seq.prompt)}
            self.observer.finished(len(seq.prompt), result["tokens"], now - seq.first_at)
            rest = result["text"][len(seq.sent):] if result["text"].startswith(seq.sent) else ""
            return ([rest] if rest else []) + [result]
        visible = text[:len(text) - held_back(text, s.stop)]
        if len(visible) <= len(seq.sent) or not visible.startswith(seq.sent):
            return []
        piece, seq.sent = visible[len(seq.sent):], visible
        return [piece]
