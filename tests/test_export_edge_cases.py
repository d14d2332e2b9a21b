"""strop export at its edges: options checked before anything is written, runs with bottleneck adapters, short
max_length, parity.json's adapter entry, and the swap of RUN/export/ that an interruption cannot leave half-done."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides, toy_rows, write_csv

import strop.compress.export as export_module
from strop.cli import main
from strop.compress.export import ExportOptions, export_run, logits_of
from strop.compress.folders import replace_folder, tidy_leftovers
from strop.compress.onnx import OnnxModel, example_inputs, export_onnx, input_names_for
from strop.config import Config, ModelConfig
from strop.data.batching import encode
from strop.data.examples import Examples
from strop.errors import ExportError
from strop.models.backbone import load_tokenizer
from strop.tasks import build_model, get_task

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

QUIET = {"int8": False, "timing": False}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Three tiny runs of one epoch (8 steps): 'short' (plain fine-tuning, model.max_length=8 -- below the 10 tokens
    the ONNX exporter once traced with), 'adapter' (bottleneck adapters) and 'lora'."""
    tmp = tmp_path_factory.mktemp("edge")
    splits = {f"data.{s}": write_csv(tmp / f"{s}.csv", toy_rows(n, seed)) for s, n, seed in
              (("train", 60, 1), ("validation", 20, 2), ("test", 20, 3))}
    out = {}
    for name, extra in (("short", {"model.max_length": 8}), ("adapter", {"peft.method": "adapter"}),
                        ("lora", {"peft.method": "lora"})):
        args = tiny_overrides(tiny_model, tmp / "runs", **splits, **extra, **{"train.epochs": 1, "name": name})
        assert main(["train", *args]) == 0
        out[name] = tmp / "runs" / name
    out["test_csv"] = splits["data.test"]
    return out


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("export."))


# ---------------------------------------------------------------------------------------------------------------
# 1. every option is checked before the export starts, and a failure leaves no export.tmp/


@pytest.mark.parametrize("options,message", [
    ({"distill": 5}, r"--distill 5: the student needs fewer layers than the teacher's 2"),
    ({"distill": 1, "temperature": 0.0}, r"--temperature 0.0: .* must be a number > 0"),
    ({"distill": 1, "alpha": 2.0}, r"--alpha 2.0: .* must be in \[0, 1\]"),
    ({"distill": 1, "lr": -1.0}, r"--lr -1.0: .* must be a number > 0"),
    ({"distill": 1, "distill_epochs": -1.0}, r"--distill-epochs -1.0: must be a number of epochs >= 0"),
    ({"prune": {"heads": 0.75}}, r"--prune heads=0.75 would remove all 2 attention heads .* at most heads=0.5"),
    ({"prune": {"ffn": 0.999}}, r"--prune ffn=0.999 would remove all 64 FFN neurons"),
    ({"prune": {"layers": 0.5}}, r"unknown kind 'layers'"),
    ({"prune": {"ffn": 0.5}, "recover_epochs": -1.0}, r"--recover-epochs -1.0: must be a number of epochs >= 0"),
    ({"recover_epochs": 1.0}, r"--recover-epochs 1.0 fine-tunes the pruned model: add --prune"),
    ({"lr": 1e-3}, r"--lr 0.001 .* neither is asked for"),
    ({"int8": False, "static_int8": True}, r"--static-int8 .* --no-int8"),
])
def test_bad_options_fail_before_the_onnx_export_and_leave_nothing(runs, monkeypatch, options, message):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the ONNX export started before the options were checked")

    monkeypatch.setattr(export_module, "export_graph", must_not_run)
    run = runs["short"]
    with pytest.raises(ExportError, match=message):
        export_run(run, ExportOptions(**{**QUIET, **options}), log=lambda m: None)
    assert _leftovers(run) == []


