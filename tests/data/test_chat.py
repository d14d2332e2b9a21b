"""Generation data: layouts -> conversations, their validation, carving by prompt, and the one renderer that marks
the answers (token-identical prompts in training and prediction)."""

from __future__ import annotations

import pytest
from conftest import toy_generation_rows, write_csv, write_jsonl

from strop.config import load_config
from strop.data.chat import prepare_chat, prompt_key
from strop.data.chat_tokens import PLAIN_TEMPLATE, conversation_ids, encode_chat, ensure_template, prompt_ids
from strop.errors import DataError
from strop.models.backbone import load_tokenizer
from strop.tasks import detect_task

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name[cotto], food[french]"},
        {"role": "assistant", "content": "cotto serves french food."},
        {"role": "user", "content": "and name[zizzi], food[indian]?"},
        {"role": "assistant", "content": "zizzi serves indian food."}]


def _cfg(train, **extra):
    return load_config(None, {"data.train": str(train), "data.test_ratio": 0, **extra})


@pytest.mark.parametrize("rows, expect", [
    ([{"prompt": "p1", "completion": "c1"}], [{"role": "user", "content": "p1"}, {"role": "assistant", "content": "c1"}]),
    ([{"instruction": "translate", "input": "hallo", "output": "hello"}],
     [{"role": "user", "content": "translate\n\nhallo"}, {"role": "assistant", "content": "hello"}]),
    ([{"messages": CHAT[:3]}], CHAT[:3]),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}],
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
])
def test_each_layout_becomes_turns_and_auto_finds_the_task(tmp_path, rows, expect):
    path = write_jsonl(tmp_path / "train.jsonl", rows * 12)
    cfg = _cfg(path, **{"data.validation_ratio": 0})
    assert detect_task(cfg).name == "generation"
    ds = prepare_chat(cfg)
    assert ds.splits["train"].conversations[0] == expect and len(ds.splits["train"]) == 12


@pytest.mark.parametrize("rows, fragment", [
    ([{"question_text": "q", "answer_text": "a"}], "no generation columns found (columns: ['question_text', "),
    ([{"prompt": "p", "completion": "  "}], "train.jsonl:1: assistant turn 2 (the completion) is empty"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}],
     "train.jsonl:1: turn 2 has role 'robot'; use one of ['system', 'user', 'assistant']"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "train.jsonl:1: the conversation has no assistant turn"),
    ([{"prompt": "p"}], "a prompt column ('prompt') but no completion column"),
    ([{"prompt": "", "completion": "c"}], "train.jsonl:1: the prompt ('prompt') is empty"),
])
def test_malformed_generation_rows_say_where_and_what_to_do(tmp_path, rows, fragment):
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as info:
        prepare_chat(_cfg(path, task="generation"))
    assert fragment in str(info.value)


def test_test_file_references_and_csv_columns(tmp_path):
    train = write_csv(tmp_path / "train.csv", toy_generation_rows(20, 1))
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "name[loch], food[french]",
                                                  "references": ["loch serves french food.", "loch: french food."]}])
    ds = prepare_chat(_cfg(train, **{"data.test": str(test), "data.validation_ratio": 0}))
    t = ds.splits["test"]
    assert t.references == [["loch serves french food.", "loch: french food."]]
    assert t.prompts() == [[{"role": "user", "content": "name[loch], food[french]"}]]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "references": []}])
    with pytest.raises(DataError, match="bad.jsonl:1: 'references' must be a non-empty list"):
        prepare_chat(_cfg(train, **{"data.test": str(bad)}))


def test_validation_is_carved_by_prompt_so_no_prompt_is_in_both(tmp_path):
    rows = toy_generation_rows(300, 4)  # 60 distinct prompts, ~5 completions each (as E2E's ~9 per prompt)
    ds = prepare_chat(_cfg(write_jsonl(tmp_path / "t.jsonl", rows), **{"data.validation_ratio": 0.2}))
    train = {prompt_key(c) for c in ds.splits["train"].conversations}
    val = {prompt_key(c) for c in ds.splits["validation"].conversations}
    assert not train & val and len(ds.splits["train"]) + len(ds.splits["validation"]) == 300
    assert 0.15 <= len(ds.splits["validation"]) / 300 <= 0.25  # whole prompt groups: near, not exactly, 20%


