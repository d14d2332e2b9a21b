"""`strop tune`: trials are real runs whose numbers the study holds; pruning stops a bad trial at its first report;
an interrupted search continues; best.yaml reproduces the best trial."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_overrides

from strop.cli import main
from strop.config import load_config
from strop.errors import ConfigError
from strop.tune import tune

optuna = pytest.importorskip("optuna")


def _base(tiny_model, splits, out, **extra):
    # 90 examples, batch 16: 6 steps per epoch, 2 epochs; validation every 3 steps gives 4 reports per trial
    return tiny_overrides(tiny_model, out, **{"data.train": splits["train"], "data.validation": splits["validation"],
                                              "train.epochs": 2, "train.batch_size": 16, "train.eval_every": 3,
                                              "track": "none", "name": "toy", "tune.startup_trials": 1, **extra})


def _study(out):
    return optuna.load_study(study_name="toy", storage=f"sqlite:///{out / 'toy-tune.db'}")


def _validation(run_dir, key):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if r["split"] == "validation"}


@pytest.mark.slow  # 4 tiny runs: ~30 s on a busy 2-core machine
def test_search_runs_trials_writes_best_yaml_that_reproduces_the_best(tiny_model, toy_splits, tmp_path):
    out = tmp_path / "runs"
    space = "{train.lr: {log_uniform: [1e-3, 3e-2]}, peft.r: {choice: [2, 4]}}"
    args = _base(tiny_model, toy_splits, out, **{"tune.space": space, "peft.method": "lora",
                                                 "tune.pruner": "none"})
    assert main(["tune", *args, "--trials", "3"]) == 0

    study = _study(out)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    for t in study.trials:
        run_dir = out / f"toy-trial-{t.number}"
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["train"]["lr"] == t.params["train.lr"] and cfg["peft"]["r"] == t.params["peft.r"]
        assert 1e-3 <= t.params["train.lr"] <= 3e-2 and t.params["peft.r"] in (2, 4)
        assert t.value == json.loads((run_dir / "results.json").read_text())["best_metric"]
        assert t.intermediate_values == _validation(run_dir, "accuracy")  # every validation was reported
        assert sorted(t.intermediate_values) == [3, 6, 9, 12]
    assert len({t.params["train.lr"] for t in study.trials}) == 3

    tune_dir = out / "toy-tune"
    best = yaml.safe_load((tune_dir / "best.yaml").read_text())
    # the best trial: the highest value, a tie going to the lower validation loss (tune_study.ranking), as the loop
    rank = {t.number: (-t.value, json.loads((out / f"toy-trial-{t.number}" / "results.json").read_text())["best_loss"],
                       t.number) for t in study.trials}
    chosen = study.trials[min(rank, key=rank.get)]
    assert best["name"] == "toy-best" and best["train"]["lr"] == chosen.params["train.lr"]
    assert (tune_dir / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "trials.png" in (tune_dir / "report.html").read_text()
    rows = json.loads((tune_dir / "trials.json").read_text())
    assert [r["value"] for r in rows] == [t.value for t in study.trials]

    # ready to run: training best.yaml as it is gives the best trial's value again (fp32, same seeds)
    assert main(["train", str(tune_dir / "best.yaml")]) == 0
    again = json.loads((out / "toy-best" / "results.json").read_text())
    assert again["best_metric"] == chosen.value


@pytest.mark.slow
def test_median_pruning_stops_a_worse_trial_and_the_search_resumes(tiny_model, toy_splits, tmp_path):
    out = tmp_path / "runs"
    # minimise validation loss (continuous, so a trial that does not learn is strictly worse than one that does);
    # 4 epochs (24 steps, 8 reports): the random tiny model's loss only drops below the untrained one's around step
    # 12, so with 12 steps in all whether the bad trial is stopped before its end hung on the dropout noise
    longer = {"train.epochs": 4}
    good = _base(tiny_model, toy_splits, out, **{"tune.space": "{train.lr: {log_uniform: [2e-2, 3e-2]}}",
                                                 "tune.metric": "loss", **longer})
    first = tune(None, good, trials=1)
    assert first.best_value is not None and _study(out).direction.name == "MINIMIZE"

    # same storage and study name: the search continues with trial 1; an lr of ~1e-9 cannot learn
    bad = _base(tiny_model, toy_splits, out, **{"tune.space": "{train.lr: {log_uniform: [1e-9, 2e-9]}}",
                                                "tune.metric": "loss", **longer})
    result = tune(None, bad, trials=2)
    study = _study(out)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    pruned = study.trials[1]
    last = max(pruned.intermediate_values)
    assert last < 24  # stopped before the end (24 steps), at the first report worse than trial 0's at that step
    assert pruned.intermediate_values[last] > study.trials[0].intermediate_values[last]
    run_dir = out / "toy-trial-1"
    assert _validation(run_dir, "loss") == pytest.approx(pruned.intermediate_values)
    assert not (run_dir / "results.json").exists()
    assert result.best_params == study.trials[0].params
    assert [r["state"] for r in result.trials] == ["COMPLETE", "PRUNED"]


def test_trial_left_running_by_a_killed_search_is_failed_and_not_counted(tiny_model, toy_splits, tmp_path):
    out = tmp_path / "runs"
    args = _base(tiny_model, toy_splits, out, **{"tune.space": "{train.lr: {log_uniform: [1e-3, 3e-2]}}"})
    out.mkdir(parents=True)
    study = optuna.create_study(study_name="toy", storage=f"sqlite:///{out / 'toy-tune.db'}", direction="maximize")
    study.ask()  # what a search killed mid-trial leaves behind: a RUNNING trial
    result = tune(None, args, trials=1)
    states = [t.state.name for t in _study(out).trials]
    assert states == ["FAIL", "COMPLETE"]  # the stale trial neither counts nor blocks
    assert result.best_run == out / "toy-trial-1"


@pytest.mark.parametrize("space, words", [
    ("{train.lrr: {log_uniform: [1e-5, 1e-3]}}", ["'train.lrr'", "train.lr"]),
    ("{train.lr: {log_uniform: [0, 1e-3]}}", ["tune.space.train.lr", "log_uniform"]),
    ("{train.lr: {loguniform: [1e-5, 1e-3]}}", ["tune.space.train.lr", "choice"]),
    ("{train.epochs: {int: [3, 1]}}", ["tune.space.train.epochs", "low < high", "got [3, 1]"]),
    ("{peft.r: {choice: []}}", ["tune.space.peft.r", "choice"]),
])
def test_bad_search_space_names_the_key(space, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"tune.space={space}"])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_empty_space_says_how_to_declare_one(tmp_path):
    with pytest.raises(ConfigError, match="log_uniform"):
        tune(None, ["data.train=x.csv", f"output_dir={tmp_path}"], trials=1)


def test_a_tie_of_trial_values_goes_to_the_lower_validation_loss(tmp_path):
    """The training loop's rule, applied to trials: equal accuracy (1.0 on a small validation set) picks the trial
    whose best step had the lower validation loss; unknown losses rank last, then the earlier trial wins."""
    from strop.tune_study import ranking, write_outputs

    rows = []
    for number, value, loss in ((0, 1.0, 0.91), (1, 1.0, 0.07), (2, 0.9, 0.01), (3, 1.0, None)):
        run_dir = tmp_path / f"toy-trial-{number}"
        run_dir.mkdir()
        (run_dir / "results.json").write_text(json.dumps({"best_loss": loss}))
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": run_dir.name, "train": {"lr": number}}))
        rows.append({"number": number, "state": "COMPLETE", "value": value, "params": {}, "run_dir": str(run_dir),
                     "intermediate": {}})
    assert [r["number"] for r in sorted(rows, key=lambda r: ranking(r, "maximize"))] == [1, 0, 3, 2]
    assert [r["number"] for r in sorted(rows, key=lambda r: ranking(r, "minimize"))] == [2, 1, 0, 3]
    result = write_outputs(rows, "toy", "maximize", tmp_path, "toy")
    assert result.best_run == tmp_path / "toy-trial-1" and result.best_value == 1.0
    assert yaml.safe_load((tmp_path / "toy-tune" / "best.yaml").read_text())["train"]["lr"] == 1
