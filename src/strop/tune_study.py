"""What a hyperparameter search keeps whatever runs its trials (Optuna in-process, or Ray Tune): the search space
sampled, each trial's overrides and score, which trial is best, and the study's outputs (best.yaml, trials.json,
trials.png, report.html). `tune.py` runs trials with Optuna, `tune_ray.py` with Ray; both use these."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from strop.config import Config, check_run_name, parse_override
from strop.errors import ConfigError, RunError
from strop.evaluate.metrics import greater_is_better
from strop.training.progress import console



@dataclass
class TuneResult:
    tune_dir: Path
    best_value: float | None
    best_params: dict
    best_run: Path | None
    trials: list[dict]


def suggest(trial, space: dict) -> dict:
    """One value per key of `tune.space` (validated in config.validate_tune)."""
    values = {}
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        if kind == "log_uniform":
            values[key] = trial.suggest_float(key, args[0], args[1], log=True)
        elif kind == "uniform":
            values[key] = trial.suggest_float(key, args[0], args[1])
        elif kind == "int":
            values[key] = trial.suggest_int(key, args[0], args[1])
        else:
            values[key] = trial.suggest_categorical(key, args)
    return values


def overrides_dict(overrides) -> dict:
    if isinstance(overrides, dict):
        return dict(overrides)
    return dict(parse_override(o) for o in overrides or [])


def trial_overrides(cfg: Config, base: dict, values: dict, run_name: str, study_name: str) -> dict:
    """The overrides of one trial's run: the command line's, the sampled values, the trial's run name, and
    tune.study, which the run's config.yaml keeps as the mark of the study its folder belongs to."""
    run_overrides = {**base, **values, "name": run_name, "tune.study": study_name}
    if cfg.tune.metric != "auto":
        run_overrides["train.metric"] = cfg.tune.metric
    return run_overrides


def trial_value(results: dict) -> float:
    """A finished trial's objective: the best validation metric of its run (the weights it keeps), or, for a run that
    does not validate during training (train.mode=fewshot), the metric of its final validation."""
    if results["best_metric"] is not None:
        return results["best_metric"]
    final = results.get("validation", {}).get(results["metric"])
    if final is None:
        raise ConfigError("tuning needs a validation split to score trials; give data.validation or keep "
                          "data.validation_ratio > 0")
    return final


def validation_loss(run_dir: str | None) -> float:
    """The validation loss at a finished run's best step (results.json), +inf when it is not known."""
    try:
        loss = json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8")).get("best_loss")
    except (OSError, TypeError, ValueError):
        return math.inf
    return math.inf if loss is None else float(loss)


def ranking(row: dict, direction: str) -> tuple:
    """Sort key of a finished trial, best first: its value, then its validation loss, then its number."""
    value = -row["value"] if direction == "maximize" else row["value"]
    return value, validation_loss(row.get("run_dir")), row["number"]


def study_settings(cfg: Config) -> tuple[str, str, str, str]:
    """(folder prefix, storage URL, study name, direction) of the search the config describes.

    Trial folders are <output_dir>/<prefix>-trial-<k> and the outputs <output_dir>/<prefix>-tune/; the prefix is the
    run name for the default study (tune.study empty or equal to the name), else <name>-<study>. The default storage
    is <output_dir>/<name>-tune.db for every study of the name."""
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty; declare what to search, e.g. in YAML:\n"
                          "tune:\n  space:\n    train.lr: {log_uniform: [1e-5, 1e-3]}\n    peft.r: {choice: [4, 8, 16]}")
    if not cfg.name and not cfg.data.train:
        raise ConfigError("give the search a name (name=...) or data.train")
    name = cfg.name or Path(cfg.data.train).stem
    storage = cfg.tune.storage or f"sqlite:///{Path(cfg.output_dir).resolve() / f'{name}-tune.db'}"
    metric = cfg.tune.metric if cfg.tune.metric != "auto" else cfg.train.metric
    direction = cfg.tune.direction
    if direction == "auto":  # the auto metrics (accuracy, micro_f1, pearson) are all higher-is-better
        direction = "maximize" if metric == "auto" or greater_is_better(metric) else "minimize"
    study_name = cfg.tune.study or name
    prefix = name if study_name == name else f"{name}-{study_name}"
    try:
        check_run_name(f"{prefix}-trial-0")
    except ConfigError:
        raise ConfigError(f"tune.study={study_name!r} must fit in a folder name (no '/' or '\\'): trial folders are "
                          f"<output_dir>/<name>-<study>-trial-<k>") from None
    return prefix, storage, study_name, direction


def check_trial_folder(run_dir: Path, study_name: str) -> None:
    """Refuse to run a trial in a folder that another study, or a plain run, wrote: overwriting it would lose that
    work. A trial's config.yaml records its study (tune.study, set by trial_overrides)."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    try:
        owner = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")).get("tune") or {}).get("study")
    except (OSError, AttributeError, yaml.YAMLError):
        owner = None
    if owner != study_name:
        _refuse(run_dir, owner, study_name)


def check_tune_folder(tune_dir: Path, study_name: str) -> None:
    """Refuse to write a search's outputs over another study's; study.json names the study (a folder written before
    strop kept study.json is taken as this study's)."""
    marker = tune_dir / "study.json"
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text(encoding="utf-8")).get("study")
        except (OSError, ValueError, AttributeError):
            owner = None
        if owner != study_name:
            _refuse(tune_dir, owner, study_name)


