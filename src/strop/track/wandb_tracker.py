"""Weights & Biases tracking, offline by default: the run is written under <run_dir>/wandb/offline-run-*/ and nothing
leaves the machine. Upload it later with `wandb sync runs/<name>/wandb/offline-run-*`, or set wandb.mode=online.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from strop.config import to_dict
from strop.track import require, scalars


def wandb_mode(cfg) -> str:
    """wandb.mode if set, else the WANDB_MODE environment variable, else offline."""
    return cfg.wandb.mode or os.environ.get("WANDB_MODE") or "offline"


class WandbTracker:
    def __init__(self, run_dir: Path, cfg, resumed_from: int = 0):
        mode = wandb_mode(cfg)
        os.environ["WANDB_MODE"] = mode  # also for the wandb-core service process it starts
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb = require("wandb", "wandb")
        self.run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=run_dir.name,
                              dir=str(run_dir), config=to_dict(cfg), mode=mode, reinit="create_new",
                              tags=[f"resumed_from_step_{resumed_from}"] if resumed_from else None)

    def log(self, record: dict) -> None:
        split = record.get("split", "train")
        values = scalars({k: v for k, v in record.items() if k not in ("step", "split")})
        # W&B steps must not go backwards; several records at one step (train, validation, final) merge into it
        self.run.log({f"{split}/{k}": v for k, v in values.items()}, step=int(record.get("step", 0)))

    def finish(self, run_dir: Path) -> None:
        results = run_dir / "results.json"
        if results.is_file():
            self.run.summary.update(scalars(json.loads(results.read_text(encoding="utf-8"))))

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
