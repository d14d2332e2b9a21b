"""One background asyncio task that feeds a single inference thread: what the classification batcher and the
generation decode loop share (start inside the server's event loop, stop on shutdown)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor


class BackgroundLoop:
    """Subclasses define `async def _run(self)`, which hands model work to `self._executor` (one thread: torch
    runs one batch at a time and uses every core for it)."""

    def __init__(self, name: str):
        self._name = name
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._worker: asyncio.Task | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)
