"""What can stop a training step: Ctrl-C/SIGTERM, non-finite numbers, running out of memory."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from strop.errors import StropError


class NonFiniteError(StropError):
    """The loss or the gradient norm became NaN or Inf."""


class TrainingInterrupted(StropError):
    """Ctrl-C or SIGTERM: the loop stopped at a step boundary and wrote a checkpoint."""

    exit_code = 130

    def __init__(self, run_dir: Path, step: int, signame: str):
        self.run_dir, self.step = run_dir, step
        super().__init__(f"{signame} received: stopped after step {step} and saved a checkpoint in "
                         f"{run_dir / 'checkpoints'}. Resume with: strop train --resume {run_dir}")


class StopSignals:
    """While active, the first SIGINT/SIGTERM only sets `requested` (the loop finishes its step, checkpoints and
    stops); a second one interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested:  # second signal: the user means it
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        return False


def is_finite(*values: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in values)


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class MicroBatchSize:
    """The examples per forward pass. On out-of-memory it halves (when allowed) so the step can be retried with more
    accumulation and the same effective batch; otherwise it says which setting to lower."""

    def __init__(self, size: int, auto: bool, floor: int = 1):
        self.size, self.auto, self.floor = size, auto, floor

    def run(self, step_fn, model, note):
        """Call step_fn(micro_batch_size) until it fits; returns its result."""
        while True:
            try:
                return step_fn(self.size)
            except (RuntimeError, torch.OutOfMemoryError) as e:
                if not is_oom(e):
                    raise
                model.zero_grad(set_to_none=True)  # a half-accumulated step must not leak into the retry
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if not self.auto or self.size // 2 < self.floor:
                    raise StropError(f"out of memory with {self.size} examples per forward pass. Lower "
                                     "train.micro_batch_size (gradient accumulation keeps the effective batch), or "
                                     "model.max_length, or set train.auto_batch_size=true") from None
                self.size //= 2
                note(f"[yellow]out of memory: micro-batch lowered to {self.size} (accumulating to keep the "
                     f"effective batch)[/yellow]")
