"""`strop tune` edge cases: studies sharing a run name keep their own folders and never overwrite another study's;
a search leaves the live trials of another search of the same study alone and fails only those whose process is
gone; a trial another process finished is reported, not a crash; few-shot runs are scored on their final validation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_overrides, toy_rows, write_csv

from strop.cli import main
from strop.config import load_config
from strop.errors import ConfigError, RunError
from strop.tune import OWNER, _fail_stale, this_process, tune
from strop.tune_study import study_settings

optuna = pytest.importorskip("optuna")
psutil = pytest.importorskip("psutil")


@pytest.fixture()
def small_splits(tmp_path) -> dict:
    return {"data.train": str(write_csv(tmp_path / "train.csv", toy_rows(24, 1))),
            "data.validation": str(write_csv(tmp_path / "validation.csv", toy_rows(15, 2)))}


def _args(tiny_model, splits, out, **extra) -> list[str]:
    # 24 examples, batch 8, 1 epoch: 3 steps and one validation (step 3) per trial, a few seconds each
    return tiny_overrides(tiny_model, out, **{**splits, "train.epochs": 1, "train.eval_every": 3, "track": "none",
                                              "eval.report": False, "name": "toy", "tune.startup_trials": 1,
                                              "tune.space": "{train.lr: {log_uniform: [1e-3, 3e-2]}}", **extra})


def _study(out, name="toy"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'toy-tune.db'}")


def _batch_size(run_dir) -> int:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"]


def test_two_studies_of_one_name_keep_their_own_trial_and_tune_folders(tiny_model, small_splits, tmp_path):
    out = tmp_path / "runs"
    assert main(["tune", *_args(tiny_model, small_splits, out), "--trials", "1"]) == 0
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".db"}
    assert _batch_size(out / "toy-trial-0") == 8

    # the second study of the same name, with another batch size: before, it rewrote toy-trial-0 and toy-tune/
    assert main(["tune", *_args(tiny_model, small_splits, out, **{"tune.study": "other", "train.batch_size": 4}),
                 "--trials", "1"]) == 0
    for path, content in first.items():  # not one file of the first study changed
        assert (out / path).read_bytes() == content, path
    assert _batch_size(out / "toy-other-trial-0") == 4
    assert yaml.safe_load((out / "toy-trial-0" / "config.yaml").read_text())["tune"]["study"] == "toy"
    assert yaml.safe_load((out / "toy-other-trial-0" / "config.yaml").read_text())["tune"]["study"] == "other"
    for study, prefix in (("toy", "toy"), ("other", "toy-other")):
        tune_dir = out / f"{prefix}-tune"
        assert json.loads((tune_dir / "study.json").read_text())["study"] == study
        best = yaml.safe_load((tune_dir / "best.yaml").read_text())
        assert best["name"] == f"{prefix}-best" and best["train"]["batch_size"] == (8 if study == "toy" else 4)
        rows = json.loads((tune_dir / "trials.json").read_text())
        assert [r["run_dir"] for r in rows] == [str(out / f"{prefix}-trial-0")]
        trial = _study(out, study).trials[0]
        assert trial.user_attrs["run_dir"] == rows[0]["run_dir"]
        assert trial.value == json.loads((out / f"{prefix}-trial-0" / "results.json").read_text())["best_metric"]


def test_a_folder_of_another_study_or_a_plain_run_is_never_overwritten(tiny_model, small_splits, tmp_path, capsys):
    out = tmp_path / "runs"
    # name=toy study=x writes toy-x-trial-<k>: the folders a search named toy-x (default study) would also use
    theirs = out / "toy-x-trial-0"
    theirs.mkdir(parents=True)
    (theirs / "config.yaml").write_text("name: toy-x-trial-0\ntune:\n  study: toy-x\n")
    (theirs / "results.json").write_text("{}")
    assert main(["tune", *_args(tiny_model, small_splits, out, **{"tune.study": "x"}), "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(theirs) in err and "study 'toy-x'" in err and "tune.study=" in err
    assert sorted(p.name for p in theirs.iterdir()) == ["config.yaml", "results.json"]
    assert [t.state.name for t in _study(out, "x").trials] == ["FAIL"]  # refused before it ran; not counted

    plain = out / "toy-y-trial-0"  # a plain `strop train name=toy-y-trial-0` run: no study in its config
    plain.mkdir()
    (plain / "config.yaml").write_text("name: toy-y-trial-0\ntune:\n  study: ''\n")
    with pytest.raises(RunError, match="names no study"):
        tune(None, _args(tiny_model, small_splits, out, **{"tune.study": "y"}), trials=1)
    assert (plain / "config.yaml").read_text().startswith("name: toy-y-trial-0")

    # another study's outputs: refused before any trial runs
    (out / "toy-z-tune").mkdir()
    (out / "toy-z-tune" / "study.json").write_text(json.dumps({"study": "toy-z"}))
    with pytest.raises(RunError, match="toy-z-tune holds the work of study 'toy-z'"):
        tune(None, _args(tiny_model, small_splits, out, **{"tune.study": "z"}), trials=1)
    assert not (out / "toy-z-trial-0").exists()


def test_study_name_must_fit_in_a_folder_name():
    cfg = load_config(None, ["name=toy", "tune.study=a/b", "tune.space={train.lr: {log_uniform: [1e-5, 1e-3]}}"])
    with pytest.raises(ConfigError, match="tune.study='a/b'"):
        study_settings(cfg)


def _running(study, owner=None):
    trial = study.ask()
    if owner is not None:
        trial.set_user_attr(OWNER, owner)
    return trial.number


def test_only_trials_whose_process_is_gone_are_failed(tmp_path):
    study = optuna.create_study(study_name="toy", storage=f"sqlite:///{tmp_path / 'toy-tune.db'}")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = {**this_process(), "pid": child.pid, "started": psutil.Process(child.pid).create_time()}
    child.kill()
    child.wait()
    me = this_process()
    numbers = {"live": _running(study, me),  # another search of this study, still running
               "gone": _running(study, dead),  # a search killed mid-trial
               "reused": _running(study, {**me, "started": me["started"] - 3600}),  # its pid now names another process
               "elsewhere": _running(study, {**me, "host": me["host"] + "-other"}),  # cannot be seen from here
               "unowned": _running(study)}  # a search from before strop recorded owners
    _fail_stale(study)
    states = {what: study.trials[n].state.name for what, n in numbers.items()}
    assert states == {"live": "RUNNING", "gone": "FAIL", "reused": "FAIL", "elsewhere": "RUNNING", "unowned": "FAIL"}


@pytest.mark.parametrize("when", ["during", "after"])
def test_a_trial_another_process_failed_is_reported_not_a_crash(tiny_model, small_splits, tmp_path, monkeypatch,
                                                                capsys, when):
    """What an older search of the same study did to a live trial (and what a shared storage's other user may do):
    mark it failed while it trains. The search reports it; a run that finished is recorded again as a new trial."""
    import strop.run

    out = tmp_path / "runs"
    real_train = strop.run.train

    def fail_it_elsewhere():
        other = _study(out)  # its own connection, as another process has
        for t in other.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            other._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)

    def train(*args, **kwargs):
        if when == "during":
            fail_it_elsewhere()  # before the first validation: its report cannot be stored
        result = real_train(*args, **kwargs)
        if when == "after":
            fail_it_elsewhere()
        return result

    monkeypatch.setattr(strop.run, "train", train)
    result = tune(None, _args(tiny_model, small_splits, out), trials=1)
    printed = " ".join(capsys.readouterr().err.split())
    assert "trial 0 was marked FAIL by another process" in printed
    run_dir = out / "toy-trial-0"
    trials = _study(out).trials
    if when == "during":  # stopped at its first report: the partial run folder stays, as a pruned trial's does
        assert [t.state.name for t in trials] == ["FAIL"] and "it does not count" in printed
        assert (run_dir / "metrics.jsonl").is_file() and not (run_dir / "results.json").exists()
        assert result.best_run is None
    else:  # the finished run's result is not lost: it counts as trial 1, whose run folder is toy-trial-0
        assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] and "recorded again as trial 1" in printed
        value = json.loads((run_dir / "results.json").read_text())["best_metric"]
        assert trials[1].value == value and trials[1].params == trials[0].params
        assert trials[1].user_attrs["run_dir"] == str(run_dir) and trials[1].intermediate_values == {3: value}
        assert result.best_run == run_dir and result.best_value == value


def test_a_fewshot_study_completes_and_picks_the_best_trial(tiny_model, small_splits, tmp_path):
    out = tmp_path / "runs"
    args = _args(tiny_model, small_splits, out, **{"train.mode": "fewshot", "fewshot.epochs": 1,
                                                   "fewshot.batch_size": 8,
                                                   "tune.space": "{fewshot.lr: {log_uniform: [1e-4, 1e-2]}}"})
    result = tune(None, args, trials=2)
    trials = _study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # median pruning on: nothing to prune on
    finals = []
    for t in trials:
        results = json.loads((out / f"toy-trial-{t.number}" / "results.json").read_text())
        assert results["train_mode"] == "fewshot" and results["best_metric"] is None
        assert t.value == results["validation"]["accuracy"] and t.intermediate_values == {}
        finals.append(t.value)
    best = max(range(2), key=lambda k: finals[k])  # the first of equal values wins, as in Optuna's best_trial
    assert result.best_run == out / f"toy-trial-{best}" and result.best_value == finals[best]
    best_yaml = yaml.safe_load((out / "toy-tune" / "best.yaml").read_text())
    assert best_yaml["train"]["mode"] == "fewshot" and best_yaml["fewshot"]["lr"] == trials[best].params["fewshot.lr"]
