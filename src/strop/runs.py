"""Run folders on disk: finding a finished run's model, and writing its files whole or not at all."""

from __future__ import annotations

from pathlib import Path

from strop.errors import RunError


def open_run(path: str | Path) -> Path:
    """A finished run's model folder from a run folder or a model folder."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path} not found; give a run folder (runs/<name>) or its model/ folder")
    if (path / "model" / "strop.json").is_file():
        return path / "model"
    if (path / "strop.json").is_file():
        return path
    raise RunError(f"{path} has no finished model (no model/strop.json); did the run finish? "
                   f"Its config.yaml and metrics.jsonl show how far it got")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed into place: a reader sees the old file or the new
    one, never half of one (also when the process is killed mid-write)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
