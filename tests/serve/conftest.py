"""Fixtures for the serving tests: tiny trained runs (single-label, pairs, multi-label, regression, NER,
generation, images) and an export."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import (  # tests/conftest.py (this one is serve.conftest)
    tiny_overrides,
    toy_generation_rows,
    toy_rows,
    write_csv,
    write_image_folder,
    write_jsonl,
)


def _train(tiny_model: Path, out: Path, train_file: Path, **extra) -> Path:
    import strop

    args = tiny_overrides(tiny_model, out, **{"data.train": str(train_file), "train.epochs": 1, "track": "none",
                                              "train.save_every": -1, **extra})
    return strop.train(None, args).run_dir


@pytest.fixture(scope="session")
def single_run(tiny_model, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("single")
    return _train(tiny_model, tmp / "runs", write_csv(tmp / "train.csv", toy_rows(60, 1)), name="single")


@pytest.fixture(scope="session")
def pair_run(tiny_model, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pairs")
    return _train(tiny_model, tmp / "runs", write_csv(tmp / "train.csv", toy_rows(60, 2, pairs=True)), name="pairs")


@pytest.fixture(scope="session")
def multi_run(tiny_model, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("multi")
    rng = random.Random(3)
    rows = [{"text": r["text"], "label": sorted({r["label"], rng.choice(["billing", "account", "shipping"])})}
            for r in toy_rows(60, 3)]
    return _train(tiny_model, tmp / "runs", write_jsonl(tmp / "train.jsonl", rows), name="multi")


@pytest.fixture(scope="session")
def regression_run(tiny_model, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("regression")
    rows = [{"text": r["text"], "score": round(len(r["text"]) / 10, 2)} for r in toy_rows(60, 4)]
    return _train(tiny_model, tmp / "runs", write_csv(tmp / "train.csv", rows), name="regression")


@pytest.fixture(scope="session")
def single_export(single_run) -> Path:
    from .serve_helpers import export_onnx

    return export_onnx(single_run)


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory) -> Path:
    """A run-like model folder whose forward pass takes tens of milliseconds on CPU (for backpressure/shutdown
    tests): an 8-layer, 256-wide random BERT with the default tokenizer, saved as a strop model folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from strop import __version__
    from strop.models.backbone import default_model_path
    from strop.models.classifier import save_model

    folder = tmp_path_factory.mktemp("slow") / "model"
    tok = AutoTokenizer.from_pretrained(str(default_model_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=512, num_labels=2)
    meta = {"strop_version": __version__, "task": "single_label", "labels": ["neg", "pos"], "pooling": "cls",
            "max_length": 256, "text_column": "text", "text_pair_column": None, "label_column": "label",
            "label_delimiter": None, "threshold": 0.5, "base_model": "random"}
    save_model(BertForSequenceClassification(config).eval(), tok, folder, meta)
    (folder / "strop.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def ner_run(tiny_model, tmp_path_factory) -> Path:
    """A tiny NER run (toy CoNLL data of tests/ner/toy_ner.py) with the casing feature, max_length 16 so longer
    sentences are read in windows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_ner", Path(__file__).resolve().parents[1] / "ner" / "toy_ner.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    tmp = tmp_path_factory.mktemp("ner")
    train = toy.write_conll(tmp / "train.txt", toy.toy_sentences(96, 1))
    return _train(tiny_model, tmp / "runs", train, name="ner", **{"train.epochs": 3, "model.max_length": 16,
                                                                  "ner.stride": 4, "ner.casing": "true"})


@pytest.fixture(scope="session")
def generation_run(tiny_decoder, tmp_path_factory) -> Path:
    """A tiny generation run (the 64-wide random Llama of tests/conftest.py, fully fine-tuned on the toy
    name/food -> sentence pairs: it learns them, so greedy answers end with EOS well before max_new_tokens)."""
    import strop

    tmp = tmp_path_factory.mktemp("generation")
    train = write_jsonl(tmp / "train.jsonl", toy_generation_rows(200, 1))
    args = {"data.train": str(train), "model.path": str(tiny_decoder), "output_dir": str(tmp / "runs"),
            "name": "gen", "train.epochs": 6, "train.batch_size": 8, "train.lr": 5e-3, "train.warmup": 0,
            "train.precision": "fp32", "train.threads": 2, "peft.method": "none", "generate.max_new_tokens": 24,
            "track": "none", "train.save_every": -1, "eval.report": False, "data.test_ratio": 0,
            "generate.eval_examples": 2}
    return strop.train(None, args).run_dir


@pytest.fixture(scope="session")
def image_run(tiny_vision_model, tmp_path_factory) -> Path:
    """A tiny image-classification run: the 5k-parameter random EfficientNet-Lite of tests/conftest.py, 2 epochs
    on 30 toy images (tests/conftest.toy_images) at 32 px. Serving needs a run, not a good model."""
    tmp = tmp_path_factory.mktemp("images")
    train = write_image_folder(tmp / "train", 30, 1)
    return _train(tiny_vision_model, tmp / "runs", train, name="images", **{
        "image.size": 32, "train.epochs": 2, "train.threads": 1, "eval.report": False, "data.test_ratio": 0})
