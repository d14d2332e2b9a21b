"""Bad input sweep (issue 5): malformed data files, configs and model folders, fed through the real CLI.

Every error case must give exit code 2 and one paragraph on stderr that starts with 'error:', names the problem and
says how to fix it, with no traceback, and must leave nothing half-written in the output folder. Inputs that only
look odd (BOM, CRLF, Latin-1 with data.encoding, a 1 MB text, quoted newlines) must train to a finished run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import tiny_overrides, toy_rows, write_csv, write_jsonl

from strop.cli import main

GOOD_CSV = "".join(f"{r['text']},{r['label']}\n" for r in toy_rows(30, seed=1))


@dataclass
class Ctx:
    """What a case builder gets: a scratch folder, the tiny model, and helpers that write files into the folder."""

    tmp: Path
    model: Path
    run: Path | None = None  # a finished run, for eval/predict cases

    @property
    def runs(self) -> Path:
        return self.tmp / "runs"

    def file(self, name: str, content: str | bytes, encoding: str = "utf-8") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
        return path

    def good(self, name: str = "train.csv") -> Path:
        return self.file(name, "text,label\n" + GOOD_CSV)

    def train(self, *extra: str, **overrides) -> list[str]:
        """argv for a fast `strop train` run: the tiny model, a good train.csv unless data.train is given."""
        base = {"train.epochs": 1, "train.max_steps": 2}
        if "data.train" not in overrides:
            base["data.train"] = self.good()
        base.update(overrides)
        return ["train", *extra, *tiny_overrides(self.model, self.runs, **base)]

    def model_copy(self, drop: tuple[str, ...] = (), **files: str | bytes) -> Path:
        """A copy of the tiny model without the files in `drop` and with `files` written over it ('__' in a name
        stands for '.')."""
        folder = self.tmp / "model"
        shutil.copytree(self.model, folder)
        for name in drop:
            (folder / name).unlink()
        for name, content in files.items():
            path = folder / name.replace("__", ".")
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return folder


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list[str]]  # -> argv for strop.cli.main
    expect: tuple[str, ...]  # substrings of the message (case-insensitive): the problem and the fix
    needs_run: bool = False
    marks: tuple = field(default_factory=tuple)


def csv_case(id_: str, content: str | bytes, expect: tuple[str, ...], name: str = "train.csv", **overrides) -> Case:
    return Case(id_, lambda c: c.train(**{"data.train": c.file(name, content), **overrides}), expect)


def truncated(path: Path, keep: float) -> bytes:
    data = path.read_bytes()
    return data[: int(len(data) * keep)]


def bin_weights(model: Path) -> bytes:
    """The tiny model's weights as a (pickle-based) pytorch_model.bin."""
    import io

    from safetensors.torch import load_file

    buf = io.BytesIO()
    torch.save(load_file(str(model / "model.safetensors")), buf)
    return buf.getvalue()


class Evil:
    def __reduce__(self):  # unpickling this would call print(): code a weights file must never run
        return (print, ("pwned",))


def evil_bin() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    return buf.getvalue()


def eval_argv(c: Ctx, data: Path, verb: str = "eval", run: Path | None = None, out: str = "out.json") -> list[str]:
    return [verb, str(run or c.run), "--data", str(data), "--out", str(c.tmp / out)]


