"""Hyperparameter search: `strop tune CONFIG --trials N` with Optuna (TPE sampler, median pruning).

Each trial is a normal strop run with the sampled values as overrides: runs/<name>-trial-<k>/ for the default study
(tune.study empty or equal to the run name), runs/<name>-<study>-trial-<k>/ for any other, so two studies of one run
name never share a folder. After every validation the loop reports the metric to the trial (`on_eval`); the median
pruner stops trials that are worse than the median of earlier trials at the same step (few-shot runs validate only at
the end: they are scored on that final validation and never pruned). The study lives in a local SQLite file, so
re-running the same command after an interruption continues the search, and searches of one study may run side by
side. runs/<name>-tune/ (runs/<name>-<study>-tune/) gets best.yaml (a ready-to-run config), trials.json, trials.png,
report.html and study.json.

Folders know their study (a trial's config.yaml holds tune.study; a tune folder has study.json), and a search never
overwrites a folder that another study, or a plain run, wrote.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path


from strop.config import load_config
from strop.errors import ConfigError
from strop.training.progress import console
from strop.tune_study import (TuneResult, check_trial_folder, check_tune_folder, overrides_dict, study_settings, suggest, trial_overrides, trial_value, write_outputs)

OWNER = "strop_owner"  # trial user attr {host, pid, started}: the process running the trial (see _fail_stale)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("strop tune needs Optuna; pip install 'strop[tune]'") from None
    return optuna


def tune(config=None, overrides=None, trials: int | None = None) -> TuneResult:
    """Run (or continue) the search the config's `tune` section describes until `trials` trials are finished."""
    from strop.run import train

    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = overrides_dict(overrides)
    cfg = load_config(config, base)
    prefix, storage, study_name, direction = study_settings(cfg)
    n_trials = trials or cfg.tune.trials
    if cfg.tune.backend == "ray":
        from strop.tune_ray import tune_with_ray

        return tune_with_ray(config, base, cfg, n_trials)
    output_dir = Path(cfg.output_dir)
    check_tune_folder(output_dir / f"{prefix}-tune", study_name)  # now, not after the trials
    output_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.train.seed if cfg.tune.seed is None else cfg.tune.seed
    startup = cfg.tune.startup_trials
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0) if cfg.tune.pruner == "median"
              else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, study_name=study_name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)  # same storage + name: continue the search
    if not cfg.tune.storage:  # a shared store may hold the live trials of machines whose processes we cannot see
        _fail_stale(study)
    finished = _finished(study)
    if finished:
        console.print(f"continuing study {study_name!r} ({storage}): {finished} of {n_trials} trials finished")
    owner = this_process()

    def objective(trial) -> float:
        trial.set_user_attr(OWNER, owner)  # first: another search of this study must see that this trial is live
        values = suggest(trial, cfg.tune.space)
        run_dir = output_dir / f"{prefix}-trial-{trial.number}"
        check_trial_folder(run_dir, study_name)
        trial.set_user_attr("run_dir", str(run_dir))
        console.print(f"[bold]trial {trial.number}[/bold]: {values}")

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                console.print(f"trial {trial.number} pruned at step {step} ({value:.4f} is worse than the median of "
                              "earlier trials at this step)")
                raise optuna.TrialPruned(f"step {step}")

        # on_eval is never called in a few-shot run (no validation during training): nothing to prune there
        return trial_value(train(config, trial_overrides(cfg, base, values, run_dir.name, study_name),
                                 overwrite=True, on_eval=report).results)

    run_trials(study, objective, max(0, n_trials - finished))
    return write_outputs(study_rows(study), study_name, direction, output_dir, prefix)


def run_trials(study, objective, n: int) -> None:
    """study.optimize(objective, n_trials=n), spelled out so that a trial another process finished meanwhile (marked
    failed, say) is reported and the search goes on, instead of Optuna's 'Cannot tell a FAIL trial'."""
    optuna = _optuna()
    from optuna.trial import TrialState

    for _ in range(n):
        trial = study.ask()
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            _tell(study, trial, state=TrialState.PRUNED)
        except optuna.exceptions.UpdateFinishedTrialError:  # set_user_attr or report on a trial finished elsewhere
            _finished_elsewhere(study, trial, None)
        except BaseException:
            _tell(study, trial, state=TrialState.FAIL)
            raise
        else:
            _tell(study, trial, value)


