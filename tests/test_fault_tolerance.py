"""Atomic checkpoints, exact resume, Ctrl-C/SIGTERM, the NaN guard, out-of-memory handling and safe loading."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides, toy_rows, write_csv
from safetensors.torch import load_file

import strop
from strop.cli import main
from strop.errors import ModelError, RunError, StropError
from strop.tasks import get_task
from strop.training import checkpoint as ckpt_mod
from strop.training import loop as loop_mod


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


class SimulatedCrash(Exception):
    pass


def crash_after_checkpoint(monkeypatch, kill_step: int, args: list[str]) -> Path:
    """Train with `args` and crash right after step `kill_step`'s checkpoint is written, as a kill would; returns
    the run folder (the checkpoint saver is put back for the resume)."""
    real_save = ckpt_mod.save_checkpoint

    def crash_after(run_dir, model, optimizer, scheduler, state, **kw):
        path = real_save(run_dir, model, optimizer, scheduler, state, **kw)
        if state.step == kill_step:
            raise SimulatedCrash
        return path

    with monkeypatch.context() as m:
        m.setattr(loop_mod, "save_checkpoint", crash_after)
        with pytest.raises(SimulatedCrash):
            strop.train(None, args)
    options = dict(a.split("=", 1) for a in args)
    return Path(options["output_dir"]) / options.get("name", "run")


@pytest.mark.parametrize("kill_step,micro,method", [(5, None, "none"), (12, None, "none"), (17, None, "none"),
                                                   (10, 4, "none"), (7, None, "lora"), (9, 4, "dense")],
                         ids=["mid-epoch", "epoch-boundary", "epoch-1", "accumulation", "lora", "dense-embeddings"])
def test_resume_gives_the_same_run(kill_step, micro, method, tiny_model, toy_splits, tmp_path, monkeypatch):
    """20 steps straight == kill after step k's checkpoint + resume: same per-step losses, same final weights."""
    extra = {"data.train": toy_splits["train"], "data.validation": toy_splits["validation"], "train.max_steps": 20,
             "train.log_every": 1, "train.save_every": 1, "train.early_stopping_patience": 5, "peft.method": method}
    if method == "dense":  # the other cases train the word embeddings' lazy AdamW rows (the default)
        extra.update({"peft.method": "none", "model.sparse_embeddings": False})
    if micro:
        extra["train.micro_batch_size"] = micro
    straight = strop.train(None, tiny_overrides(tiny_model, tmp_path / "a", **extra))

    run_dir = crash_after_checkpoint(monkeypatch, kill_step, tiny_overrides(tiny_model, tmp_path / "b", **extra))
    assert not (run_dir / "model").exists()
    resumed = strop.train(resume=run_dir)

    assert resumed.results["resumed_from_step"] == kill_step
    assert _losses(run_dir) == _losses(straight.run_dir)  # every step, bit for bit
    assert [s for s, _ in _losses(run_dir)] == list(range(1, 21))
    a = load_file(str(straight.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for key in ("best_metric", "best_step", "steps", "validation"):
        assert resumed.results[key] == straight.results[key], key


CHILD = """
import sys, strop
strop.train(None, sys.argv[1:])
"""


def _child(args, **kw):
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_sigkill_at_random_moments_never_loses_the_checkpoint(tiny_model, tmp_path):
    """20 trials: SIGKILL while checkpoints are written every step; the newest complete one always loads and
    resume always succeeds."""
    src = write_csv(tmp_path / "train.csv", toy_rows(120, seed=3))
    rng = random.Random(0)
    partial_seen = 0
    for trial in range(20):
        out = tmp_path / f"t{trial}"
        proc = _child(tiny_overrides(tiny_model, out, **{"data.train": src, "train.max_steps": 100000,
                                                          "train.save_every": 1, "train.keep_checkpoints": 2,
                                                          "train.log_every": 50}))
        ckdir = out / "run" / "checkpoints"
        deadline = time.time() + 60
        while not (ckdir.is_dir() and any(p.name.startswith("step-") for p in ckdir.iterdir())):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial_seen += any(p.name.startswith(".tmp-") or not (p / "COMPLETE").exists() for p in ckdir.iterdir())
        latest = ckpt_mod.latest_checkpoint(out / "run", log=lambda m: None)
        assert latest is not None, f"trial {trial}: no complete checkpoint"
        assert not any(p.name.startswith(".tmp-") for p in ckdir.iterdir())  # partial ones cleaned up
        state = json.loads((latest / "state.json").read_text())
        load_file(str(latest / "model.safetensors"))
        torch.load(latest / "optimizer.pt", weights_only=True)
        resumed = strop.train(resume=out / "run", overrides=[f"train.max_steps={state['step'] + 2}",
                                                              "train.save_every=-1"])
        assert resumed.results["steps"] == state["step"] + 2
    print(f"\n20 SIGKILL trials survived; {partial_seen} of them left a half-written checkpoint behind")


def test_sigterm_checkpoints_and_says_how_to_resume(tiny_model, tmp_path):
    src = write_csv(tmp_path / "train.csv", toy_rows(120, seed=3))
    out = tmp_path / "runs"
    args = tiny_overrides(tiny_model, out, **{"data.train": src, "train.max_steps": 100000, "train.save_every": -1,
                                              "train.log_every": 5})
    proc = subprocess.Popen([sys.executable, "-m", "strop.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "SIGTERM received" in err and f"strop train --resume {out / 'run'}" in err and "Traceback" not in err
    latest = ckpt_mod.latest_checkpoint(out / "run")
    step = json.loads((latest / "state.json").read_text())["step"]
    assert step >= 10
    assert main(["train", "--resume", str(out / "run"), f"train.max_steps={step + 3}"]) == 0
    assert json.loads((out / "run" / "results.json").read_text())["steps"] == step + 3


def _nan_at(monkeypatch, bad_calls: set[int]):
    """The toy runs' task (single-label) returns a NaN loss at the training calls `bad_calls` (1-based)."""
    task = get_task("single_label")
    real = task.loss
    calls = {"n": 0}

    def loss(logits, batch):
        calls["n"] += 1
        value = real(logits, batch)
        return value * float("nan") if calls["n"] in bad_calls else value

    monkeypatch.setattr(task, "loss", loss)


def test_nan_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(tiny_model, toy_splits, tmp_path,
                                                                      monkeypatch, capsys):
    _nan_at(monkeypatch, {7})
    args = tiny_overrides(tiny_model, tmp_path / "runs", **{"data.train": toy_splits["train"], "train.save_every": 5})
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss (nan)" in err and "at step 7" in err and "train.nonfinite=skip" in err
    ckdir = tmp_path / "runs" / "run" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-5"]
    assert json.loads((ckdir / "step-5" / "state.json").read_text())["step"] == 5
    for t in load_file(str(ckdir / "step-5" / "model.safetensors")).values():
        assert torch.isfinite(t).all()


def test_nan_skip_policy_skips_and_caps(tiny_model, toy_splits, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {3, 8})
    run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{
        "data.train": toy_splits["train"], "train.nonfinite": "skip", "train.max_steps": 12}))
    assert run.results["skipped_steps"] == 2 and run.results["steps"] == 12
    for t in load_file(str(run.model_dir / "model.safetensors")).values():
        assert torch.isfinite(t).all()

    _nan_at(monkeypatch, set(range(1, 1000)))
    with pytest.raises(StropError, match="non-finite"):
        strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs2", **{
            "data.train": toy_splits["train"], "train.nonfinite": "skip", "train.max_skipped_steps": 3}))