ERRORS = [
    # ---- data files: shape and format -------------------------------------------------------------------------
    csv_case("empty-file", "", ("is empty", "header line")),
    csv_case("whitespace-only-file", "\n  \n\n", ("is empty", "header line")),
    csv_case("header-only", "text,label\n", ("header but no rows", "add training examples")),
    csv_case("semicolon-delimiter", "text;label\n" + GOOD_CSV.replace(",", ";"), ("semicolon", "convert it")),
    csv_case("tab-separated-named-csv", "text\tlabel\n" + GOOD_CSV.replace(",", "\t"), ("tab", "data.format=tsv")),
    csv_case("comma-separated-named-tsv", "text,label\n" + GOOD_CSV, ("comma", "data.format=csv"), name="train.tsv"),
    csv_case("unquoted-comma", "text,label\n" + GOOD_CSV + "hello, world,billing\n",
             ("train.csv:32", "3 fields but the header has 2", "quote fields")),
    csv_case("missing-field", "text,label\n" + GOOD_CSV + "just text\n",
             ("train.csv:32", "1 fields", "check the delimiter")),
    csv_case("unclosed-quote", "text,label\n" + GOOD_CSV + '"oops,billing\nmore,account\n',
             ("train.csv:32", "quote that is never closed")),
    csv_case("duplicate-columns", "text,label,label\n" + GOOD_CSV.replace("\n", ",x\n"),
             ("'label' appears twice", "rename one")),
    csv_case("empty-column-name", "text,,label\n" + GOOD_CSV.replace(",", ",x,"),
             ("empty column name", "name every column")),
    csv_case("unknown-extension", "text,label\n" + GOOD_CSV, ("cannot tell the format", "set data.format"),
             name="train.txt"),
    Case("missing-file", lambda c: c.train(**{"data.train": c.tmp / "nope.csv"}), ("not found", "check the path")),
    Case("train-not-set", lambda c: c.train(**{"data.train": ""}), ("data.train is not set", "data.train=")),
    csv_case("invalid-jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": }\n',
             ("train.jsonl:2", "invalid json", "one json object"), name="train.jsonl"),
    csv_case("json-array-not-lines", json.dumps(toy_rows(10, seed=1)), ("json object per line", "json lines"),
             name="train.json"),
    csv_case("corrupt-parquet", b"PAR1 this is not parquet", ("not a readable parquet file", "re-export"),
             name="train.parquet"),
    Case("folder-not-a-dataset", lambda c: c.train(**{"data.train": c.file("ds/readme.txt", "hi").parent}),
         ("save_to_disk", "point to a data file")),
    # ---- data files: encodings ---------------------------------------------------------------------------------
    Case("latin1-without-encoding",
         lambda c: c.train(**{"data.train": c.file("train.csv", "text,label\n" + GOOD_CSV + "caf\xe9 card,billing\n",
                                                   encoding="latin-1")}),
         ("train.csv:32", "not valid utf-8", "data.encoding=latin-1")),
    Case("unknown-encoding", lambda c: c.train(**{"data.encoding": "klingon"}),
         ("data.encoding='klingon'", "not a known text encoding", "utf-8")),
    csv_case("binary-garbage", bytes(range(256)) * 8, ("not valid utf-8", "convert the file")),
    # ---- data rows: labels and texts ---------------------------------------------------------------------------
    csv_case("mixed-label-types", "text,label\n" + GOOD_CSV + "refund card,7\n",
             ("mixes numbers", "make the labels consistent")),
    csv_case("empty-label-csv", "text,label\n" + GOOD_CSV + "refund card,\n",
             ("train.csv:32", "missing label", "label the row or remove it")),
    csv_case("nan-label-jsonl", "".join(json.dumps(r) + "\n" for r in toy_rows(30, seed=1)) +
             '{"text": "refund card", "label": NaN}\n',
             ("train.jsonl:31", "missing label", "label the row or remove it"), name="train.jsonl"),
    csv_case("labels-all-empty", "text,label\n" + "".join(f"{r['text']},\n" for r in toy_rows(10, seed=1)),
             ("empty in every row", "data.label_column")),
    csv_case("single-class", "text,label\n" + "".join(f"{r['text']},billing\n" for r in toy_rows(10, seed=1)),
             ("only ['billing']", "at least 2 classes", "add examples")),
    csv_case("class-with-one-example", "text,label\n" + GOOD_CSV + "odd one out,rare\n",
             ("'rare' has only 1 example", "give data.validation")),
    csv_case("empty-text", "text,label\n" + GOOD_CSV + ",billing\n",
             ("train.csv:32", "empty text", "remove the row or fill it in")),
    csv_case("regression-with-text-labels", "text,label\n" + GOOD_CSV,
             ("is not a number", "task=single_label"), task="regression"),
    Case("regression-constant-validation-targets",
         lambda c: c.train(task="regression", **{
             "data.train": c.file("reg.csv", "text,label\n" + "".join(f"{r['text']},{i % 5}\n"
                                                                      for i, r in enumerate(toy_rows(30, seed=1)))),
             "data.validation": c.file("val.csv", "text,label\nrefund card,2.0\nhi there,2\n")}),
         ("every validation target is 2", "pearson", "undefined", "train.metric=mse")),
    csv_case("no-text-column", "body,label\n" + GOOD_CSV, ("no text column found", "data.text_column")),
    csv_case("no-label-column", "text,answer\n" + GOOD_CSV, ("no label column found", "data.label_column")),
    csv_case("configured-column-missing", "text,label\n" + GOOD_CSV, ("data.label_column='lbl' not found",
                                                                      "columns are ['text', 'label']"),
             **{"data.label_column": "lbl"}),
    Case("validation-unknown-label",
         lambda c: c.train(**{"data.validation": c.file("val.csv", "text,label\nrefund card,billing\nhi,refunds\n")}),
         ("val.csv:3", "'refunds'", "never occurs in the training data", "fix the label or add training examples")),
    Case("validation-missing-column",
         lambda c: c.train(**{"data.validation": c.file("val.csv", "text,y\nrefund card,billing\n")}),
         ("data.label_column='label' not found", "validation split", "columns are")),
    Case("validation-header-only",
         lambda c: c.train(**{"data.validation": c.file("val.csv", "text,label\n")}),
         ("validation split has no rows", "add examples")),
    # ---- config values -----------------------------------------------------------------------------------------
    Case("unknown-task", lambda c: c.train(task="sentiment"), ("task='sentiment'", "single_label", "regression")),
    Case("negative-lr", lambda c: c.train(**{"train.lr": -0.001}), ("train.lr=-0.001", "must be > 0")),
    Case("batch-size-0", lambda c: c.train(**{"train.batch_size": 0}), ("train.batch_size=0", "must be > 0")),
    Case("lr-not-a-number", lambda c: c.train(**{"train.lr": "fast"}), ("train.lr='fast'", "not a valid float",
                                                                                "give a number")),
    Case("lr-nan", lambda c: c.train(**{"train.lr": "nan"}), ("train.lr", "finite number")),
    Case("epochs-0", lambda c: c.train(**{"train.epochs": 0}), ("train.epochs=0", "must be > 0")),
    Case("unknown-key", lambda c: c.train(**{"train.lrr": 1}), ("unknown config key 'train.lrr'", "'train.lr'")),
    Case("section-as-value", lambda c: c.train(train=5), ("'train' is a section", "mapping")),
    Case("bool-not-a-bool", lambda c: c.train(**{"model.allow_pickle": "maybe"}), ("model.allow_pickle='maybe'",
                                                                                         "use true or false")),
    Case("bare-word-as-config", lambda c: c.train("train.lr"), ("config file train.lr not found", "key=value")),
    Case("override-without-equals", lambda c: [*c.train(), "train.lr"], ("override 'train.lr'", "key=value")),
    Case("ratios-leave-no-train", lambda c: c.train(**{"data.validation_ratio": 0.5, "data.test_ratio": 0.45}),
         ("too little for training", "lower them")),
    Case("micro-batch-not-dividing", lambda c: c.train(**{"train.micro_batch_size": 3}),
         ("train.micro_batch_size=3", "divide train.batch_size=8")),
    Case("max-length-too-long", lambda c: c.train(**{"model.max_length": 4096}),
         ("model.max_length=4096", "model.max_length<=128")),
    Case("metric-of-other-task", lambda c: c.train(**{"train.metric": "pearson"}),
         ("train.metric='pearson'", "choose from")),
    Case("unknown-precision", lambda c: c.train(**{"train.precision": "fp16"}), ("train.precision='fp16'", "bf16")),
    Case("unknown-tracker", lambda c: c.train(track="comet"), ("unknown tracker", "tensorboard")),
    Case("cuda-without-gpu", lambda c: c.train(**{"train.device": "cuda"}), ("no cuda gpu", "train.device=auto"),
         marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible"),)),
    Case("config-file-missing", lambda c: c.train(str(c.tmp / "nope.yaml")),
         ("nope.yaml not found", "check the path")),
    Case("config-file-invalid-yaml", lambda c: c.train(str(c.file("c.yaml", "train:\n  lr: [1, 2\n  epochs: 3\n"))),
         ("c.yaml:", "not valid yaml", "fix the syntax")),
    Case("config-file-latin1", lambda c: c.train(str(c.file("c.yaml", "name: caf\xe9\n", encoding="latin-1"))),
         ("c.yaml", "not valid utf-8", "save the config as utf-8")),
    Case("config-file-misspelled-section", lambda c: c.train(str(c.file("c.yaml", "trian:\n  lr: 0.1\n"))),
         ("unknown config key 'trian'", "did you mean 'train.")),
    Case("config-file-not-a-mapping", lambda c: c.train(str(c.file("c.yaml", "- a\n- b\n"))),
         ("must hold a mapping", "got list")),
    Case("resume-without-run", lambda c: ["train", "--resume", str(c.tmp / "runs" / "nope")],
         ("cannot resume", "no config.yaml", "give the run folder")),
    # ---- model folders -----------------------------------------------------------------------------------------
    Case("model-folder-missing", lambda c: c.train(**{"model.path": c.tmp / "no-such-model"}),
         ("folder not found", "local hugging face model folder")),
    Case("model-path-is-a-file", lambda c: c.train(**{"model.path": c.file("model.safetensors", b"x")}),
         ("is a file", "give the folder that holds the model")),
    Case("model-without-config", lambda c: c.train(**{"model.path": c.model_copy(drop=("config.json",))}),
         ("no config.json", "config.json")),
    Case("model-without-weights", lambda c: c.train(**{"model.path": c.model_copy(drop=("model.safetensors",))}),
         ("has no weights", "copy the weights")),
    Case("model-only-bin-weights",
         lambda c: c.train(**{"model.path": c.model_copy(drop=("model.safetensors",),
                                                          pytorch_model__bin=bin_weights(c.model))}),
         ("only has pickle weights", "convert them to safetensors", "model.allow_pickle=true")),
    Case("model-evil-bin-allowed",
         lambda c: c.train(**{"model.path": c.model_copy(drop=("model.safetensors",), pytorch_model__bin=evil_bin()),
                              "model.allow_pickle": "true"}),
         ("refusing to load the pickle weights", "convert them to safetensors")),
    Case("model-corrupt-config-json", lambda c: c.train(**{"model.path": c.model_copy(config__json="{not json")}),
         ("config.json", "not valid json", "copy the model's config.json again")),
    Case("model-config-json-is-a-list", lambda c: c.train(**{"model.path": c.model_copy(config__json="[1, 2]")}),
         ("config.json holds a list", "copy the model's config.json again")),
    Case("model-config-without-model-type",
         lambda c: c.train(**{"model.path": c.model_copy(config__json='{"hidden_size": 32}')}),
         ("has no model_type", "copy the model's config.json again")),
    Case("model-config-unknown-type",
         lambda c: c.train(**{"model.path": c.model_copy(config__json='{"model_type": "no-such-arch"}')}),
         ("model_type 'no-such-arch' is unknown", "upgrade transformers")),
    Case("model-remote-code-not-trusted",
         lambda c: c.train(**{"model.path": c.model_copy(config__json=json.dumps(
             {"model_type": "mything", "auto_map": {"AutoConfig": "m.MyConfig", "AutoModel": "m.MyModel"}}))}),
         ("custom code", "model.trust_remote_code=true")),
    Case("model-truncated-safetensors",
         lambda c: c.train(**{"model.path": c.model_copy(
             model__safetensors=truncated(c.model / "model.safetensors", 0.5))}),
         ("corrupt or truncated", "copy them again")),
    Case("model-garbage-safetensors",
         lambda c: c.train(**{"model.path": c.model_copy(model__safetensors=b"\x00" * 64)}),
         ("corrupt or truncated", "copy them again")),
    Case("model-without-tokenizer",
         lambda c: c.train(**{"model.path": c.model_copy(drop=("tokenizer.json", "tokenizer_config.json"))}),
         ("no tokenizer files", "copy the tokenizer files")),
    Case("model-tokenizer-config-without-vocab",
         lambda c: c.train(**{"model.path": c.model_copy(drop=("tokenizer.json",))}),
         ("has no vocabulary", "copy the model's tokenizer.json")),
    Case("model-corrupt-tokenizer-json", lambda c: c.train(**{"model.path": c.model_copy(tokenizer__json="{oops")}),
         ("cannot load a tokenizer", "copy the model's tokenizer files")),
    # ---- eval / predict ----------------------------------------------------------------------------------------
    Case("eval-data-missing", lambda c: eval_argv(c, c.tmp / "nope.csv"), ("nope.csv not found", "--data"),
         needs_run=True),
    Case("eval-empty-file", lambda c: eval_argv(c, c.file("e.csv", "")), ("is empty",), needs_run=True),
    Case("eval-no-text-column", lambda c: eval_argv(c, c.file("e.csv", "body,label\nrefund card,billing\n")),
         ("no text column found", "'text'"), needs_run=True),
    Case("eval-no-label-column", lambda c: eval_argv(c, c.file("e.csv", "text,answer\nrefund card,billing\n")),
         ("no label column found", "'label'"), needs_run=True),
    Case("eval-unknown-label", lambda c: eval_argv(c, c.file("e.csv", "text,label\nrefund card,refunds\n")),
         ("e.csv:2", "'refunds'", "never occurs in the training data"), needs_run=True),
    Case("eval-run-without-model",
         lambda c: eval_argv(c, c.good("e.csv"), run=c.file("half/config.yaml", "name: half\n").parent),
         ("no finished model", "did the run finish"), needs_run=True),
    Case("predict-data-missing", lambda c: eval_argv(c, c.tmp / "nope.csv", "predict", out="p.csv"),
         ("nope.csv not found", "--data"), needs_run=True),
    Case("predict-no-text-column",
         lambda c: eval_argv(c, c.file("p.csv", "body\nrefund card\n"), "predict", out="p.csv"),
         ("no text column found", "'text'"), needs_run=True),
    Case("predict-empty-text", lambda c: eval_argv(c, c.file("p.csv", "id,text\n1,refund\n2,\n"), "predict",
                                                  out="p.jsonl"),
         ("p.csv:3", "empty text"), needs_run=True),
    Case("predict-bad-out-extension", lambda c: eval_argv(c, c.file("p.csv", "text\nrefund\n"), "predict",
                                                         out="preds.xlsx"),
         (".jsonl or .csv",), needs_run=True),
    Case("predict-run-without-model",
         lambda c: eval_argv(c, c.good("p.csv"), "predict", run=c.file("half/config.yaml", "name: half\n").parent,
                             out="p.csv"),
         ("no finished model", "did the run finish"), needs_run=True),
    Case("eval-batch-size-0", lambda c: [*eval_argv(c, c.good("e.csv")), "--batch-size", "0"],
         ("--batch-size", "greater than or equal to 1"), needs_run=True),
    Case("predict-negative-batch-size", lambda c: [*eval_argv(c, c.good("p.csv"), "predict", out="p.csv"),
                                                   "--batch-size", "-1"],
         ("--batch-size", "greater than or equal to 1"), needs_run=True),
    # ---- command-line usage ------------------------------------------------------------------------------------
    Case("train-no-arguments", lambda c: ["train"], ("give a config file", "data.train=")),
    Case("train-unknown-option", lambda c: c.train("--bogus"), ("no such option", "--bogus")),
    Case("eval-without-data-option", lambda c: ["eval", str(c.run)], ("missing", "--data"), needs_run=True),
]


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    src = write_csv(tmp / "train.csv", toy_rows(30, seed=1))
    runs = tmp / "runs"
    assert main(["train", *tiny_overrides(tiny_model, runs, **{"data.train": src, "train.epochs": 1,
                                                                "train.max_steps": 2})]) == 0
    return runs / "run"


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def error_message(stderr: str) -> str:
    """The one error paragraph on stderr; checks its shape."""
    assert "Traceback" not in stderr, stderr
    assert stderr.count("error:") == 1, stderr
    message = stderr[stderr.index("error:"):].strip()
    assert stderr.lstrip().startswith("error:"), f"output before the error message:\n{stderr}"
    assert "\n\n" not in message and len(message) < 1200, f"not one paragraph:\n{message}"
    return message


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in ERRORS])
def test_bad_input_is_one_clear_error(case: Case, tiny_model, tmp_path, capsys, request):
    ctx = Ctx(tmp_path, tiny_model, request.getfixturevalue("finished_run") if case.needs_run else None)
    argv = case.build(ctx)
    run_before = tree(ctx.run) if ctx.run else None
    inputs_before = tree(tmp_path)
    capsys.readouterr()

    code = main(argv)

    out, err = capsys.readouterr()
    assert code == 2, err
    assert "pwned" not in out  # no code in a weights file ran
    message = error_message(err).lower()
    for word in case.expect:
        assert word.lower() in message, f"{word!r} not in: {message}"
    # nothing half-written: no run folder content, no output file, the finished run untouched
    assert tree(ctx.runs) == [], tree(ctx.runs)
    assert tree(tmp_path) == inputs_before
    if ctx.run:
        assert tree(ctx.run) == run_before