def test_negative_lr_on_the_cli_is_an_error_message_not_a_traceback(runs, capsys):
    run = runs["short"]
    assert main(["export", str(run), "--no-int8", "--no-timing", "--distill", "1", "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--lr -1.0" in err and "Traceback" not in err and "Invalid learning rate" not in err
    assert _leftovers(run) == []


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failure_mid_export_removes_export_tmp_and_keeps_the_previous_export(runs, monkeypatch, interrupt):
    run = runs["short"]
    if not (run / "export" / "model.onnx").is_file():
        export_run(run, ExportOptions(**QUIET), log=lambda m: None)
    before = (run / "export" / "model.onnx").stat().st_mtime_ns

    def fails(*args, **kwargs):  # after the ONNX export and the parity check: export.tmp/ is well filled by now
        assert (run / "export.tmp" / "model.onnx").is_file()
        raise interrupt

    monkeypatch.setattr(export_module, "_int8_variants", fails)
    with pytest.raises(type(interrupt)):
        export_run(run, ExportOptions(timing=False), log=lambda m: None)
    assert _leftovers(run) == []
    assert (run / "export" / "model.onnx").stat().st_mtime_ns == before


# ---------------------------------------------------------------------------------------------------------------
# 2 + 4. runs with bottleneck adapters (not mergeable) and with LoRA (merged)


@pytest.mark.parametrize("flags", [["--prune", "ffn=0.5"], ["--prune", "magnitude=0.5", "--distill", "1"],
                                   ["--distill", "1"]])
def test_adapter_runs_refuse_pruning_and_distillation_up_front(runs, capsys, flags):
    run = runs["adapter"]
    assert main(["export", str(run), "--no-int8", "--no-timing", *flags]) == 2
    err = capsys.readouterr().err
    assert "bottleneck adapters (peft.method=adapter)" in err and "cannot be merged" in err
    assert "Export it without them" in err and "Traceback" not in err
    assert _leftovers(run) == [] and not (run / "export").exists()


def test_adapter_run_exports_with_an_accurate_parity_json_and_predicts(runs, tmp_path):
    run = runs["adapter"]
    parity = export_run(run, ExportOptions(**QUIET), log=lambda m: None)
    assert parity["onnx"]["passed"]
    # model/ holds the base plus unmerged adapters (adapters.safetensors), and parity.json says so
    assert (run / "model" / "adapters.safetensors").is_file()
    assert parity["adapter"]["present"] is True and parity["adapter"]["merged"] is False
    assert "adapters.safetensors" in parity["adapter"]["note"] and "merged into" not in parity["adapter"]["note"]
    assert json.loads((run / "export" / "parity.json").read_text())["adapter"] == parity["adapter"]
    assert json.loads((run / "export" / "strop.json").read_text())["adapter_merged"] is False
    assert main(["predict", str(run / "export"), "--data", str(runs["test_csv"]), "--out",
                 str(tmp_path / "p.csv")]) == 0
    assert len(list(csv.DictReader((tmp_path / "p.csv").open()))) == 20


def test_lora_run_prunes_and_distills_into_plain_folders_that_predict(runs, tmp_path):
    run = runs["lora"]
    parity = export_run(run, ExportOptions(**QUIET, prune={"heads": 0.5, "magnitude": 0.5}, distill=1,
                                           distill_epochs=0.5), log=lambda m: None)
    assert parity["adapter"]["present"] is True and parity["adapter"]["merged"] is True
    assert "RUN/adapter/" in parity["adapter"]["note"]
    for name in ("pruned", "student"):
        folder = run / "export" / name
        meta = json.loads((folder / "strop.json").read_text())
        assert meta["peft"]["method"] == "lora" and meta["peft"]["merged"] is True  # a plain model, adapter merged
        assert not (folder / "adapter_config.json").exists() and not (folder / "adapters.safetensors").exists()
        out = tmp_path / f"{name}.csv"
        assert main(["predict", str(folder), "--data", str(runs["test_csv"]), "--out", str(out)]) == 0, name
        assert len(list(csv.DictReader(out.open()))) == 20


def test_plain_run_parity_says_there_is_no_adapter(runs):
    run = runs["short"]
    if not (run / "export").is_dir():
        export_run(run, ExportOptions(**QUIET), log=lambda m: None)
    parity = json.loads((run / "export" / "parity.json").read_text())
    assert parity["adapter"]["present"] is False and parity["adapter"]["merged"] is False
    assert "no adapter" in parity["adapter"]["note"]


# ---------------------------------------------------------------------------------------------------------------
# 3. runs with max_length below the exporter's example length


def test_run_with_max_length_8_exports_with_parity(runs):
    run = runs["short"]
    parity = export_run(run, ExportOptions(**QUIET), log=lambda m: None)
    assert parity["onnx"]["passed"] and parity["onnx"]["max_abs_logit_diff"] <= 1e-5
    assert json.loads((run / "model" / "strop.json").read_text())["max_length"] == 8


@pytest.mark.parametrize("max_length", [2, 3, 4])
def test_example_inputs_fit_max_length_and_the_axes_stay_dynamic(tiny_model, tmp_path, max_length):
    tok = load_tokenizer(tiny_model)
    inputs = example_inputs(tok, input_names_for(tok), max_length)
    batch, seq = inputs[0].shape
    assert 2 <= seq <= max_length and batch != seq  # equal sizes could be traced as one symbol
    torch.manual_seed(3)
    model = build_model(get_task("single_label"), Config(model=ModelConfig(path=str(tiny_model))), ["a", "b", "c"])
    model.eval()
    export_onnx(model, tok, tmp_path / "m.onnx", max_length)
    texts = ["hi", "refund my card please", "x", "parcel delivery tracking again today with courier", "ok"]
    enc = encode(tok, Examples(texts, None, None, list(range(5))), max_length)
    np.testing.assert_allclose(logits_of(OnnxModel(tmp_path / "m.onnx", 1), enc, batch_size=3),
                               logits_of(model, enc), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# 5. replacing RUN/export/ never leaves no export or a partial one


def _folder(path: Path, marker: str) -> Path:
    path.mkdir(parents=True)
    (path / "marker").write_text(marker)
    return path


def test_tidy_puts_back_an_export_old_that_lost_its_replacement(tmp_path):
    _folder(tmp_path / "export.old", "previous")
    _folder(tmp_path / "export.tmp", "unfinished")
    tidy_leftovers(tmp_path, log=lambda m: None)
    assert (tmp_path / "export" / "marker").read_text() == "previous" and _leftovers(tmp_path) == []


def test_tidy_removes_leftovers_and_never_a_complete_export(tmp_path):
    _folder(tmp_path / "export", "current")
    _folder(tmp_path / "export.old", "previous")
    _folder(tmp_path / "export.tmp", "unfinished")
    tidy_leftovers(tmp_path, log=lambda m: None)
    assert (tmp_path / "export" / "marker").read_text() == "current" and _leftovers(tmp_path) == []


def test_replace_folder_interrupted_between_renames_keeps_the_old_export(tmp_path, monkeypatch):
    final, new = _folder(tmp_path / "export", "old"), _folder(tmp_path / "export.tmp", "new")
    real_rename, calls = Path.rename, []

    def rename(self, target):
        calls.append(self.name)
        if self.name == "export.tmp":  # the second rename: new -> final
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(new, final)
    monkeypatch.undo()
    assert calls[:2] == ["export", "export.tmp"]
    assert (final / "marker").read_text() == "old"  # put back
    replace_folder(new, final)
    assert (final / "marker").read_text() == "new" and _leftovers(tmp_path) == []


def test_re_export_clears_an_interrupted_exports_leftovers(runs):
    run = runs["short"]
    if not (run / "export").is_dir():
        export_run(run, ExportOptions(**QUIET), log=lambda m: None)
    _folder(run / "export.old", "previous")
    _folder(run / "export.tmp", "unfinished")
    export_run(run, ExportOptions(**QUIET), log=lambda m: None)
    assert (run / "export" / "model.onnx").is_file() and not (run / "export" / "marker").exists()
    assert _leftovers(run) == []


def test_python_export_names_an_unknown_option(tmp_path):
    """strop.export(run, **options) checks the option names before touching the run: a typo is named with
    the list of valid options, not a dataclass TypeError."""
    import strop
    from strop.errors import StropError

    with pytest.raises(StropError, match=r"unknown option 'timming'.*'timing'"):
        strop.export(tmp_path / "no-run-here", timming=False)
