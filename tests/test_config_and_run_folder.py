"""Text overrides taken as typed, value checks, run names that stay inside output_dir, model.max_length that leaves room
for the text, and run folders that a failure before the first checkpoint leaves neither behind nor in the way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides, toy_rows, write_csv

import strop
from strop import run as run_mod
from strop.config import Config, load_config, parse_override, validate
from strop.errors import ConfigError, RunError
from strop.tasks.classification import check_room_for_text
from strop.tune_study import overrides_dict


def config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


class SimulatedCrash(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------
# text fields take the override's text as typed


@pytest.mark.parametrize("override, key, expected", [
    ("data.label_delimiter=-", "data.label_delimiter", "-"),  # YAML: a list item
    ("name=2024-06-01", "name", "2024-06-01"),  # YAML: a date
    ("name=yes", "name", "yes"),  # YAML 1.1: True
    ("name=007", "name", "007"),  # YAML 1.1: octal 7
    ("name=0x10", "name", "0x10"),  # YAML: 16
    ("name=12:30", "name", "12:30"),  # YAML 1.1: sexagesimal 750
    ("data.label_column=00", "data.label_column", "00"),
    ("data.text_column= review ", "data.text_column", "review"),
    ("name='007'", "name", "007"),  # quotes removed
    ('name="a run"', "name", "a run"),
    ("name='null'", "name", "null"),  # quoted: the text, not None
    ('data.label_delimiter="\\t"', "data.label_delimiter", "\t"),  # YAML's double-quote escapes, as before
    ("output_dir=2024-06-01", "output_dir", "2024-06-01"),  # a str field without None
    ("name=", "name", None),  # empty, null and ~ still clear a field that allows None
    ("name=~", "name", None),
    ("name=null", "name", None),
    ("data.split_seed=7", "data.split_seed", 7),  # other types are still YAML scalars
    ("train.epochs=2", "train.epochs", 2.0),
])
def test_text_fields_take_the_override_as_typed(override, key, expected):
    cfg = load_config(None, [override])
    section, _, name = key.rpartition(".")
    value = getattr(getattr(cfg, section) if section else cfg, name)
    assert value == expected and type(value) is type(expected)


def test_text_overrides_reach_tune_trials_as_typed():
    assert overrides_dict(["name=007", "data.label_delimiter=-", "train.epochs=2"]) == \
        {"name": "007", "data.label_delimiter": "-", "train.epochs": 2}


def test_a_list_given_to_a_text_field_is_still_refused():
    assert parse_override("name=[a, b]") == ("name", ["a", "b"])
    assert "name" in config_error(["name=[a, b]"])


# ---------------------------------------------------------------------------------------------------------------
# value checks


@pytest.mark.parametrize("override, key", [
    ("train.head_lr=0", "train.head_lr"),
    ("train.head_lr=-1e-3", "train.head_lr"),
    ("train.eps=0", "train.eps"),
    ("train.eps=-1e-8", "train.eps"),
    ("train.seed=-1", "train.seed"),
    (f"train.seed={2**32}", "train.seed"),
    ("data.split_seed=-3", "data.split_seed"),
    ("data.split_seed=99999999999", "data.split_seed"),
    ("tune.seed=-1", "tune.seed"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.max_steps=-2", "train.max_steps"),
])
def test_value_checks_name_the_key_and_value(override, key):
    assert f"{key}=" in config_error([override])


@pytest.mark.parametrize("overrides", [
    ["train.head_lr=1e-3"], ["train.head_lr="], ["train.eps=1e-12"], ["train.seed=0"], [f"train.seed={2**32 - 1}"],
    ["data.split_seed=0"], ["train.max_steps=-1"], ["train.max_steps=1"], ["name=run.v2"], ["name=a..b"],
])
def test_boundary_values_are_accepted(overrides):
    cfg = load_config(None, overrides)
    for override in overrides:  # accepted and held as given (an empty head_lr: None = train.lr)
        key, raw = override.split("=", 1)
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        asked = parse_override(override)[1]
        assert node == (pytest.approx(float(asked)) if isinstance(node, float) else asked), override


def test_a_seed_built_in_code_must_be_a_whole_number():
    cfg = Config()
    cfg.train.seed = 1.5
    with pytest.raises(ConfigError, match="train.seed"):
        validate(cfg)


# ---------------------------------------------------------------------------------------------------------------
# the run folder stays inside output_dir


@pytest.mark.parametrize("name", ["../victim", "a/b", "..", ".", "a\\b", "/tmp/x"])
def test_run_name_must_be_one_folder_name(name):
    message = config_error([f"name={name}"])
    assert f"name={name!r}" in message and "output_dir" in message


def test_run_name_of_a_config_built_in_code_is_checked_before_anything_is_deleted(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    cfg = Config()
    cfg.output_dir, cfg.name = str(tmp_path / "runs"), "../victim"
    with pytest.raises(ConfigError, match="name="):
        run_mod.resolve_run(cfg, None, overwrite=True, resume=False)
    with pytest.raises(ConfigError, match="name="):
        strop.train(cfg, overwrite=True)
    assert (victim / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------------
# model.max_length must leave room for the text


def test_max_length_below_the_special_tokens_is_refused(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))  # BERT: [CLS] a [SEP], pairs [CLS] a [SEP] b [SEP]
    check_room_for_text(tok, 3, pairs=False)
    check_room_for_text(tok, 5, pairs=True)
    check_room_for_text(tok, 128, pairs=True)
    with pytest.raises(ConfigError, match=r"model.max_length=2 .*model.max_length>=3"):
        check_room_for_text(tok, 2, pairs=False)
    with pytest.raises(ConfigError, match=r"model.max_length=4 .*model.max_length>=5"):
        check_room_for_text(tok, 4, pairs=True)


@pytest.mark.parametrize("pairs, max_length", [(False, 1), (True, 4)])
def test_training_refuses_a_max_length_without_room_before_the_run_folder(tiny_model, tmp_path, pairs, max_length):
    rows = toy_rows(60, 1, pairs=pairs)
    rows[0]["sentence1" if pairs else "text"] = "refund " * 300  # untruncated, longer than the 128 positions
    data = write_csv(tmp_path / "train.csv", rows)
    out = tmp_path / "runs"
    with pytest.raises(ConfigError, match=f"model.max_length={max_length} "):
        strop.train(None, tiny_overrides(tiny_model, out, **{"data.train": data, "model.max_length": max_length}))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# a failure before the first checkpoint leaves no run folder behind, and a stale one does not block resume=auto


def _args(tiny_model, toy_splits, out: Path, **extra) -> list[str]:
    return tiny_overrides(tiny_model, out, **{"data.train": toy_splits["train"], "train.max_steps": 3,
                                              "track": "none", "eval.report": False, **extra})


def test_a_crash_before_the_first_checkpoint_removes_the_new_run_folder(tiny_model, toy_splits, tmp_path,
                                                                        monkeypatch):
    def crash(*args, **kwargs):
        raise SimulatedCrash

    monkeypatch.setattr(run_mod, "fit", crash)
    with pytest.raises(SimulatedCrash):  # the original error, not a different one
        strop.train(None, _args(tiny_model, toy_splits, tmp_path / "runs"))
    assert not (tmp_path / "runs" / "run").exists()


def test_a_run_that_logged_steps_keeps_its_folder_and_resume_auto_restarts_it(tiny_model, toy_splits, tmp_path,
                                                                               monkeypatch):
    """A NaN loss before the first checkpoint: the metrics logged so far show how the run failed, so its folder
    stays; train.resume=auto then starts again in it, and the plain command says how to proceed."""
    def crash_after_logging(model, train, val, cfg, ds_task, labels, device, precision, tracker, *args, **kwargs):
        tracker.log({"step": 1, "split": "train", "loss": float("nan")})
        raise SimulatedCrash

    out = tmp_path / "runs"
    with monkeypatch.context() as m:
        m.setattr(run_mod, "fit", crash_after_logging)
        with pytest.raises(SimulatedCrash):
            strop.train(None, _args(tiny_model, toy_splits, out))
    assert (out / "run" / "metrics.jsonl").read_text().strip()
    with pytest.raises(RunError, match="--overwrite") as e:
        strop.train(None, _args(tiny_model, toy_splits, out))
    assert "--resume" not in str(e.value)  # nothing to resume
    strop.train(None, _args(tiny_model, toy_splits, out, **{"train.resume": "auto"}))
    assert (out / "run" / "model" / "strop.json").is_file()


def test_a_crash_after_a_checkpoint_keeps_the_run_folder(tiny_model, toy_splits, tmp_path, monkeypatch):
    def crash_after_a_checkpoint(model, train, val, cfg, *args, **kwargs):
        step = Path(cfg.output_dir) / cfg.name / "checkpoints" / "step-2"
        step.mkdir(parents=True)
        (step / "COMPLETE").write_text("")
        raise SimulatedCrash

    monkeypatch.setattr(run_mod, "fit", crash_after_a_checkpoint)
    out = tmp_path / "runs"
    with pytest.raises(SimulatedCrash):
        strop.train(None, _args(tiny_model, toy_splits, out))
    assert (out / "run" / "checkpoints" / "step-2" / "COMPLETE").is_file()
    assert (out / "run" / "config.yaml").is_file()
    with pytest.raises(RunError, match="--resume"):  # a checkpoint is there: the message offers to continue it
        strop.train(None, _args(tiny_model, toy_splits, out))


def test_a_run_stopped_by_its_on_eval_keeps_its_folder(tiny_model, toy_splits, tmp_path):
    """tune's pruning raises from on_eval: the trial's partial folder (its metrics) is the record of the trial."""
    def prune(step, value):
        raise SimulatedCrash

    with pytest.raises(SimulatedCrash):
        run_mod.train(None, _args(tiny_model, toy_splits, tmp_path / "runs", **{"train.eval_every": 2,
                                                                               "train.save_every": -1}), on_eval=prune)
    records = [json.loads(line) for line in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "validation" for r in records)


def _stale_run(out: Path) -> Path:
    """What an older crash before the first checkpoint left: config, data summary, a few metrics, no checkpoint."""
    run_dir = out / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: run\n")
    (run_dir / "data.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 99, "split": "train", "loss": 9.9}) + "\n")
    return run_dir


def test_resume_auto_starts_again_in_a_folder_without_a_checkpoint(tiny_model, toy_splits, tmp_path):
    out = tmp_path / "runs"
    run_dir = _stale_run(out)
    with pytest.raises(RunError) as info:  # resume=never: refused, and --resume is not offered (it would fail)
        strop.train(None, _args(tiny_model, toy_splits, out))
    assert "--overwrite" in str(info.value) and "--resume" not in str(info.value)
    with pytest.raises(RunError, match="--overwrite"):
        strop.train(resume=run_dir)

    run = strop.train(None, _args(tiny_model, toy_splits, out, **{"train.resume": "auto"}))
    assert run.results["resumed_from_step"] is None and run.results["steps"] == 3
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 99 not in steps  # started fresh: nothing of the stale run is left


def test_resume_auto_never_replaces_a_folder_with_a_model(tiny_model, toy_splits, tmp_path):
    out = tmp_path / "runs"
    run_dir = _stale_run(out)
    (run_dir / "model").mkdir()
    (run_dir / "model" / "strop.json").write_text("{}")
    with pytest.raises(RunError, match="holds a model"):
        strop.train(None, _args(tiny_model, toy_splits, out, **{"train.resume": "auto"}))
    assert (run_dir / "model" / "strop.json").is_file() and (run_dir / "metrics.jsonl").is_file()


def _checkpointed_run(tiny_model, toy_splits, out, **extra):
    """A finished 6-step run with its checkpoint (step 4; the last step is not saved) and without model/ and
    results.json, as if killed before the end."""
    import shutil

    run = strop.train(None, _args(tiny_model, toy_splits, out, **{"train.max_steps": 6, "train.save_every": 4,
                                                                    **extra}))
    shutil.rmtree(run.run_dir / "model")
    (run.run_dir / "results.json").unlink()
    return run.run_dir


def test_resume_refuses_changed_optimisation_settings(tiny_model, toy_splits, tmp_path):
    """The checkpoint's optimizer restores the old learning rate whatever the config says, and its data position
    assumes the old batches: a changed lr or batch size would be silently ignored or mixed, so it is refused."""
    run_dir = _checkpointed_run(tiny_model, toy_splits, tmp_path / "runs")
    before = (run_dir / "config.yaml").read_text()
    for override in ("train.lr=0.5", "train.batch_size=4"):
        with pytest.raises(RunError, match="with changed settings") as e:
            strop.train(resume=run_dir, overrides=[override])
        assert override.split("=")[0] in str(e.value)
    assert (run_dir / "config.yaml").read_text() == before  # nothing rewritten
    # the run's length and logging may change
    # and how the same steps are computed (engine, micro-batches, speed switches)
    run = strop.train(resume=run_dir, overrides=["train.max_steps=7", "train.log_every=1", "train.distributed=ddp",
                                                 "train.micro_batch_size=4", "train.fast_dropout=true"])
    assert run.results["resumed_from_step"] == 4 and run.results["steps"] == 7


def test_adalora_runs_are_not_resumed_inexactly(tiny_model, toy_splits, tmp_path):
    run_dir = _checkpointed_run(tiny_model, toy_splits, tmp_path / "runs", **{"peft.method": "adalora"})
    with pytest.raises(RunError, match="AdaLoRA"):
        strop.train(resume=run_dir)


def test_keep_checkpoints_zero_is_refused():
    from strop.config import load_config

    with pytest.raises(ConfigError, match="train.keep_checkpoints=0 must be >= 1"):
        load_config(None, ["data.train=x.csv", "train.keep_checkpoints=0"])


def test_a_stopped_fewshot_run_resumes_where_it_stopped(tiny_model, toy_splits, tmp_path, monkeypatch):
    """Ctrl-C in a few-shot run writes a checkpoint and says how to resume: the contrastive phase continues from it
    (it used to start again from step 1), then the head is fitted."""
    from strop.training import fewshot as fewshot_mod

    args = {"train.mode": "fewshot", "fewshot.epochs": 2}
    straight = strop.train(None, _args(tiny_model, toy_splits, tmp_path / "a", **args, **{"train.max_steps": -1}))
    real = fewshot_mod.contrastive_config

    def saving(cfg, n):  # the phase checkpoints only on a signal; here every 4 steps, as a stand-in for Ctrl-C
        phase = real(cfg, n)
        phase.train.save_every = 4
        return phase

    with monkeypatch.context() as m:
        m.setattr(fewshot_mod, "contrastive_config", saving)
        run_dir = _checkpointed_run(tiny_model, toy_splits, tmp_path / "b", **args)
    resumed = strop.train(resume=run_dir, overrides=["train.max_steps=-1"])
    assert resumed.results["resumed_from_step"] > 0
    assert resumed.results["steps"] == straight.results["steps"]
    assert resumed.results["test"]["accuracy"] == pytest.approx(straight.results["test"]["accuracy"])


def test_early_stopping_without_a_validation_split_is_refused_before_the_run(tiny_model, toy_splits, tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(ConfigError, match="early_stopping_patience=2 needs a validation split"):
        strop.train(None, _args(tiny_model, toy_splits, out, **{"train.early_stopping_patience": 2,
                                                                "data.validation_ratio": 0}))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# an unset train.lr takes the method's default: printed at the start, written to config.yaml


def test_run_prints_and_records_the_methods_default_lr(tiny_model, toy_splits, tmp_path, capsys):
    args = [a for a in tiny_overrides(tiny_model, tmp_path, **{"data.train": toy_splits["train"],
                                                               "peft.method": "lora", "train.max_steps": 2,
                                                               "eval.report": False})
            if not a.startswith("train.lr=")]
    run = strop.train(None, args)
    printed = " ".join(capsys.readouterr().err.split())  # the console writes to stderr
    assert "train.lr=0.0005 (default for peft.method=lora; set train.lr to override)" in printed
    saved = load_config(run.run_dir / "config.yaml")
    assert saved.train.lr == 5e-4  # the resolved value, so `strop train runs/x/config.yaml` reproduces the run
