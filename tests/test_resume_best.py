"""Resuming a run whose best evaluation fell on a step that was never checkpointed (eval_every != save_every),
and the message of the non-finite guard's skip cap."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file
from test_fault_tolerance import _nan_at, crash_after_checkpoint

import strop
from strop.errors import StropError
from strop.training import checkpoint as ckpt_mod
from strop.training import loop as loop_mod


class SimulatedCrash(Exception):
    pass


def _best_at_step_2(monkeypatch):
    """Script the validation metric so the best evaluation is step 2, which save_every=4 never checkpoints."""
    real = loop_mod.track_best

    def track(state, value, loss, higher):
        good = state.step == 2
        return real(state, 1.0 if good == higher else 0.0, loss, higher)

    monkeypatch.setattr(loop_mod, "track_best", track)


@pytest.mark.parametrize("kill_step,keep", [(4, 5), (8, 1)], ids=["first-save", "best-pruned-window"])
def test_resume_restores_a_best_step_that_has_no_checkpoint(kill_step, keep, tiny_model, toy_splits, tmp_path,
                                                            monkeypatch):
    """Straight run == crash after step k's checkpoint + resume, when the best step (2) was never checkpointed."""
    _best_at_step_2(monkeypatch)
    extra = {"data.train": toy_splits["train"], "data.validation": toy_splits["validation"], "train.max_steps": 12,
             "train.eval_every": 2, "train.save_every": 4, "train.keep_checkpoints": keep}
    straight = strop.train(None, tiny_overrides(tiny_model, tmp_path / "a", **extra))
    assert straight.results["best_step"] == 2

    run_dir = crash_after_checkpoint(monkeypatch, kill_step, tiny_overrides(tiny_model, tmp_path / "b", **extra))
    saved = [p.name for p in ckpt_mod.complete_checkpoints(run_dir)]
    assert "step-2" not in saved and f"step-{kill_step}" in saved
    assert (run_dir / "checkpoints" / f"step-{kill_step}" / ckpt_mod.BEST).is_file()

    resumed = strop.train(resume=run_dir)
    assert resumed.results["resumed_from_step"] == kill_step
    a = load_file(str(straight.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for key in ("best_metric", "best_step", "steps"):
        assert resumed.results[key] == straight.results[key], key


def test_best_weights_are_written_only_when_the_best_step_has_no_checkpoint(tiny_model, toy_splits, tmp_path,
                                                                            monkeypatch):
    _best_at_step_2(monkeypatch)
    run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{
        "data.train": toy_splits["train"], "data.validation": toy_splits["validation"], "train.max_steps": 8,
        "train.eval_every": 2, "train.save_every": 2, "train.keep_checkpoints": 1}))
    saved = ckpt_mod.complete_checkpoints(run.run_dir)
    assert [p.name for p in saved] == ["step-2", "step-6"]  # the best kept besides the newest; none at the last step
    assert not any((p / ckpt_mod.BEST).exists() for p in saved)


def test_skip_cap_names_max_skipped_steps(tiny_model, toy_splits, tmp_path, monkeypatch):
    _nan_at(monkeypatch, set(range(1, 1000)))
    with pytest.raises(StropError) as err:
        strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{
            "data.train": toy_splits["train"], "train.nonfinite": "skip", "train.max_skipped_steps": 3}))
    msg = str(err.value)
    assert "non-finite" in msg and "4 skipped steps, more than train.max_skipped_steps=3" in msg
    assert "checkpoints written before it are kept" in msg and "raise train.max_skipped_steps" in msg
    assert "set train.nonfinite=skip" not in msg


def test_a_tie_of_the_metric_goes_to_the_lower_validation_loss():
    """Accuracy saturates on a small validation set: 1.0 at every evaluation must not keep the first (least-trained)
    weights. The losses are those of the demo run the issue describes (0.91 at step 20, 0.07 at step 80)."""
    state = ckpt_mod.TrainState()
    for step, acc, loss, best in ((20, 1.0, 0.91, 20), (40, 1.0, 0.30, 40), (60, 1.0, 0.45, 40), (80, 1.0, 0.07, 80)):
        state.step = step
        loop_mod.track_best(state, acc, loss, higher=True)
        assert state.best_step == best, step
    assert (state.best_metric, state.best_loss, state.bad_evals) == (1.0, 0.07, 0)
    state.step = 100  # a worse metric loses whatever its loss
    assert loop_mod.track_best(state, 0.9, 0.01, higher=True) is False and state.bad_evals == 1
    state.step = 120  # a better metric wins whatever its loss
    assert loop_mod.track_best(state, 1.5, 9.0, higher=True) is True and state.best_step == 120
    low = ckpt_mod.TrainState(step=1)  # lower-is-better metrics (rmse): the same tie rule
    loop_mod.track_best(low, 0.2, 0.5, higher=False)
    low.step = 2
    assert loop_mod.track_best(low, 0.2, 0.4, higher=False) is True and low.best_step == 2


def test_saturated_validation_accuracy_restores_the_last_lowest_loss_step(tiny_model, toy_splits, tmp_path):
    """End to end: the toy set is learned to validation accuracy 1.0 early; the restored step is the one with the
    lowest validation loss among those at 1.0, not the first one at 1.0."""
    extra = {"data.train": toy_splits["train"], "data.validation": toy_splits["validation"], "train.epochs": 8,
             "train.eval_every": 4}
    run = strop.train(None, tiny_overrides(tiny_model, tmp_path, **extra))
    evals = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("split") == "validation"]
    top = max(e["accuracy"] for e in evals)
    tied = [e for e in evals if e["accuracy"] == top]
    assert len(tied) >= 2, "the toy set should saturate validation accuracy at more than one evaluation"
    expected = min(tied, key=lambda e: (e["loss"], e["step"]))
    assert run.results["best_step"] == expected["step"]
    assert expected["step"] != tied[0]["step"]  # the loss kept falling after accuracy saturated: the rule mattered
    assert run.results["best_loss"] == pytest.approx(expected["loss"])
