"""Experiment tracking behind one small interface: `log(record)`, `finish(run_dir)` and `close()`.

metrics.jsonl is always written; `track` adds TensorBoard event files, MLflow (local SQLite store) and Weights &
Biases (offline). `finish(run_dir)` runs once the final model is saved: trackers that keep artifacts log it then.
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
    """Fan one record out to every configured tracker. `config` (the resolved Config) is needed for mlflow/wandb."""

    def __init__(self, run_dir: Path, names: list[str], purge_step: int | None = None, config=None):
        self.trackers = [JsonlTracker(run_dir / "metrics.jsonl")]
        if "tensorboard" in names:
            self.trackers.append(TensorBoardTracker(run_dir / "tb", purge_step))
        if "mlflow" in names:
            from strop.track.mlflow_tracker import MlflowTracker

            self.trackers.append(MlflowTracker(run_dir, config, resumed_from=(purge_step or 1) - 1))
        if "wandb" in names:
            from strop.track.wandb_tracker import WandbTracker

            self.trackers.append(WandbTracker(run_dir, config, resumed_from=(purge_step or 1) - 1))

    def log(self, record: dict) -> None:
        for t in self.trackers:
            t.log(record)

    def finish(self, run_dir: Path) -> None:
        """The run succeeded and run_dir/model is written: log final artifacts, then close every tracker."""
        for t in self.trackers:
            if hasattr(t, "finish"):
                t.finish(run_dir)
        self.close()

    def close(self, failed: bool = False) -> None:
        for t in self.trackers:
            t.close(failed) if hasattr(t, "finish") else t.close()


class NoTracker:
    """What processes other than rank 0 log to in multi-process training: nothing."""

    def log(self, record: dict) -> None:
        pass

    def finish(self, run_dir: Path) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def check_trackers(names: list[str]) -> None:
    """Fail before the run folder exists when a configured tracker's library is missing."""
    for name in ("mlflow", "wandb"):
        if name in names:
            require(name, name)


def require(module: str, extra: str):
    """Import an optional tracker library, or fail with the install command."""
    import importlib

    from strop.errors import ConfigError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"track includes {extra} but the {module} package is not installed; "
                          f"pip install 'strop[{extra}]' (or drop {extra} from track)") from None
