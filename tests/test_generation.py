"""The generation task end to end with a tiny decoder: training on answers only (token-weighted, also across
accumulation), LoRA as the decoder default, scoring generations, predict / eval / chat from the CLI, bad input."""

from __future__ import annotations

import io
import math
import json

import numpy as np
import pytest
import torch
from conftest import toy_generation_rows, write_jsonl

import strop
from strop.cli import main
from strop.config import load_config
from strop.models.backbone import load_tokenizer
from strop.tasks import build_model, get_task, prepare
from strop.training.loop import accumulate_gradients

TASK = get_task("generation")


def _overrides(model, folder, **extra) -> dict:
    # a random 64-wide decoder learns the toy mapping in ~140 steps at lr 5e-3 (measured: test BLEU ~90)
    return {"data.train": str(folder / "train.jsonl"), "data.test": str(folder / "test.jsonl"),
            "model.path": str(model), "output_dir": str(folder / "runs"), "name": "run", "train.epochs": 6,
            "train.batch_size": 8, "train.lr": 5e-3, "train.warmup": 0, "train.precision": "fp32",
            "train.threads": 2, "peft.method": "none", "generate.max_new_tokens": 16, "track": "none", **extra}


@pytest.fixture(scope="module")
def trained(tiny_decoder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    write_jsonl(folder / "train.jsonl", toy_generation_rows(200, 1))
    write_jsonl(folder / "test.jsonl", [{"prompt": r["prompt"], "references": [r["completion"], "something else"]}
                                        for r in toy_generation_rows(20, 3)])
    return strop.train(None, _overrides(tiny_decoder, folder)), folder


def test_training_learns_the_answers_and_scores_generations(trained):
    run, _ = trained
    test = run.results["test"]
    # from the runs measured when this test was written: validation perplexity falls from ~12 after one epoch to
    # ~1.3; the greedy answers match the toy mapping (BLEU 88-90, 18-20 of 20 answers end with EOS in 16 tokens)
    assert test["perplexity"] < 1.6 and test["bleu"] > 60 and test["stopped"] >= 80.0
    assert test["references_per_output"] == 2.0 and test["n"] == 20
    history = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["perplexity"] for r in history if r.get("split") == "validation"]
    assert val[-1] < val[0] / 4 and run.results["best_step"] == run.results["steps"]  # lower perplexity wins
    page = (run.run_dir / "report.html").read_text()
    # the report shows answers beside their references and the base model's answer to the same prompt
    assert "Sample answers (test)" in page and "<th>base model</th>" in page and "cotto serves" not in page[:100]


def test_generator_answers_deterministically_and_streams_the_same_text(trained):
    run, _ = trained
    gen = strop.load(run.run_dir)
    first = gen.predict(["name[cotto], food[french]", "name[zizzi], food[indian]"])
    assert first == gen.predict(["name[cotto], food[french]", "name[zizzi], food[indian]"], batch_size=1)
    assert first[0]["text"] == "cotto serves french food." and first[0]["finish_reason"] == "stop"
    assert "".join(gen.stream("name[cotto], food[french]")) == first[0]["text"]
    cut = gen.predict("name[cotto], food[french]", stop=["french"])[0]
    assert cut["text"] == "cotto serves " and cut["finish_reason"] == "stop"
    short = gen.predict("name[cotto], food[french]", max_new_tokens=2)[0]
    assert short["finish_reason"] == "length" and short["tokens"] == 2


