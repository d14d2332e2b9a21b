"""`strop tune` with `tune.backend: ray`: the same search as tune.py, with each trial a Ray Tune trial.

Ray places trials on the machines of a cluster (or a local instance); Optuna's TPE still proposes the values (through
Ray's OptunaSearch, with tune.py's `suggest` as its define-by-run space) and Ray's MedianStoppingRule stops trials
whose validation metric falls below the median of the others at the same step (`tune.pruner: median`). Inside a
trial, strop.run.train runs as usual and its `on_eval` hook reports each validation to Ray; the trial is a normal run
folder named as with the Optuna backend (runs/<name>-trial-<k>/, or runs/<name>-<study>-trial-<k>/ when tune.study is
not the run name), and runs/<name>[-<study>]-tune/ gets the same best.yaml, trials.json, trials.png, report.html and
study.json. A trial refuses a folder another study wrote. Ray's own experiment state goes to runs/ray/<study>/.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from strop.config import Config
from strop.errors import ConfigError
from strop.training.progress import console

OBJECTIVE = "objective"
TRIAL_NUMBER = "trial_number"


def _ray():
    try:
        import ray
        from ray import tune  # noqa: F401  (ray[tune] extra: pandas, pyarrow, fsspec)
        from ray.tune.search.optuna import OptunaSearch  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"tune.backend=ray needs Ray Tune and Optuna ({e}); pip install 'strop[ray]'") from None
    return ray


def start_ray(cfg: Config) -> bool:
    """Join the cluster tune.ray_address (or RAY_ADDRESS) names, else start a local instance sized for
    tune.concurrent trials. Returns True if this call connected (so the caller shuts it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    address = cfg.tune.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, configure_logging=False)
        console.print(f"ray: joined {address} ({ray.cluster_resources().get('CPU', 0):g} CPUs)")
    else:  # a local instance uses only what the trials need, not every core of the machine
        t = cfg.tune
        ray.init(num_cpus=max(1, int(t.concurrent * t.cpus_per_trial + 0.999)), num_gpus=int(t.concurrent *
                 t.gpus_per_trial + 0.999), include_dashboard=False, configure_logging=False)
        console.print("ray: started a local instance")
    return True


def define_space(trial, space: dict) -> dict:
    """OptunaSearch's define-by-run space: tune.py's `suggest`, plus the Optuna trial number as a constant that Ray
    passes to the trial (its run folder is <prefix>-trial-<number>, as with the Optuna backend). A module-level
    function so Ray can pickle the searcher into its experiment state."""
    from strop.tune_study import suggest

    suggest(trial, space)
    return {TRIAL_NUMBER: trial.number}


def make_trainable(config, base: dict, cfg: Config, prefix: str, study_name: str, workdir: str):
    """The function Ray runs once per trial (in a worker process, maybe on another machine)."""
    space = cfg.tune.space
    output_dir = str(Path(cfg.output_dir).resolve())
    config = str(Path(config).resolve()) if isinstance(config, (str, Path)) else config

    def trainable(params: dict) -> None:
        from ray import tune

        from strop.run import train
        from strop.tune_study import check_trial_folder, trial_overrides, trial_value

        os.chdir(workdir)  # Ray starts trials in their own folder; relative data paths are the caller's
        number = params[TRIAL_NUMBER]
        values = {key: params[key] for key in space}
        run_name = f"{prefix}-trial-{number}"
        check_trial_folder(Path(output_dir) / run_name, study_name)
        overrides = {**trial_overrides(cfg, base, values, run_name, study_name), "output_dir": output_dir}

        def report(step: int, value: float) -> None:
            # the scheduler may stop the trial here (Ray ends the worker): the partial run folder stays
            tune.report({OBJECTIVE: value, "step": step, "final": False})

        results = train(config, overrides, overwrite=True, on_eval=report).results
        tune.report({OBJECTIVE: trial_value(results), "step": results["steps"], "final": True})

    return trainable


def tune_with_ray(config, base: dict, cfg: Config, n_trials: int):
    """Run `n_trials` trials as one Ray Tune experiment; write the same outputs as the Optuna backend."""
    import optuna

    from strop.tune_study import check_tune_folder, study_settings, write_outputs

    prefix, _, study_name, direction = study_settings(cfg)
    if cfg.tune.storage:
        raise ConfigError("tune.storage is the Optuna backend's shared study; with tune.backend=ray Ray places the "
                          "trials (and keeps its state in <output_dir>/ray/): drop tune.storage")
    ray = _ray()
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler, MedianStoppingRule
    from ray.tune.search.optuna import OptunaSearch

    t = cfg.tune
    seed = cfg.train.seed if t.seed is None else t.seed
    mode = "max" if direction == "maximize" else "min"
    searcher = OptunaSearch(space=functools.partial(define_space, space=t.space), metric=OBJECTIVE, mode=mode,
                            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=t.startup_trials))
    # median of the other trials' running means at the same step, as tune.pruner=median does with Optuna
    scheduler = (MedianStoppingRule(time_attr="step", metric=OBJECTIVE, mode=mode, grace_period=0,
                                    min_samples_required=max(1, t.startup_trials))
                 if t.pruner == "median" else FIFOScheduler())
    output_dir = Path(cfg.output_dir).resolve()
    check_tune_folder(output_dir / f"{prefix}-tune", study_name)  # now, not after the trials
    output_dir.mkdir(parents=True, exist_ok=True)
    started = start_ray(cfg)
    try:
        trainable = tune.with_resources(make_trainable(config, base, cfg, prefix, study_name, os.getcwd()),
                                        {"cpu": t.cpus_per_trial, "gpu": t.gpus_per_trial})
        tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=n_trials, max_concurrent_trials=t.concurrent),
            run_config=tune.RunConfig(name=study_name, storage_path=str(output_dir / "ray"), verbose=0))
        grid = tuner.fit()
        rows = [_row(result, t.space, output_dir, prefix) for result in grid]
    finally:
        if started:
            ray.shutdown()
    rows.sort(key=lambda r: r["number"])
    return write_outputs(rows, study_name, direction, output_dir, prefix)


def _row(result, space: dict, output_dir: Path, prefix: str) -> dict:
    """A Ray trial's result as a tune.py trial row; stopped by the scheduler = PRUNED, as with Optuna."""
    history = result.metrics_dataframe
    records = [] if history is None else history.to_dict("records")
    evals = [r for r in records if not r.get("final")]
    last = records[-1] if records else {}
    if result.error is not None:
        state = "FAIL"
    else:
        state = "COMPLETE" if last.get("final") else "PRUNED"
    number = result.config[TRIAL_NUMBER]
    return {"number": number, "state": state, "value": last.get(OBJECTIVE) if state == "COMPLETE" else None,
            "params": {key: result.config.get(key) for key in space},
            "run_dir": str(output_dir / f"{prefix}-trial-{number}"),
            "intermediate": {str(int(r["step"])): r[OBJECTIVE] for r in evals}}
