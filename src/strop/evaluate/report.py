"""RUN/report.html: one self-contained page (inline PNG plots, inline CSS and script, no network) per run.

Sections: summary (config), data (split sizes, class balance, text lengths, texts shared between splits = leakage),
training curves (loss, lr, validation metrics), final metrics, confusion matrix and per-class scores, calibration
(reliability diagram + expected calibration error), the most confident errors with their token attributions,
a predicted-vs-true scatter for regression; for images, ROC curves and a grid of images with Grad-CAM
heatmaps. Built from the run folder alone (config.yaml, data.json, metrics.jsonl, results.json, model/), so
`strop report RUN` can rebuild it at any time.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from strop.config import load_config
from strop.errors import StropError
from strop.evaluate.report_parts import (CSS, SCRIPT, curves_section, data_section, metrics_section,
                                         summary_section)
from strop.explain.attribution import SPAN_CSS
from strop.runs import write_atomic
from strop.tasks import load_predictor, prepare

SECTIONS = ("summary", "data", "curves", "metrics", "generations", "entities", "confusion", "roc",
            "calibration", "images", "errors", "regression")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def build_report(run_dir: str | Path, explain_k: int = 5, errors_k: int = 10) -> Path:
    """Write run_dir/report.html from the run folder; returns its path."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        raise StropError(f"{run_dir} has no results.json: the run did not finish, so there is nothing to report")
    cfg = load_config(run_dir / "config.yaml")
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    data = json.loads((run_dir / "data.json").read_text(encoding="utf-8")) if (run_dir / "data.json").is_file() \
        else {}
    records = _read_jsonl(run_dir / "metrics.jsonl")
    predictor = load_predictor(run_dir)
    meta = predictor.meta
    try:
        ds = prepare(cfg)
    except StropError:
        ds = None  # data moved or deleted since training: the sections that need texts say so
    sections = {"summary": summary_section(cfg, results, meta), "data": data_section(data, ds),
                "curves": curves_section(records, results.get("metric", "loss")),
                "metrics": metrics_section(results)}
    split = "test" if ds and "test" in ds.splits else "validation" if ds and "validation" in ds.splits else None
    examples = ds.splits[split] if ds is not None and split else None
    parts, extra = predictor.task.report_sections(predictor, examples, results, split, errors_k, explain_k)
    sections.update(parts)
    titles = {"summary": "Run", "data": "Data", "entities": "Entities", "curves": "Training curves",
              "metrics": "Final metrics", "confusion": "Confusion matrix", "calibration": "Calibration",
              "errors": f"Most confident errors ({split})", "regression": "Predicted vs true",
              "roc": "ROC curves", "images": f"Images with Grad-CAM ({split})",
              "generations": f"Sample answers ({split})"}
    body = "".join(f'<section id="{k}"><h2>{titles[k]}</h2>{sections[k]}</section>' for k in SECTIONS
                   if sections.get(k))
    nav = " ".join(f'<a href="#{k}">{titles[k]}</a>' for k in SECTIONS if sections.get(k))
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>strop report: {html.escape(run_dir.name)}</title>'
            f'<style>{CSS}{SPAN_CSS}</style></head><body><main><h1>strop report: {html.escape(run_dir.name)}</h1>'
            f'<p>{html.escape(time.strftime("%Y-%m-%d %H:%M"))} · {html.escape(str(run_dir))}</p><nav>{nav}</nav>'
            f'{body}</main><script>{SCRIPT}</script></body></html>')
    out = run_dir / "report.html"
    write_atomic(out, page)
    write_atomic(run_dir / "report.json", json.dumps(extra, indent=2))
    return out
