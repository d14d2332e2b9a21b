"""A rich progress bar for training: steps, loss, lr and samples/s; plain lines when not on a terminal."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)


class TrainProgress:
    def __init__(self, total_steps: int, completed: int = 0):
        self.total = total_steps
        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                            console=console, transient=False, disable=not console.is_terminal)
        self.task = self.bar.add_task("train", total=total_steps, completed=completed, stats="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def advance(self, step: int) -> None:
        self.bar.update(self.task, completed=step)

    def update(self, step: int, record: dict) -> None:
        stats = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['samples_per_s']:.0f} samples/s"
        self.bar.update(self.task, completed=step, stats=stats)
        if not console.is_terminal and not console.quiet:  # logs and CI: one line per logged step, not a bar
            print(f"step {step}/{self.total}  {stats}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        console.print(text)