def _tell(study, trial, value: float | None = None, state=None) -> None:
    optuna = _optuna()
    try:
        study.tell(trial, value, state=state)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        # FrozenTrial has no public id; storages key trials by _trial_id
        if not study._storage.get_trial(trial._trial_id).state.is_finished():
            raise  # a bad value, not a trial finished elsewhere
        _finished_elsewhere(study, trial, value)


def _finished_elsewhere(study, trial, value: float | None) -> None:
    """Another process finished (marked failed) a trial this one was running: say so, keep the run folder, and record
    a run that did finish as a new trial, so that its result still counts."""
    optuna = _optuna()
    now = study._storage.get_trial(trial._trial_id)
    run_dir = now.user_attrs.get("run_dir")
    what = f"trial {trial.number} was marked {now.state.name} by another process"
    if run_dir is None:
        console.print(f"[yellow]{what} before it started: nothing ran[/yellow]")
    elif value is None or not math.isfinite(value):
        console.print(f"[yellow]{what} while this one ran it: it does not count (its run folder {run_dir} is "
                      "kept)[/yellow]")
    else:
        study.add_trial(optuna.trial.create_trial(
            params=now.params, distributions=now.distributions, value=value,
            intermediate_values=now.intermediate_values, user_attrs={**now.user_attrs, "recorded_from": trial.number}))
        again = next(t.number for t in reversed(study.trials) if t.user_attrs.get("recorded_from") == trial.number)
        console.print(f"[yellow]{what} while this one ran it; its run {run_dir} finished ({value:.4f}) and is "
                      f"recorded again as trial {again}[/yellow]")


def _finished(study) -> int:
    states = (study.trials[0].state.COMPLETE, study.trials[0].state.PRUNED) if study.trials else ()
    return sum(t.state in states for t in study.trials)


def _fail_stale(study) -> None:
    """Trials a killed search left RUNNING will never finish: mark them failed so they neither count nor block.

    A RUNNING trial is stale when the process that runs it (its OWNER attr) is gone from this machine, or when it has
    no owner (a search from before strop recorded owners, or killed in the moment between asking for the trial and
    recording itself). Trials of a live search of the same study, and trials run on other machines (whose processes
    this one cannot see), are left to them."""
    optuna = _optuna()
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER)
        if owner and owner["host"] != host:
            console.print(f"[dim]trial {t.number} is running on {owner['host']}: left to it[/dim]")
            continue
        if owner and not _process_gone(owner):
            console.print(f"[dim]trial {t.number} is running in another search of this study (process "
                          f"{owner['pid']}): left to it[/dim]")
            continue
        try:  # FrozenTrial has no public id; storages key trials by _trial_id
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # its search finished it a moment ago
        console.print(f"[yellow]trial {t.number} was left running by an interrupted search: marked failed[/yellow]")


def this_process() -> dict:
    """The OWNER record of trials this process runs: host, pid, and start time (s since the epoch), which tells this
    process from a later one that reuses its pid."""
    try:
        import psutil

        started = psutil.Process().create_time()
    except ImportError:
        started = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started}


def _process_gone(owner: dict) -> bool:
    """Whether the process an OWNER record names (on this machine) has ended. Without psutil this cannot be told
    safely, and the trial is left running (it is not counted either way)."""
    try:
        import psutil
    except ImportError:
        return False
    try:
        process = psutil.Process(owner["pid"])
        reused = owner.get("started") is not None and abs(process.create_time() - owner["started"]) > 1.0
        return reused or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def study_rows(study) -> list[dict]:
    """One row per Optuna trial: number, state (COMPLETE/PRUNED/FAIL/RUNNING), value, params, run_dir, intermediate."""
    return [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "run_dir": t.user_attrs.get("run_dir"), "intermediate": {str(k): v for k, v in
                                                                       sorted(t.intermediate_values.items())}}
            for t in study.trials]


