"""Hyperparameter search: `strop tune CONFIG --trials N` with Optuna (TPE sampler, median pruning).

Each trial is a normal strop run (runs/<name>-trial-<k>/) with the sampled values as overrides. After every
validation the loop reports the metric to the trial (`on_eval`); the median pruner stops trials that are worse than the
median of earlier trials at the same step. The study lives in a local SQLite file, so re-running the same command
after an interruption continues the search. runs/<name>-tune/ gets best.yaml (a ready-to-run config), trials.json,
trials.png and report.html.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from strop.config import Config, load_config, parse_override
from strop.errors import ConfigError
from strop.evaluate.metrics import greater_is_better
from strop.training.progress import console


@dataclass
class TuneResult:
    tune_dir: Path
    best_value: float | None
    best_params: dict
    best_run: Path | None
    trials: list[dict]


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("strop tune needs Optuna; pip install 'strop[tune]'") from None
    return optuna


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


def _overrides_dict(overrides) -> dict:
    if isinstance(overrides, dict):
        return dict(overrides)
    return dict(parse_override(o) for o in overrides or [])


def trial_overrides(cfg: Config, base: dict, values: dict, run_name: str) -> dict:
    """The overrides of one trial's run: the command line's, the sampled values, the trial's run name."""
    run_overrides = {**base, **values, "name": run_name}
    if cfg.tune.metric != "auto":
        run_overrides["train.metric"] = cfg.tune.metric
    return run_overrides


def trial_value(results: dict) -> float:
    """A finished trial's objective: the best validation metric of its run (the weights it keeps)."""
    if results["best_metric"] is None:
        raise ConfigError("tuning needs a validation split to score trials; give data.validation or keep "
                          "data.validation_ratio > 0")
    return results["best_metric"]


def study_settings(cfg: Config) -> tuple[str, str, str, str]:
    """(base name, storage URL, study name, direction) of the search the config describes."""
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
    return name, storage, cfg.tune.study or name, direction


def tune(config=None, overrides=None, trials: int | None = None) -> TuneResult:
    """Run (or continue) the search the config's `tune` section describes until `trials` trials are finished."""
    from strop.run import train

    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = _overrides_dict(overrides)
    cfg = load_config(config, base)
    name, storage, study_name, direction = study_settings(cfg)
    n_trials = trials or cfg.tune.trials
    if cfg.tune.backend == "ray":
        from strop.tune_ray import tune_with_ray

        return tune_with_ray(config, base, cfg, n_trials)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    seed = cfg.train.seed if cfg.tune.seed is None else cfg.tune.seed
    startup = cfg.tune.startup_trials
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0) if cfg.tune.pruner == "median"
              else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, study_name=study_name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)  # same storage + name: continue the search
    if not cfg.tune.storage:  # the default store is this machine's alone; a shared one may hold others' live trials
        _fail_stale(study)
    finished = _finished(study)
    if finished:
        console.print(f"continuing study {study_name!r} ({storage}): {finished} of {n_trials} trials finished")

    def objective(trial) -> float:
        values = suggest(trial, cfg.tune.space)
        run_name = f"{name}-trial-{trial.number}"
        trial.set_user_attr("run_dir", str(Path(cfg.output_dir) / run_name))
        console.print(f"[bold]trial {trial.number}[/bold]: {values}")

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                console.print(f"trial {trial.number} pruned at step {step} ({value:.4f} is worse than the median of "
                              "earlier trials at this step)")
                raise optuna.TrialPruned(f"step {step}")

        return trial_value(train(config, trial_overrides(cfg, base, values, run_name), overwrite=True,
                                 on_eval=report).results)

    remaining = max(0, n_trials - finished)
    if remaining:
        study.optimize(objective, n_trials=remaining)
    return write_outputs(study_rows(study), study_name, direction, Path(cfg.output_dir), name)


def _finished(study) -> int:
    states = (study.trials[0].state.COMPLETE, study.trials[0].state.PRUNED) if study.trials else ()
    return sum(t.state in states for t in study.trials)


def _fail_stale(study) -> None:
    """Trials a killed search left RUNNING will never finish: mark them failed so they neither count nor block."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # FrozenTrial has no public id; storages key trials by _trial_id
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        console.print(f"[yellow]trial {t.number} was left running by an interrupted search: marked failed[/yellow]")


def study_rows(study) -> list[dict]:
    """One row per Optuna trial: number, state (COMPLETE/PRUNED/FAIL/RUNNING), value, params, run_dir, intermediate."""
    return [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "run_dir": t.user_attrs.get("run_dir"), "intermediate": {str(k): v for k, v in
                                                                       sorted(t.intermediate_values.items())}}
            for t in study.trials]


def write_outputs(rows: list[dict], study_name: str, direction: str, output_dir: Path, name: str) -> TuneResult:
    """runs/<name>-tune/: trials.json, best.yaml (ready to run), trials.png and report.html.

    rows: study_rows() or the Ray backend's equivalent; direction: 'maximize' or 'minimize'."""
    tune_dir = output_dir / f"{name}-tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    (tune_dir / "trials.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    better = max if direction == "maximize" else min
    # the first of equal values wins, as in Optuna's best_trial
    best = better(complete, key=lambda r: r["value"]) if complete else None
    best_run = Path(best["run_dir"]) if best else None
    if best is not None:
        cfg = yaml.safe_load((best_run / "config.yaml").read_text(encoding="utf-8"))
        cfg["name"] = f"{name}-best"
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
    if len(rows) <= 12:
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
