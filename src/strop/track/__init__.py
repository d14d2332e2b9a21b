"""Experiment tracking behind one small interface: `log(values, step)` and `close()`.

metrics.jsonl is always written; TensorBoard event files are added when `track` names it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def scalars(values: dict, prefix: str = "") -> dict[str, float]:
    """Flatten nested metric dicts to {'a/b': float}; non-numeric leaves (lists, strings) are skipped."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class JsonlTracker:
    """One JSON object per line: {'step': int, 'split': str, ...metrics}. Flushed per record so a crash keeps them."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardTracker:
    """Scalars as '<split>/<metric>' in TensorBoard event files under `folder`."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides events a crashed process wrote after its last checkpoint
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def log(self, record: dict) -> None:
        split = record.get("split", "train")
        for key, value in scalars({k: v for k, v in record.items() if k not in ("step", "epoch")}).items():
            self.writer.add_scalar(f"{split}/{key}", value, global_step=record.get("step", 0))

    def close(self) -> None:
        self.writer.close()


class Trackers:
    """Fan one record out to every configured tracker."""

    def __init__(self, run_dir: Path, names: list[str], purge_step: int | None = None):
        self.trackers = [JsonlTracker(run_dir / "metrics.jsonl")]
        if "tensorboard" in names:
            self.trackers.append(TensorBoardTracker(run_dir / "tb", purge_step))

    def log(self, record: dict) -> None:
        for t in self.trackers:
            t.log(record)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