def test_existing_run_folder_is_left_alone(tiny_model, tmp_path, capsys):
    ctx = Ctx(tmp_path, tiny_model)
    (ctx.runs / "run").mkdir(parents=True)
    (ctx.runs / "run" / "notes.txt").write_text("mine")
    assert main(ctx.train()) == 2
    message = error_message(capsys.readouterr().err)
    # no checkpoint in it: --resume would fail too, so it is not offered
    assert "already exists" in message and "--overwrite" in message and "--resume" not in message
    assert tree(ctx.runs) == ["run", "run/notes.txt"] and (ctx.runs / "run" / "notes.txt").read_text() == "mine"


def test_bad_model_folder_in_a_subprocess(tiny_model, tmp_path):
    """Outside pytest too: exit code 2, the message, no traceback, nothing written."""
    ctx = Ctx(tmp_path, tiny_model)
    argv = ctx.train(**{"model.path": ctx.model_copy(drop=("model.safetensors",))})
    proc = subprocess.run([sys.executable, "-m", "strop.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    message = error_message(proc.stderr)
    assert "has no weights" in message and "copy the weights" in message
    assert not ctx.runs.exists()


# ---------------------------------------------------------------------------------------------------------------
# odd but valid input trains to a finished run

BOM_CRLF = "\ufefftext,label\r\n" + GOOD_CSV.replace("\n", "\r\n")


@dataclass
class Good:
    id: str
    build: Callable[[Ctx], list[str]]
    check: Callable[[Path, str], None] = lambda run_dir, log: None


def long_text_rows() -> str:
    words = ("refund card invoice payment " * 60_000)[: 1_000_000]  # a 1 MB single text
    return "text,label\n" + GOOD_CSV + f"{words},billing\n"


def check_truncated(run_dir: Path, log: str) -> None:
    assert "truncated" in log  # the log says so too
    data = json.loads((run_dir / "data.json").read_text())
    assert sum(s["truncated"] for s in data["splits"].values()) >= 1
    assert max(s["max_tokens"] for s in data["splits"].values()) <= 128


def check_rows(n: int):
    def check(run_dir: Path, log: str) -> None:
        data = json.loads((run_dir / "data.json").read_text())
        assert sum(s["examples"] for s in data["splits"].values()) == n
        assert data["labels"] == ["account", "billing", "shipping"]
    return check


GOOD = [
    Good("utf8-bom", lambda c: c.train(**{"data.train": c.file("train.csv", "\ufefftext,label\n" + GOOD_CSV)}),
         check_rows(30)),
    Good("crlf", lambda c: c.train(**{"data.train": c.file("train.csv", "text,label\r\n" +
                                                           GOOD_CSV.replace("\n", "\r\n"))}), check_rows(30)),
    Good("bom-and-crlf", lambda c: c.train(**{"data.train": c.file("train.csv", BOM_CRLF)}), check_rows(30)),
    Good("jsonl-bom-crlf", lambda c: c.train(**{"data.train": c.file(
        "train.jsonl", "\ufeff" + "".join(json.dumps(r) + "\r\n" for r in toy_rows(30, seed=1)))}), check_rows(30)),
    Good("latin1-with-encoding", lambda c: c.train(**{
        "data.train": c.file("train.csv", "text,label\n" + GOOD_CSV + "caf\xe9 na\xefve refund,billing\n",
                             encoding="latin-1"),
        "data.encoding": "latin-1"}), check_rows(31)),
    Good("one-megabyte-text", lambda c: c.train(**{"data.train": c.file("train.csv", long_text_rows()),
                                                   "data.validation_ratio": 0, "data.test_ratio": 0}),
         check_truncated),
    Good("quoted-newlines-and-commas", lambda c: c.train(**{"data.train": c.file(
        "train.csv", "text,label\n" + GOOD_CSV + '"refund, card\nand ""invoice"", please",billing\n')}),
        check_rows(31)),
    Good("tsv-with-quotes", lambda c: c.train(**{"data.train": c.file(
        "train.tsv", "text\tlabel\n" + GOOD_CSV.replace(",", "\t") + "it's a \"parcel\", sure\tshipping\n")}),
        check_rows(31)),
    Good("jsonl-numeric-labels", lambda c: c.train(**{"data.train": write_jsonl(
        c.tmp / "train.jsonl", [{"text": r["text"], "label": i % 2} for i, r in enumerate(toy_rows(20, seed=1))])})),
]


@pytest.mark.parametrize("case", [pytest.param(g, id=g.id) for g in GOOD])
def test_odd_but_valid_input_trains(case: Good, tiny_model, tmp_path, capsys):
    ctx = Ctx(tmp_path, tiny_model)
    code = main(case.build(ctx))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "error:" not in err and "Traceback" not in err
    run_dir = ctx.runs / "run"
    assert (run_dir / "model" / "strop.json").is_file() and (run_dir / "results.json").is_file()
    case.check(run_dir, err)


def test_every_error_case_is_distinct_and_expects_a_message():
    """Each case has its own id (pytest would silently run a duplicate id's case twice under one name) and expects
    non-empty message parts; a case expecting the same message as another must test another verb or input."""
    ids = [c.id for c in ERRORS] + [g.id for g in GOOD]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    for case in ERRORS:
        assert case.expect and all(part.strip() for part in case.expect), case.id
    same: dict = {}
    for case in ERRORS:
        same.setdefault(tuple(sorted(p.lower() for p in case.expect)), []).append(case.id)
    for group in (g for g in same.values() if len(g) > 1):  # e.g. eval-data-missing / predict-data-missing
        assert len({i.split("-")[0] for i in group}) == len(group) or len(group) == 2, group
