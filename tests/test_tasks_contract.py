"""The task contract: every registered task goes through every stage with a tiny model: prepare -> train a few
steps -> evaluate -> predict (in memory and from a file) -> export (with its parity check) or a clean refusal.

A new task registered in strop.tasks gets checked here for free once it says how to make a few rows of its data
(SAMPLES below); without that, the first test fails and names the task."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import (tiny_overrides, toy_documents, toy_generation_rows, toy_images, toy_multi, toy_rows,
                      write_csv, write_image_folder, write_jsonl, write_lines, write_multi_image_table)
from ner.toy_ner import toy_sentences, write_conll

import strop
from strop.compress.export import ExportOptions, export_run
from strop.errors import ExportError, StropError
from strop.config import load_config
from strop.tasks import TASKS, detect_task, get_task, prepare


def _single(folder: Path, n: int, seed: int) -> Path:
    return write_csv(folder / f"single-{seed}.csv", toy_rows(n, seed))


def _multi(folder: Path, n: int, seed: int) -> Path:
    rows = [{"text": r["text"], "labels": [r["label"]] + (["urgent"] if i % 3 == 0 else [])}
            for i, r in enumerate(toy_rows(n, seed))]
    return write_jsonl(folder / f"multi-{seed}.jsonl", rows)


def _regression(folder: Path, n: int, seed: int) -> Path:
    score = {"billing": 0.5, "shipping": 2.25, "account": 4.75}
    rows = [{"text": r["text"], "score": score[r["label"]]} for r in toy_rows(n, seed)]
    return write_csv(folder / f"regression-{seed}.csv", rows)


def _tokens(folder: Path, n: int, seed: int) -> Path:
    return write_conll(folder / f"tokens-{seed}.conll", toy_sentences(n, seed))


def _generation(folder: Path, n: int, seed: int) -> Path:
    return write_jsonl(folder / f"generation-{seed}.jsonl", toy_generation_rows(n, seed))


def _images(folder: Path, n: int, seed: int) -> Path:
    return write_image_folder(folder / f"images-{seed}", n, seed)


def _multi_images(folder: Path, n: int, seed: int) -> Path:
    return write_multi_image_table(folder / f"multi-images-{seed}", n, seed)


def _documents(folder: Path, n: int, seed: int) -> Path:
    return write_lines(folder / f"documents-{seed}.txt", toy_documents(n, seed))


# task -> (writer of n rows of its data, the inputs its predictor takes)
SAMPLES = {
    "single_label": (_single, ["refund my card please", "where is my parcel"]),
    "multi_label": (_multi, ["refund my card please", "password login help"]),
    "regression": (_regression, ["refund my card please", "where is my parcel"]),
    "token_classification": (_tokens, ["john smith visited paris", "the report from unesco"]),
    "generation": (_generation, ["name[cotto], food[french]", "name[zizzi], food[indian]"]),
    "image_classification": (_images, list(toy_images(2, 9)[0])),
    "image_multi_label": (_multi_images, list(toy_multi(2, 9)[0])),
    "masked_lm": (_documents, ["refund my card please", "where is my parcel"]),
}
# the tiny model each task trains (conftest fixtures): an encoder, or a decoder for tasks that generate
MODELS = {"generation": "tiny_decoder", "image_classification": "tiny_vision_model",
          "image_multi_label": "tiny_vision_model"}


def test_every_registered_task_has_sample_data_here():
    assert sorted(SAMPLES) == sorted(TASKS), "add a SAMPLES entry for each new task (a writer of a few rows)"


def test_every_task_implements_the_protocol():
    for name, task in TASKS.items():
        assert task.name == name and task.metrics and task.metrics[-1] == "loss" and task.primary_metric != "loss"
        assert task.description and set(task.modes) >= {"standard"}
        assert task.export is None or set(task.export.inputs) <= set(task.model_inputs)  # what collate gives
        assert task.export is None or task.export.int8 in ("dynamic", "static")
        assert task.export is not None or task.export_refusal
        for method in ("prepare", "encode", "collate", "build_model", "load_model", "loss", "evaluate", "meta",
                       "predictor"):
            assert callable(getattr(task, method)), (name, method)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict:
    """One tiny finished run per task (train 60 rows, validation 20, test 20)."""
    out = {}
    for name, (write, _) in SAMPLES.items():
        tiny_model = request.getfixturevalue(MODELS.get(name, "tiny_model"))
        folder = tmp_path_factory.mktemp(name)
        files = {split: str(write(folder, n, seed)) for split, n, seed in
                 (("train", 60, 1), ("validation", 20, 2), ("test", 20, 3))}
        args = tiny_overrides(tiny_model, folder / "runs", **{f"data.{k}": v for k, v in files.items()},
                              **{"task": name, "train.max_steps": 6, "train.eval_every": 3, "eval.report": False,
                                 "track": "none", "generate.max_new_tokens": 8})
        out[name] = (strop.train(None, args), files, args)
    return out


@pytest.mark.parametrize("name", list(SAMPLES))
def test_task_through_every_stage(name, runs, tmp_path):
    task = get_task(name)
    run, files, args = runs[name]
    # prepare: task=auto finds the same task for its data (the table family infers which of the three),
    # unless the task is chosen by name only
    if task.auto_detected:
        auto = load_config(None, [a for a in args if not a.startswith("task=")])
        assert get_task(prepare(auto).task) is task
    assert detect_task(load_config(None, args)) is task
    # train + evaluate: the run validated on the task's primary metric and scored the test split
    assert run.results["metric"] == task.primary_metric and run.results["best_step"] in (3, 6)
    for split in ("validation", "test"):
        assert set(task.metrics) <= set(run.results[split]), (split, run.results[split])
    # strop.json holds what the task needs to predict as it trained
    meta = json.loads((run.model_dir / "strop.json").read_text())
    saved = load_config(run.run_dir / "config.yaml")
    expected = task.meta(saved, prepare(saved))
    assert meta["task"] == name and {k: meta[k] for k in expected} == expected
    # predict: the loaded predictor answers the task's inputs, one output per input (or refuses with the
    # task's reason), and its file evaluation reproduces the run's final test metrics (same encoding, same
    # weights)
    predictor = strop.load(run.run_dir)
    assert predictor.task is task
    if task.predict_refusal:
        with pytest.raises(StropError, match=re.escape(task.predict_refusal)):
            predictor.predict(SAMPLES[name][1])
    else:
        assert len(predictor.predict(SAMPLES[name][1])) == 2
    again = predictor.evaluate_file(files["test"])
    assert again[task.primary_metric] == pytest.approx(run.results["test"][task.primary_metric], abs=1e-6)
    # export: ONNX with its parity gate, loaded back behind the same interface, or a refusal with a reason
    if task.generates:  # a GGUF file whose greedy answers equal the run's model's on held prompts
        parity = export_run(run.run_dir, ExportOptions(int8=False, timing=False), log=lambda m: None)
        assert parity["passed"] and parity["check"]["identical"] == parity["check"]["prompts"] == 8
        assert (run.run_dir / "export" / "model.gguf").is_file()
        return
    if task.export is None:
        with pytest.raises(ExportError, match="cannot export"):
            export_run(run.run_dir, ExportOptions(int8=False, timing=False))
        return
    parity = export_run(run.run_dir, ExportOptions(int8=False, timing=False), log=lambda m: None)
    assert parity["onnx"]["passed"] and parity["primary_metric"] == task.primary_metric
    exported = strop.load(run.run_dir / "export")
    # ONNX Runtime's kernels round differently: logits agree to the parity gate's 1e-3, a correlation to ~1e-4
    assert exported.evaluate_file(files["test"])[task.primary_metric] == pytest.approx(again[task.primary_metric],
                                                                                        abs=1e-3)