def test_prompt_tokens_at_prediction_equal_those_before_the_answer_in_training(tiny_decoder):
    tok = load_tokenizer(tiny_decoder)
    ids, mask = conversation_ids(tok, CHAT)
    asked, _ = prompt_ids(tok, CHAT[:-1], 10_000)
    assert ids[:len(asked)] == asked
    # the supervised tokens are exactly each answer plus its end-of-sequence token; the template's newline after
    # it and every prompt token are context only
    supervised = tok.decode([t for t, m in zip(ids, mask) if m])
    assert supervised == "cotto serves french food.<|im_end|>zizzi serves indian food.<|im_end|>"
    last = len(tok("zizzi serves indian food.", add_special_tokens=False)["input_ids"]) + 1
    assert mask[len(asked):] == [True] * last + [False] * (len(ids) - len(asked) - last)
    everything, _ = conversation_ids(tok, CHAT, train_on_prompt=True)
    assert everything == ids and all(conversation_ids(tok, CHAT, train_on_prompt=True)[1])


def test_long_prompts_are_cut_from_the_left_and_counted_answers_never(tmp_path, tiny_decoder):
    tok = load_tokenizer(tiny_decoder)
    long = "name[cotto], food[french] " * 30
    rows = [{"prompt": long, "completion": "cotto serves french food."}, {"prompt": "p", "completion": "c"}]
    ds = prepare_chat(_cfg(write_jsonl(tmp_path / "t.jsonl", rows), **{"data.validation_ratio": 0}))
    enc = encode_chat(tok, ds.splits["train"], max_length=40)
    assert enc.n_truncated == 1 and enc.lengths[0] == 40 and len(enc.prompts[0]) == 40
    # the whole answer survived the cut: its tokens + EOS are the last supervised positions
    answer = len(tok("cotto serves french food.", add_special_tokens=False)["input_ids"]) + 1
    assert enc.labels[0].sum() == answer
    with pytest.raises(DataError, match=r"t.jsonl:1: the answer alone takes \d+ tokens .*answers are never cut"):
        encode_chat(tok, ds.splits["train"], max_length=8)


def test_a_model_without_a_chat_template_gets_the_plain_format(tiny_decoder):
    tok = load_tokenizer(tiny_decoder)
    tok.chat_template = None
    assert "no chat template" in ensure_template(tok) and tok.chat_template == PLAIN_TEMPLATE
    ids, mask = conversation_ids(tok, CHAT[1:3])
    assert tok.decode(ids) == "user: name[cotto], food[french]\nassistant: cotto serves french food.<|im_end|>\n"
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == " cotto serves french food.<|im_end|>"


def test_the_marked_example_shows_exactly_the_supervised_answer(tiny_decoder, tmp_path):
    from strop.data.chat_tokens import marked_example

    tok = load_tokenizer(tiny_decoder)
    ds = prepare_chat(_cfg(write_jsonl(tmp_path / "t.jsonl", toy_generation_rows(3, 1)),
                           **{"data.validation_ratio": 0}))
    enc = encode_chat(tok, ds.splits["train"], 64)
    runs = marked_example(tok, enc, 0)
    row = toy_generation_rows(3, 1)[0]
    assert runs == [(f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n", False),
                    (f"{row['completion']}<|im_end|>", True), ("\n", False)]


def test_classification_tables_are_not_taken_for_generation_data(tmp_path):
    rows = [{"question": "where is my parcel", "target": "shipping"}] * 12
    cfg = load_config(None, {"data.train": str(write_csv(tmp_path / "qa.csv", rows))})
    assert detect_task(cfg).name == "single_label"  # "target" is a label column, not a completion
