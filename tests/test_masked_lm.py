"""Masked-LM pretraining (task=masked_lm, `strop pretrain`) on the tiny random BERT with the default model's
real tokenizer: packing and whole-word masks, the fixed evaluation masks, a run end to end whose model/ a
classifier is fine-tuned from, exact resume, perplexity as a lower-is-better model-selection metric, the
refusals of predict / export / serve, and bad input through the CLI (exit 2, one message naming the file or
key and the fix, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides, toy_documents, toy_rows, write_csv, write_lines
from safetensors.torch import load_file
from test_fault_tolerance import crash_after_checkpoint

import strop
from strop.cli import main
from strop.compress.export import ExportOptions, export_run
from strop.data.masked_text import collate_masked, pack_documents
from strop.errors import ExportError, ModelError
from strop.models.backbone import load_tokenizer
from strop.serve.backend import check_target
from strop.training import loop as loop_mod


def overrides(model: Path, out: Path, train: Path, **extra) -> list[str]:
    base = {"data.train": str(train), "task": "masked_lm", "model.max_length": 32, "train.max_steps": 6,
            "train.eval_every": 3, "train.threads": 1, "track": "none", "eval.report": False}
    base.update(extra)
    return tiny_overrides(model, out / "runs", **base)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_lines(tmp_path_factory.mktemp("corpus") / "docs.txt", toy_documents(120, 1))


@pytest.fixture(scope="module")
def pretrained(tiny_model, corpus, tmp_path_factory):
    """One pretraining run through the CLI verb (6 steps, validation every 3)."""
    out = tmp_path_factory.mktemp("pretrain")
    args = [a for a in overrides(tiny_model, out, corpus, **{"eval.report": True}) if a != "task=masked_lm"]
    assert main(["pretrain", *args]) == 0
    return out / "runs" / "run"


# ---------------------------------------------------------------------------------------------------------
# packing and masks


def test_documents_are_packed_into_full_rows_joined_by_sep(tokenizer):
    docs = toy_documents(12, 3)
    enc = pack_documents(tokenizer, docs, 32, 0.15)
    # the expected stream: each document tokenized alone, joined by [SEP] (the packing's definition)
    stream = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        stream += ([tokenizer.sep_token_id] if stream else []) + ids
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows = [list(r) for r in enc.input_ids]
    assert all(r[0] == cls and r[-1] == sep for r in rows)
    assert [len(r) for r in rows[:-1]] == [32] * (len(rows) - 1) and 3 <= len(rows[-1]) <= 32
    assert sum((r[1:-1] for r in rows), []) == stream
    assert enc.n_documents == 12 and enc.n_truncated == 0 and list(enc.lengths) == [len(r) for r in rows]
    assert len(rows) == -(-len(stream) // 30)  # 30 tokens of text per row of 32


def test_masks_cover_whole_words_at_the_configured_rate(tokenizer):
    enc = pack_documents(tokenizer, toy_documents(400, 4), 64, 0.15)
    batch = collate_masked(enc, np.arange(len(enc)), np.random.default_rng(0))
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
    chosen_words, all_words = 0, 0
    for row, words in enumerate(enc.word_ids):
        picked = labels[row, :len(words)] != -100
        assert not picked[words < 0].any()  # [CLS], [SEP] and separators are never scored
        for w in np.unique(words[words >= 0]):
            assert len(set(picked[words == w])) == 1, "a word is chosen with all its subwords or not at all"
            chosen_words += int(picked[words == w][0])
            all_words += 1
        gold = np.asarray(enc.input_ids[row])
        assert (labels[row, :len(words)][picked] == gold[picked]).all()  # labels hold the original ids
    # BERT's recipe: 15% of the words; their tokens 80% [MASK], 10% random, 10% kept. Seed 0 gives 15.5%
    # of 9,912 words and, of 1,948 tokens, 79.2% [MASK] and 10.6% kept: within ~1.3 binomial standard
    # errors (0.4% for words, 0.9% / 0.7% for tokens) of the targets; the bounds are 3-4 standard errors
    assert all_words > 9000 and abs(chosen_words / all_words - 0.15) < 0.015
    scored = labels != -100
    masked = (inputs[scored] == tokenizer.mask_token_id).mean()
    kept = (inputs[scored] == labels[scored]).mean()
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.03 and abs(1 - masked - kept - 0.1) < 0.03


def test_evaluation_masks_are_fixed_per_row_and_training_masks_follow_the_rng(tokenizer):
    enc = pack_documents(tokenizer, toy_documents(60, 5), 32, 0.15)
    alone = collate_masked(enc, np.array([3]))
    among = collate_masked(enc, np.array([5, 3, 1]))
    n = int(enc.lengths[3])
    # rng=None: row 3's masks depend on the row only, not on the batch it is evaluated in or when
    assert torch.equal(alone["labels"][0, :n], among["labels"][1, :n])
    assert torch.equal(alone["input_ids"][0, :n], among["input_ids"][1, :n])
    rows = np.arange(len(enc))
    a, b = (collate_masked(enc, rows, np.random.default_rng([42, 0, 0, 7])) for _ in range(2))
    c = collate_masked(enc, rows, np.random.default_rng([42, 0, 0, 8]))
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["labels"], c["labels"])


# ---------------------------------------------------------------------------------------------------------
# a run end to end


def test_pretrain_writes_a_run_whose_model_is_an_encoder_folder(pretrained, tiny_model):
    from transformers import AutoModel

    results = json.loads((pretrained / "results.json").read_text())
    assert results["metric"] == "perplexity" and results["steps"] == 6 and results["best_step"] in (3, 6)
    records = [json.loads(x) for x in (pretrained / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in val] == [3, 6]
    # perplexity is exp(mean loss over the masked tokens), at every evaluation
    for r in val + [results["validation"], results["test"]]:
        assert r["perplexity"] == pytest.approx(np.exp(r["loss"]), rel=1e-9) and r["masked_tokens"] > 0
    best = min(val, key=lambda r: r["perplexity"])  # lower is better
    assert results["best_step"] == best["step"] and results["best_metric"] == best["perplexity"]
    data = json.loads((pretrained / "data.json").read_text())
    assert data["task"] == "masked_lm" and data["splits"]["train"]["documents"] == 96  # 120 less 10% + 10%
    report = (pretrained / "report.html").read_text()
    # the final metrics table shows perplexity; the curves section plots it per evaluation (a PNG)
    assert "<th>perplexity</th><th>masked_accuracy</th>" in report and "Training curves" in report
    # model/: a BERT folder (safetensors) that AutoModel loads as BertModel; the pooler is the base model's,
    # untouched (masked-LM training never reads it), the embeddings are the trained ones
    folder = pretrained / "model"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    encoder = AutoModel.from_pretrained(str(folder))
    base = load_file(str(tiny_model / "model.safetensors"))
    assert type(encoder).__name__ == "BertModel"
    torch.testing.assert_close(encoder.pooler.dense.weight, base["pooler.dense.weight"], atol=0, rtol=0)
    words = base["embeddings.word_embeddings.weight"]
    assert not torch.equal(encoder.embeddings.word_embeddings.weight, words)


def test_a_classifier_is_fine_tuned_from_the_pretrained_model(pretrained, tmp_path):
    from transformers import AutoModelForSequenceClassification

    train = write_csv(tmp_path / "labelled.csv", toy_rows(60, 1))
    args = tiny_overrides(pretrained / "model", tmp_path / "runs", **{
        "data.train": str(train), "train.max_steps": 4, "track": "none", "eval.report": False,
        "name": "clf"})
    assert main(["train", *args]) == 0
    run = tmp_path / "runs" / "clf"
    meta = json.loads((run / "model" / "strop.json").read_text())
    assert meta["task"] == "single_label" and meta["base_model"] == str(pretrained / "model")
    # the classifier started from the pretrained encoder: its frozen-in-pretraining pooler is loaded, not new
    fresh = AutoModelForSequenceClassification.from_pretrained(str(pretrained / "model"), num_labels=3)
    pretrained_weights = load_file(str(pretrained / "model" / "model.safetensors"))
    for key in ("embeddings.word_embeddings.weight", "pooler.dense.weight"):
        torch.testing.assert_close(fresh.bert.state_dict()[key], pretrained_weights[f"bert.{key}"],
                                   atol=0, rtol=0)


def test_strop_eval_reproduces_the_runs_test_perplexity(pretrained, corpus, tmp_path, capsys):
    """The same documents, packed and masked alike (fixed evaluation masks), give the same perplexity."""
    test_docs = tmp_path / "test.txt"
    results = json.loads((pretrained / "results.json").read_text())
    # the run carved its test split from the corpus: rebuild that file from the run's own split
    from strop.config import load_config
    from strop.tasks import prepare

    ds = prepare(load_config(pretrained / "config.yaml"))
    write_lines(test_docs, ds.splits["test"].texts)
    assert main(["eval", str(pretrained), "--data", str(test_docs)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["perplexity"] == pytest.approx(results["test"]["perplexity"], rel=1e-6)
    assert got["documents"] == 12


def test_predict_export_and_serve_refuse_with_the_reason(pretrained, corpus, capsys):
    assert main(["predict", str(pretrained), "--data", str(corpus)]) == 2
    assert "cannot predict with this model: a masked-LM run predicts no labels" in capsys.readouterr().err
    with pytest.raises(ModelError, match="predicts no labels; fine-tune a classifier from its encoder"):
        strop.load(pretrained).predict(["a text"])
    with pytest.raises(ExportError, match="cannot export .*not exported: its model/ folder is an encoder"):
        export_run(pretrained, ExportOptions(int8=False, timing=False))
    with pytest.raises(ModelError, match="cannot serve .*predicts no labels"):
        check_target(pretrained, "torch")
    assert not (pretrained / "export").exists()


def test_resumed_pretraining_equals_an_uninterrupted_run(tiny_model, corpus, tmp_path, monkeypatch):
    """Masks are drawn from the loop's rng, seeded by the batch's position: killed after step 3's checkpoint
    and resumed, the run ends with the weights and losses of the run that was never stopped."""
    common = {"train.log_every": 1, "train.save_every": 1}
    whole = strop.train(None, overrides(tiny_model, tmp_path / "a", corpus, **common))
    run_dir = crash_after_checkpoint(monkeypatch, 3, overrides(tiny_model, tmp_path / "b", corpus, **common))
    resumed = strop.train(resume=run_dir)
    assert resumed.results["resumed_from_step"] == 3
    records = [map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               for d in (whole.run_dir, run_dir)]
    losses = [[(r["step"], r["loss"]) for r in rs if r["split"] == "train"] for rs in records]
    assert losses[0] == losses[1] and [s for s, _ in losses[0]] == [1, 2, 3, 4, 5, 6]
    a, b = (load_file(str(r.model_dir / "model.safetensors")) for r in (whole, resumed))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0)
    assert resumed.results["validation"] == whole.results["validation"]


def test_lowest_perplexity_wins_and_early_stopping_counts_rises(tiny_model, corpus, tmp_path, monkeypatch):
    real, seen = loop_mod.track_best, []
    scripted = {2: 50.0, 4: 80.0, 6: 70.0, 8: 60.0}  # step 2 is best; 4 and 6: two evaluations without gain

    def track(state, value, loss, higher):
        seen.append(higher)
        return real(state, scripted[state.step], loss, higher)

    monkeypatch.setattr(loop_mod, "track_best", track)
    run = strop.train(None, overrides(tiny_model, tmp_path, corpus, **{
        "train.max_steps": 8, "train.eval_every": 2, "train.early_stopping_patience": 2}))
    assert seen == [False, False, False]  # perplexity: lower is better (evaluate/metrics.greater_is_better)
    assert run.results["best_step"] == 2 and run.results["stopped_early"] and run.results["steps"] == 6


# ---------------------------------------------------------------------------------------------------------
# the CLI verb and bad input


def test_pretrain_help_and_help_config_answer(capsys):
    assert main(["pretrain", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("masked LM", "one document per line", "mlm.probability",
                 "strop train model.path=runs/<name>/model"):
        assert text in out, text
    assert main(["pretrain", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "mlm.probability" in out and "80% become [MASK]" in out
    assert "masked_lm (masked-LM pretraining" in out


def test_a_table_gives_its_text_column_and_its_label_is_ignored(tiny_model, tmp_path):
    rows = [{"condition_label": i % 5 + 1, "medical_abstract": doc}
            for i, doc in enumerate(toy_documents(40, 6))]
    train = write_csv(tmp_path / "abstracts.csv", rows)
    steps = {"train.max_steps": 2, "train.eval_every": 2}
    run = strop.train(None, overrides(tiny_model, tmp_path, train, **steps))
    data = json.loads((run.run_dir / "data.json").read_text())
    # the only column of text is the documents' (the label column holds numbers); 40 less 4 + 4 carved
    assert data["columns"]["text"] == "medical_abstract" and data["columns"]["label"] is None
    assert data["splits"]["train"]["documents"] == 32


def _empty(tmp_path: Path, tiny_model: Path) -> list[str]:
    return overrides(tiny_model, tmp_path, write_lines(tmp_path / "empty.txt", []))


def _blank(tmp_path: Path, tiny_model: Path) -> list[str]:
    return overrides(tiny_model, tmp_path, write_lines(tmp_path / "blank.txt", ["", "   ", "\t"]))


def _numbers(tmp_path: Path, tiny_model: Path) -> list[str]:
    table = write_csv(tmp_path / "numbers.csv", [{"text": str(i * 1.5), "label": "a"} for i in range(20)])
    return overrides(tiny_model, tmp_path, table)


def _probability(value: str, **extra):
    def build(tmp_path: Path, tiny_model: Path) -> list[str]:
        docs = write_lines(tmp_path / "docs.txt", toy_documents(20, 1))
        return overrides(tiny_model, tmp_path, docs, **{"mlm.probability": value, **extra})
    return build


def _no_mask_token(tmp_path: Path, tiny_model: Path) -> list[str]:
    import shutil

    folder = tmp_path / "no-mask"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["mask_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return overrides(folder, tmp_path, write_lines(tmp_path / "docs.txt", toy_documents(20, 1)))


BAD = {
    "empty file": (_empty, ["empty.txt holds no text for the train split", "one document per line",
                            "add text"]),
    "blank lines only": (_blank, ["blank.txt holds no text", "its lines are blank"]),
    "text column of numbers": (_numbers, ["numbers.csv: column 'text' holds numbers only (e.g. '0.0' at",
                                          "numbers.csv:2), not text",
                                          "point data.text_column to the column"]),
    "probability 0": (_probability("0"), ["mlm.probability=0.0 must be in (0, 1)", "0.15"]),
    "probability 1.5": (_probability("1.5"), ["mlm.probability=1.5 must be in (0, 1)"]),
    "an adapter method": (_probability("0.15", **{"peft.method": "lora"}),
                          ["peft.method='lora': masked-LM pretraining trains the whole encoder",
                           "set peft.method=none"]),
    "tokenizer without a mask token": (_no_mask_token, ["has no mask token", "no-mask",
                                                        "use an encoder whose tokenizer has one"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pretraining_input_is_one_clear_error(case, tiny_model, tmp_path, capsys):
    build, expected = BAD[case]
    args = [a for a in build(tmp_path, tiny_model) if a != "task=masked_lm"]
    assert main(["pretrain", *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error:") and "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "runs").exists()  # refused before the run folder exists


def test_pretrain_refuses_another_task(tmp_path, capsys):
    assert main(["pretrain", "task=single_label", f"data.train={tmp_path / 'x.txt'}"]) == 2
    assert "strop pretrain trains task=masked_lm, not task=single_label" in capsys.readouterr().err
