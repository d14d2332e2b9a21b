"""CoNLL / JSONL readers, every malformed-input error (file and line), scheme handling, repair vs refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from toy_ner import toy_sentences, write_conll, write_token_jsonl

from strop.config import load_config
from strop.data.conll import read_conll, read_token_jsonl
from strop.data.ner import prepare_tokens
from strop.tasks import prepare
from strop.data.tags import from_iob2
from strop.errors import ConfigError, DataError

CONLL2003 = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "conll2003"


def cfg_for(train, **over):
    return load_config(None, {"data.train": str(train), **over})


def test_conll_reader_docstart_blank_and_whitespace_lines(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n \t \nPeter NNP B-NP B-PER\n"
                    "Blackburn NNP I-NP I-PER\n\n\n-DOCSTART- -X- -X- O\nBonn\tNNP\tB-NP\tB-LOC\n", encoding="utf-8")
    sents = read_conll(path)
    assert [s.tokens for s in sents] == [["EU", "rejects"], ["Peter", "Blackburn"], ["Bonn"]]
    assert [s.tags for s in sents] == [["B-ORG", "O"], ["B-PER", "I-PER"], ["B-LOC"]]
    assert sents[1].lines == [6, 7] and sents[2].where() == f"{path}:11"
    assert [s.tags for s in read_conll(path, tag_column=1)][0] == ["NNP", "VBZ"]  # configurable column
    assert read_conll(path, tag_column=None)[0].tags is None


def test_conll_malformed_inputs_name_file_and_line(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("EU B-ORG\nrejects O\nGerman\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.conll:3: 'German' has 1 column\(s\).*ner.tag_column"):
        read_conll(path)
    path.write_bytes(b"EU B-ORG\n\xff\xfe O\n")
    with pytest.raises(DataError, match=r"bad.conll:2: byte 0xff is not valid utf-8"):
        read_conll(path)
    path.write_text("-DOCSTART- -X- O\n\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no sentences"):
        read_conll(path)
    with pytest.raises(DataError, match="not found"):
        read_conll(tmp_path / "missing.conll")


def test_malformed_tags_and_invalid_sequences(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text("EU X-ORG\nrejects O\n\nPeter B-PER\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.conll:1: tag 'X-ORG' is not O or <prefix>-<TYPE>"):
        prepare_tokens(cfg_for(path))
    path.write_text("EU B-ORG\nrejects O\n\nthe O\nPeter I-PER\nSmith I-PER\n\nBonn B-LOC\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.conll:5: invalid IOB2 sequence: I-PER follows O.*ner.invalid=repair"):
        prepare_tokens(cfg_for(path, **{"ner.invalid": "refuse"}))
    ds = prepare_tokens(cfg_for(path, **{"data.validation_ratio": 0, "data.test_ratio": 0}))  # repair is the default
    tags = [[ds.labels[t] for t in seq] for seq in ds.splits["train"].tags]
    assert tags[1] == ["O", "B-PER", "I-PER"]
    assert any("repaired 1 invalid tag(s)" in n and "train.conll:5" in n for n in ds.notes)
    path.write_text("EU S-ORG\n\nPeter I-PER\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.conll:3: tag 'I-PER' has prefix I-, which .* does not use|"
                                        r"train.conll:3: invalid BIOES"):
        prepare_tokens(cfg_for(path, **{"ner.invalid": "refuse", "ner.scheme": "bioes"}))


def test_jsonl_reader_and_its_errors(tmp_path):
    path = write_token_jsonl(tmp_path / "t.jsonl", [(["EU", "rejects"], ["B-ORG", "O"])])
    assert read_token_jsonl(path)[0].tags == ["B-ORG", "O"]
    cases = {
        '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n':
            r"t.jsonl:2: 2 tokens but 1 tags",
        '{"tokens": ["a"], "tags": [0]}\n': r"t.jsonl:1: 'tags' must be a list of tag strings.*integer ids",
        '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a"]\n': r"t.jsonl:2: not valid JSON",
        '{"text": "a b", "tags": ["O", "O"]}\n': r"t.jsonl:1: no token list",
        '{"tokens": ["a", ""], "tags": ["O", "O"]}\n': r"t.jsonl:1: 'tokens' must be a non-empty list",
        '{"tokens": ["a"]}\n': r"t.jsonl:1: no tag list",
        '[1, 2]\n': r"t.jsonl:1: expected a JSON object",
    }
    for text, message in cases.items():
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=message):
            read_token_jsonl(path)


def test_task_auto_is_inferred_and_schemes_load_the_same(tmp_path):
    sents = toy_sentences(40, 0)
    conll = write_conll(tmp_path / "train.txt", sents)
    jsonl = write_token_jsonl(tmp_path / "train.jsonl", sents)
    bioes = write_conll(tmp_path / "bioes.conll", [(t, from_iob2(g, "bioes")) for t, g in sents], docstart=False)
    iob1 = write_conll(tmp_path / "iob1.conll", [(t, from_iob2(g, "iob1")) for t, g in sents], docstart=False)
    loaded = {}
    for path in (conll, jsonl, bioes, iob1):
        ds = prepare(cfg_for(path, **{"data.validation_ratio": 0.1, "data.test_ratio": 0.1}))
        assert ds.task == "token_classification"
        loaded[path.name] = (ds.labels, [t.tolist() for t in ds.splits["train"].tags], ds.scheme)
    assert loaded["bioes.conll"][2] == "bioes" and loaded["iob1.conll"][2] == "iob1"
    assert loaded["train.txt"][2] == "iob2"
    assert len({json.dumps(v[:2]) for v in loaded.values()}) == 1  # every scheme gives the same IOB2 data
    ds = prepare(cfg_for(conll))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 32, "validation": 4, "test": 4}


def test_unknown_type_in_dev_and_config_checks(tmp_path):
    train = write_conll(tmp_path / "train.conll", [(["Bonn"], ["B-LOC"])])
    dev = write_conll(tmp_path / "dev.conll", [(["x"], ["O"]), (["Peter"], ["B-PER"])])
    with pytest.raises(DataError, match=r"dev.conll:5: entity type of 'B-PER' in the validation split never occurs"):
        prepare_tokens(cfg_for(train, **{"data.validation": str(dev), "data.test_ratio": 0}))
    only_o = write_conll(tmp_path / "o.conll", [(["x"], ["O"])])
    with pytest.raises(DataError, match="every tag is O"):
        prepare_tokens(cfg_for(only_o))
    with pytest.raises(ConfigError, match=r"ner.stride=-1 must be >= 0"):
        load_config(None, {"ner.stride": -1})
    with pytest.raises(ConfigError, match="ner.scheme='bilou' is not one of"):
        load_config(None, {"ner.scheme": "bilou"})


@pytest.mark.skipif(not CONLL2003.is_dir(), reason="needs ../shared/datasets/conll2003")
def test_conll2003_files_load_without_edits():
    ds = prepare(load_config(Path(__file__).resolve().parents[2] / "configs" / "conll2003.yaml"))
    assert ds.task == "token_classification" and ds.scheme == "iob2"
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 14041, "validation": 3250, "test": 3453}
    assert sum(len(t) for t in ds.splits["train"].tokens) == 203621  # README: tokens without -DOCSTART-
    assert ds.labels == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