def _oom_above(monkeypatch, limit: int):
    task = get_task("single_label")
    real = task.collate

    def collate(enc, idx, rng=None):
        if rng is not None and len(idx) > limit:  # training batches (the loop passes an rng; evaluation does not)
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real(enc, idx, rng)

    monkeypatch.setattr(task, "collate", collate)


def test_out_of_memory_says_what_to_lower(tiny_model, toy_splits, tmp_path, monkeypatch):
    _oom_above(monkeypatch, 4)
    with pytest.raises(StropError, match="train.micro_batch_size"):
        strop.train(None, tiny_overrides(tiny_model, tmp_path / "a", **{"data.train": toy_splits["train"]}))


def test_auto_batch_size_halves_and_keeps_the_effective_batch(tiny_model, toy_splits, tmp_path, monkeypatch):
    extra = {"data.train": toy_splits["train"], "train.log_every": 1, "train.max_steps": 6}
    reference = strop.train(None, tiny_overrides(tiny_model, tmp_path / "a", **extra,
                                                 **{"train.micro_batch_size": 2}))
    _oom_above(monkeypatch, 2)
    auto = strop.train(None, tiny_overrides(tiny_model, tmp_path / "b", **extra, **{"train.auto_batch_size": True}))
    assert [s for s, _ in _losses(auto.run_dir)] == list(range(1, 7))
    for (_, a), (_, b) in zip(_losses(auto.run_dir), _losses(reference.run_dir)):
        assert a == pytest.approx(b, rel=1e-5)