def _refuse(folder: Path, owner: str | None, study_name: str) -> None:
    whose = f"study {owner!r}" if owner else "a run that names no study (a plain run, or an older strop's trial)"
    raise RunError(f"{folder} holds the work of {whose}, and study {study_name!r} will not overwrite it; give this "
                   f"search other folders with tune.study=<another name> (or name=...), or move {folder} away")


def write_outputs(rows: list[dict], study_name: str, direction: str, output_dir: Path, prefix: str) -> TuneResult:
    """<output_dir>/<prefix>-tune/: trials.json, best.yaml (ready to run, as run <prefix>-best), trials.png,
    report.html and study.json (the study the folder belongs to).

    rows: study_rows() or the Ray backend's equivalent; direction: 'maximize' or 'minimize'; prefix: study_settings'."""
    tune_dir = output_dir / f"{prefix}-tune"
    check_tune_folder(tune_dir, study_name)
    tune_dir.mkdir(parents=True, exist_ok=True)
    (tune_dir / "study.json").write_text(json.dumps({"study": study_name, "direction": direction}), encoding="utf-8")
    (tune_dir / "trials.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    # as in the training loop: a tie of the metric goes to the lower validation loss, then to the first trial
    best = min(complete, key=lambda r: ranking(r, direction)) if complete else None
    best_run = Path(best["run_dir"]) if best else None
    if best is not None:
        cfg = yaml.safe_load((best_run / "config.yaml").read_text(encoding="utf-8"))
        cfg["name"] = f"{prefix}-best"
        header = (f"# best of {len(complete)} finished trials of study {study_name!r}: value {best['value']:.6g} "
                  f"(trial {best['number']}, {best_run})\n# params: {json.dumps(best['params'])}\n"
                  f"# run it: strop train {tune_dir / 'best.yaml'}\n")
        (tune_dir / "best.yaml").write_text(header + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        console.print(f"best trial {best['number']}: {best['value']:.4f} with {best['params']}; config: "
                      f"{tune_dir / 'best.yaml'}")
    plot_trials(rows, study_name, direction, tune_dir / "trials.png")
    _report_html(rows, study_name, direction, tune_dir)
    return TuneResult(tune_dir, best["value"] if best else None, best["params"] if best else {}, best_run, rows)


def plot_trials(rows: list[dict], study_name: str, direction: str, path: Path) -> None:
    """Left: each trial's value (pruned trials at their last report) and the best so far; right: the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(r: dict) -> tuple[list[int], list[float]]:
        steps = sorted(r["intermediate"], key=int)
        return [int(s) for s in steps], [r["intermediate"][s] for s in steps]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    done = [r for r in rows if r["state"] == "COMPLETE"]
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["intermediate"]]
    left.scatter([r["number"] for r in done], [r["value"] for r in done], label="finished", color="tab:blue")
    left.scatter([r["number"] for r in pruned], [curve(r)[1][-1] for r in pruned],
                 marker="x", label="pruned (last report)", color="tab:red")
    better = max if direction == "maximize" else min
    best, xs, ys = None, [], []
    for r in sorted(done, key=lambda r: r["number"]):
        best = r["value"] if best is None else better(best, r["value"])
        xs.append(r["number"])
        ys.append(best)
    left.step(xs, ys, where="post", color="tab:green", label="best so far")
    left.set(xlabel="trial", ylabel="objective", title=f"{study_name}: {direction}")
    left.legend()
    for r in rows:
        if r["intermediate"]:
            right.plot(*curve(r), marker=".", linestyle="--" if r["state"] == "PRUNED" else "-",
                       label=f"trial {r['number']}")
    right.set(xlabel="step", ylabel="validation metric", title="intermediate values (dashed: pruned)")
    if len(rows) <= 12 and any(r["intermediate"] for r in rows):  # few-shot trials report no curves
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _report_html(rows: list[dict], study_name: str, direction: str, tune_dir: Path) -> None:
    def row(r: dict) -> str:
        value = "" if r["value"] is None else f"{r['value']:.5g}"
        return (f"<tr><td>{r['number']}</td><td>{r['state']}</td><td>{value}</td>"
                f"<td>{html.escape(json.dumps(r['params']))}</td><td>{html.escape(str(r['run_dir']))}</td></tr>")

    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(study_name)}</title>"
            f"<h1>Search {html.escape(study_name)} ({direction})</h1>"
            "<img src='trials.png' alt='trials'><table border='1' cellpadding='4'>"
            "<tr><th>trial</th><th>state</th><th>value</th><th>params</th><th>run</th></tr>"
            f"{''.join(map(row, rows))}</table>")
    (tune_dir / "report.html").write_text(page, encoding="utf-8")