def test_gradient_accumulation_equals_one_batch_with_uneven_answer_lengths(tiny_decoder, tmp_path):
    """The loss is a mean over supervised tokens of the whole batch: micro-batches whose answers differ in length
    must not be averaged as equals (the accumulation bug TRL users hit)."""
    rows = [{"prompt": f"p{i}", "completion": "word " * (1 + 6 * (i % 2))} for i in range(8)]
    cfg = load_config(None, {"data.train": str(write_jsonl(tmp_path / "t.jsonl", rows)), "model.path": str(tiny_decoder),
                             "data.validation_ratio": 0, "data.test_ratio": 0, "peft.method": "none"})
    ds = prepare(cfg)
    enc = TASK.encode(load_tokenizer(tiny_decoder), ds.splits["train"], {"max_length": 64})
    idx = np.arange(8)
    grads = []
    for micro in (8, 2, 3):
        torch.manual_seed(0)
        model = build_model(TASK, cfg, [])
        accumulate_gradients(model, enc, idx, micro, TASK, torch.device("cpu"), "fp32")
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)
    # micro-batches of 3 hold different numbers of answer tokens (short, long, short vs long, short, long)
    assert TASK.batch_weight(enc, idx[:3]) < TASK.batch_weight(enc, idx[3:6])


def test_lora_is_the_decoder_default_and_leaves_the_output_embedding_alone(tiny_decoder, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", toy_generation_rows(40, 1))
    write_jsonl(tmp_path / "test.jsonl", toy_generation_rows(8, 3))
    over = _overrides(tiny_decoder, tmp_path, **{"train.max_steps": 3, "peft.method": "auto", "eval.report": False})
    over.pop("train.lr")
    run = strop.train(None, over)
    saved = load_config(run.run_dir / "config.yaml")
    assert saved.peft.method == "lora" and saved.train.lr == 5e-4  # config.METHOD_LR["lora"]
    meta = json.loads((run.run_dir / "model" / "strop.json").read_text())
    targets = meta["peft"]["targets"]
    # every linear layer of the 2 blocks (q, k, v, o, gate, up, down), never lm_head
    assert len(targets) == 14 and not any("lm_head" in t for t in targets)
    assert meta["peft"]["merge_max_abs_diff"] < 1e-4


def test_predict_eval_and_chat_from_the_command_line(trained, tmp_path, monkeypatch, capsys):
    run, folder = trained
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"name[cotto], food[french]\n")))
    assert main(["predict", str(run.run_dir), "--max-new-tokens", "16"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["text"] == "cotto serves french food." and line["finish_reason"] == "stop"
    out = tmp_path / "answers.csv"
    assert main(["predict", str(run.run_dir), "--data", str(folder / "test.jsonl"), "--out", str(out)]) == 0
    assert out.read_text().splitlines()[0] == "prompt,references,generation,finish_reason,tokens"
    assert main(["eval", str(run.run_dir), "--data", str(folder / "test.jsonl")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["bleu"] == pytest.approx(run.results["test"]["bleu"])  # same weights, same greedy answers
    monkeypatch.setattr("sys.stdin", io.StringIO("name[cotto], food[french]\n/reset\n/exit\n"))
    assert main(["chat", str(run.run_dir)]) == 0
    assert capsys.readouterr().out == "cotto serves french food.\n"


def test_bad_generation_input_exits_2_and_writes_nothing(tiny_decoder, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "answer_text": "a"}])
    args = ["train", "task=generation", f"data.train={train}", f"model.path={tiny_decoder}",
            f"output_dir={tmp_path / 'runs'}", "name=bad"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no completion column (columns: ['prompt', 'answer_text'])" in err and "data.label_column" in err
    assert not (tmp_path / "runs" / "bad").exists()
    good = write_jsonl(tmp_path / "good.jsonl", toy_generation_rows(10, 1))
    assert main(["train", f"data.train={good}", "model.path=/nowhere/model.gguf", f"output_dir={tmp_path / 'runs'}",
                 "name=gguf"]) == 2
    err = capsys.readouterr().err
    assert "/nowhere/model.gguf" in err and "not found" in err and not (tmp_path / "runs" / "gguf").exists()


@pytest.mark.parametrize("method", ["adalora", "freeze"])
def test_other_methods_train_a_decoder_and_save_a_plain_model(method, tiny_decoder, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", toy_generation_rows(40, 1))
    write_jsonl(tmp_path / "test.jsonl", toy_generation_rows(8, 3))
    over = _overrides(tiny_decoder, tmp_path, **{"train.max_steps": 4, "peft.method": method, "eval.report": False,
                                                 "peft.unfrozen_layers": 1, "peft.tinit": 0, "peft.tfinal": 0})
    if method == "freeze":
        over = {k: v for k, v in over.items() if not k.startswith("peft.t")}
    else:
        over.pop("peft.unfrozen_layers")
    run = strop.train(None, over)
    meta = json.loads((run.run_dir / "model" / "strop.json").read_text())
    assert meta["peft"]["method"] == method and run.results["steps"] == 4
    # freeze: the top block of 2 trains (its 7 linear layers, 2 norms); AdaLoRA: ranks on every body linear layer
    if method == "freeze":  # q, o (64x64), k, v (64x32: 2 kv heads), gate, up, down (64x128), 2 RMSNorms of 64
        assert meta["peft"]["trainable_params"] == 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3 + 64 * 2
    else:
        assert len(meta["peft"]["targets"]) == 14 and not any("lm_head" in t for t in meta["peft"]["targets"])
    answer = strop.load(run.run_dir).predict(["name[cotto], food[french]"], max_new_tokens=4)[0]
    assert answer["tokens"] <= 4 and answer["finish_reason"] in ("stop", "length")


def test_packed_rows_give_the_same_loss_as_one_example_per_row(tiny_decoder, tmp_path):
    """Packing puts several examples in one row; with positions restarting and attention kept inside each example,
    every supervised token's loss is the unpacked one (fp32, so equal to rounding)."""
    from strop.data.chat_tokens import pack

    cfg = load_config(None, {"data.train": str(write_jsonl(tmp_path / "t.jsonl", toy_generation_rows(12, 2))),
                             "model.path": str(tiny_decoder), "data.validation_ratio": 0, "data.test_ratio": 0})
    enc = TASK.encode(load_tokenizer(tiny_decoder), prepare(cfg).splits["train"], {"max_length": 96})
    packed = pack(enc, 96)
    assert len(packed) < len(enc) and sorted(n for row in packed.segments for n in row) == sorted(enc.lengths)
    torch.manual_seed(0)
    model = build_model(TASK, cfg, []).eval()

    def summed(e):
        total = 0.0
        with torch.no_grad():
            for i in range(len(e)):
                batch = TASK.collate(e, np.array([i]))
                total += float(TASK.loss(TASK.forward(model, batch), batch)) * TASK.batch_weight(e, np.array([i]))
        return total

    # the first token of each packed example is unscored (it would be predicted from the previous example); it is a
    # prompt token, so the supervised counts agree
    assert TASK.batch_weight(packed, np.arange(len(packed))) == TASK.batch_weight(enc, np.arange(len(enc)))
    assert summed(packed) == pytest.approx(summed(enc), rel=1e-5)
    batch = TASK.collate(packed, np.arange(len(packed)))  # several rows at once: padding sees itself, no NaN
    assert torch.isfinite(TASK.loss(TASK.forward(model, batch), batch))


def test_a_packed_run_trains_on_rows_of_several_examples(tiny_decoder, tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", toy_generation_rows(40, 1))
    write_jsonl(tmp_path / "test.jsonl", toy_generation_rows(8, 3))
    over = _overrides(tiny_decoder, tmp_path, **{"generate.packing": True, "model.max_length": 128,
                                                 "train.epochs": 2, "eval.report": False,
                                                 "data.validation_ratio": 0})
    run = strop.train(None, over)
    # 40 examples of 34-37 tokens (prompt, answer, template) fit 3 to a 128-token row: 14 rows, 2 batches a pass
    printed = capsys.readouterr().err
    assert "generate.packing: 40 training examples in" in printed, printed[-3000:]
    assert "in 14 rows" in printed and run.results["steps"] == 4 and math.isfinite(run.results["test"]["loss"])


def test_model_folder_loads_with_plain_transformers_and_answers_alike(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = trained
    model = AutoModelForCausalLM.from_pretrained(str(run.model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(run.model_dir))
    ids = tok.apply_chat_template([{"role": "user", "content": "name[zizzi], food[indian]"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    plain = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert plain == strop.load(run.run_dir).predict("name[zizzi], food[indian]")[0]["text"] == \
        "zizzi serves indian food."