class _Evil:
    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_pickle_payloads_are_refused_on_every_load_path(tiny_model, toy_splits, tmp_path):
    sentinel = tmp_path / "pwned"
    run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{"data.train": toy_splits["train"],
                                                                               "train.save_every": 5}))
    latest = ckpt_mod.latest_checkpoint(run.run_dir)
    for name in ("optimizer.pt", "rng.pt"):
        original = (latest / name).read_bytes()
        torch.save({"state": _Evil(sentinel)}, latest / name)
        with pytest.raises(RunError, match="refusing to load"):
            strop.train(resume=run.run_dir)
        assert not sentinel.exists()
        (latest / name).write_bytes(original)

    # a model folder holding only pickle weights: refused unless allowed; when allowed, transformers' own
    # weights_only loading still refuses code
    evil = tmp_path / "evil-model"
    evil.mkdir()
    for f in tiny_model.iterdir():
        if f.suffix != ".safetensors":
            (evil / f.name).write_bytes(f.read_bytes())
    torch.save({"x": _Evil(sentinel)}, evil / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle"):
        strop.train(None, tiny_overrides(evil, tmp_path / "r2", **{"data.train": toy_splits["train"]}))
    with pytest.raises(StropError):
        strop.train(None, tiny_overrides(evil, tmp_path / "r3", **{"data.train": toy_splits["train"],
                                                                   "model.allow_pickle": True}))
    assert not sentinel.exists()


def test_truncated_weights_are_a_clear_error(tiny_model, toy_splits, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in tiny_model.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(ModelError, match="corrupt or truncated|cannot load"):
        strop.train(None, tiny_overrides(broken, tmp_path / "runs", **{"data.train": toy_splits["train"]}))
    assert not (tmp_path / "runs").exists()

    run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "ok", **{"data.train": toy_splits["train"],
                                                                             "train.save_every": 5}))
    latest = ckpt_mod.latest_checkpoint(run.run_dir)
    data = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(RunError, match="corrupt or truncated"):
        strop.train(resume=run.run_dir)


def test_partial_checkpoints_are_ignored_and_cleaned(tiny_model, toy_splits, tmp_path, capsys):
    run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{"data.train": toy_splits["train"],
                                                                               "train.save_every": 5}))
    ckdir = run.run_dir / "checkpoints"
    # 72 examples after carving: 9 steps x 4 epochs = 36 steps, a checkpoint every 5, keep the newest 2 (no
    # evaluation step - 9, 18, 27, 36 - is a multiple of 5, so no best checkpoint is kept besides them)
    assert [p.name for p in ckpt_mod.complete_checkpoints(run.run_dir)] == ["step-30", "step-35"]
    newest = ckpt_mod.complete_checkpoints(run.run_dir)[-1]
    fake = ckdir / "step-999"  # looks newer but has no COMPLETE marker
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"half")
    (ckdir / ".tmp-step-1000-1").mkdir()
    assert ckpt_mod.latest_checkpoint(run.run_dir) == newest
    assert not fake.exists() and not (ckdir / ".tmp-step-1000-1").exists()
    assert "removed 2 incomplete checkpoint" in capsys.readouterr().out


def test_keep_last_and_keep_best(tiny_model, toy_splits, tmp_path):
    run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{
        "data.train": toy_splits["train"], "data.validation": toy_splits["validation"], "train.save_every": 2,
        "train.keep_checkpoints": 2, "train.epochs": 4}))
    steps = [int(p.name.split("-")[1]) for p in ckpt_mod.complete_checkpoints(run.run_dir)]
    # 81 examples after carving the test split: 11 steps x 4 epochs = 44; saved every 2 steps except the last
    best, last = run.results["best_step"], run.results["steps"]
    assert last == 44 and best in (11, 22, 33, 44)
    expected = {40, 42} | ({best} if best % 2 == 0 and best < last else set())
    assert set(steps) == expected


def test_resume_auto_continues_a_crashed_run(tiny_model, toy_splits, tmp_path, monkeypatch):
    """train.resume=auto: rerunning the same command after a crash continues from the newest checkpoint."""
    args = tiny_overrides(tiny_model, tmp_path / "runs", **{"data.train": toy_splits["train"], "train.save_every": 4,
                                                             "train.resume": "auto", "train.max_steps": 12})
    real_save = ckpt_mod.save_checkpoint

    def crash_at_8(run_dir, model, optimizer, scheduler, state):
        path = real_save(run_dir, model, optimizer, scheduler, state)
        if state.step == 8:
            raise SimulatedCrash
        return path

    monkeypatch.setattr(loop_mod, "save_checkpoint", crash_at_8)
    with pytest.raises(SimulatedCrash):
        strop.train(None, args)
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    run = strop.train(None, args)
    assert run.results["resumed_from_step"] == 8 and run.results["steps"] == 12
    assert [s for s, _ in _losses(run.run_dir)] == list(range(4, 13, 4))
