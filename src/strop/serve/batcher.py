"""Dynamic batching: inputs of concurrent requests share forward passes, bounded by a token budget and a max wait.

Requests put their inputs on one FIFO queue and await a future. A single worker task takes the longest queue prefix
whose padded size (inputs x longest input) fits `max_batch_tokens` (and `max_batch_size`), waiting at most
`max_wait_ms` after the first input for batch-mates (only while recent batches held several requests), runs it on one
inference thread (the event loop stays free for health checks and 429s) and routes each output back to its request;
the predictor splits it into length-sorted sub-batches of little padding (data.batching.eval_batches). A batch that
raises is re-run request by request, so one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from strop.serve.worker import BackgroundLoop


@dataclass
class _Request:
    """One request's inputs and where their outputs go."""

    texts: list[str]
    pairs: list[str] | None
    tokens: list[int]  # tokens per input (after truncation), for the budget
    future: asyncio.Future
    outputs: list = field(default_factory=list)
    pending: int = 0  # inputs not yet computed


@dataclass
class _Item:
    request: _Request
    index: int  # position of the input in its request
    arrived: float  # time.monotonic() when queued


RunBatch = Callable[[list[str], "list[str] | None"], list[dict]]


WAIT_WHEN_REQUESTS = 1.5  # wait for batch-mates while batches average at least this many requests


class Batcher(BackgroundLoop):
    """Groups inputs into batches and runs them with `run_batch(texts, pairs) -> outputs` on one thread.

    on_batch(inputs, padded_tokens, seconds) and on_depth(inputs_waiting) report to telemetry.
    """

    def __init__(self, run_batch: RunBatch, max_batch_tokens: int, max_batch_size: int, max_wait_ms: float,
                 enabled: bool = True, on_batch: Callable | None = None, on_depth: Callable | None = None):
        self.run_batch, self.enabled = run_batch, enabled
        self.max_batch_tokens, self.max_batch_size, self.max_wait = max_batch_tokens, max_batch_size, max_wait_ms / 1e3
        self.on_batch, self.on_depth = on_batch or (lambda *a: None), on_depth or (lambda n: None)
        self._queue: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        super().__init__("strop-infer")
        # requests per batch, moving average: waiting for batch-mates only pays while requests overlap; a lone
        # client would pay max_wait on every call for nothing (starts above the threshold: assume company)
        self._mean_requests = 2.0

    @property
    def depth(self) -> int:
        """Inputs waiting for a batch."""
        return len(self._queue)

    async def submit(self, texts: list[str], pairs: list[str] | None, tokens: list[int]) -> list[dict]:
        """Outputs for `texts` (and `pairs`), in order; raises what the model raised for this request alone."""
        if self._worker is None or self._worker.done():
            raise RuntimeError("the batcher is not running")
        request = _Request(texts, pairs, tokens, asyncio.get_running_loop().create_future(),
                           [None] * len(texts), len(texts))
        now = time.monotonic()
        self._queue.extend(_Item(request, i, now) for i in range(len(texts)))
        self.on_depth(len(self._queue))
        self._arrived.set()
        return await request.future

    def _take(self) -> list[_Item]:
        """The next batch from the queue head: one whole request when batching is off, else the longest prefix
        within the token budget (always at least one input)."""
        if any(it.request.future.done() for it in self._queue):
            # inputs of requests already answered (one that failed) or abandoned (its caller was cancelled): no
            # model time for them, wherever they wait
            self._queue = deque(it for it in self._queue if not it.request.future.done())
            if not self._queue:
                return []
        if not self.enabled:
            head = self._queue[0].request
            n = 0
            while n < len(self._queue) and self._queue[n].request is head:
                n += 1
            return [self._queue.popleft() for _ in range(n)]
        batch, longest = [], 0
        while self._queue and len(batch) < self.max_batch_size:
            width = max(longest, self._queue[0].request.tokens[self._queue[0].index])
            if batch and width * (len(batch) + 1) > self.max_batch_tokens:
                break
            longest = width
            batch.append(self._queue.popleft())
        return batch

    def _full(self) -> bool:
        """Whether the queue already holds a full batch (no reason to wait for more)."""
        if len(self._queue) >= self.max_batch_size:
            return True
        longest = max(it.request.tokens[it.index] for it in self._queue)
        return longest * (len(self._queue) + 1) > self.max_batch_tokens

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            # wait for batch-mates, at most max_wait after the oldest input arrived, and only while recent batches
            # held several requests (under load, inputs that queued during the last pass have waited long enough)
            while self.enabled and self._mean_requests >= WAIT_WHEN_REQUESTS and not self._full():
                left = self._queue[0].arrived + self.max_wait - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            self.on_depth(len(self._queue))
            if not batch:
                continue
            start = time.perf_counter()
            await self._compute(loop, batch)
            requests = len({id(it.request) for it in batch})
            self._mean_requests = 0.8 * self._mean_requests + 0.2 * requests
            longest = max(it.request.tokens[it.index] for it in batch)
            self.on_batch(len(batch), longest * len(batch), time.perf_counter() - start)

    async def _compute(self, loop, batch: list[_Item]) -> None:
        try:
            outputs = await loop.run_in_executor(self._executor, self._call, batch)
        except Exception as e:  # noqa: BLE001 - the error belongs to the request(s) that caused it
            by_request: dict[int, list[_Item]] = {}
            for it in batch:
                by_request.setdefault(id(it.request), []).append(it)
            if len(by_request) == 1:
                if not batch[0].request.future.done():
                    batch[0].request.future.set_exception(e)
                return
            # some request in this batch breaks the model: run each request's inputs alone so only it fails
            for items in by_request.values():
                await self._compute(loop, items)
            return
        for it, out in zip(batch, outputs):
            request = it.request
            request.outputs[it.index] = out
            request.pending -= 1
            if request.pending == 0 and not request.future.done():
                request.future.set_result(request.outputs)

    def _call(self, batch: list[_Item]) -> list[dict]:
        texts = [it.request.texts[it.index] for it in batch]
        pairs = None if batch[0].request.pairs is None else [it.request.pairs[it.index] for it in batch]
        return self.run_batch(texts, pairs)
