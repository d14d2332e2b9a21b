"""The first-token-only last layer (strop.models.cls_only): same logits and gradients as the full layer, only where
the head reads position 0, and the model unchanged outside the block."""

from __future__ import annotations

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, BertForTokenClassification, ElectraConfig,
                          ElectraForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

from strop.models.cls_only import applies_to, first_token_only

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def _model(cls, config_cls, dropout=0.0, **extra):
    torch.manual_seed(0)
    config = config_cls(**SMALL, num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        **extra)
    return cls(config)


def _batch(pad_id=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate((11, 7, 3, 9)):  # padded rows: the first token must not see the padding
        ids[row, n:], mask[row, n:] = pad_id, 0
    return ids, mask


@pytest.mark.parametrize("cls,config_cls,attn", [
    (BertForSequenceClassification, BertConfig, "sdpa"), (BertForSequenceClassification, BertConfig, "eager"),
    (RobertaForSequenceClassification, RobertaConfig, "sdpa"),
    (ElectraForSequenceClassification, ElectraConfig, "sdpa")], ids=["bert", "bert-eager", "roberta", "electra"])
def test_same_logits_and_gradients_as_the_full_layer(cls, config_cls, attn):
    extra = {"pad_token_id": 1} if config_cls is RobertaConfig else {}
    model = _model(cls, config_cls, attn_implementation=attn, **extra)
    model.train()  # dropout 0: training mode with deterministic math, gradients compared too
    ids, mask = _batch(pad_id=extra.get("pad_token_id", 0))
    labels = torch.tensor([0, 1, 2, 1])
    full = model(input_ids=ids, attention_mask=mask, labels=labels)
    full.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert applies_to(model)
    with first_token_only(model):
        fast = model(input_ids=ids, attention_mask=mask, labels=labels)
        fast.loss.backward()
    torch.testing.assert_close(fast.logits, full.logits, rtol=1e-5, atol=1e-6)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_only_inside_the_block_and_only_for_first_token_heads():
    model = _model(BertForSequenceClassification, BertConfig)
    layer = model.bert.encoder.layer[-1]
    with first_token_only(model):
        assert "forward" in vars(layer)
        out = model.bert(input_ids=_batch()[0]).last_hidden_state
        assert out.shape[1] == 1  # the last layer gave the first position only
    assert "forward" not in vars(layer)
    assert model.bert(input_ids=_batch()[0]).last_hidden_state.shape[1] == 11
    assert model.state_dict().keys() == _model(BertForSequenceClassification, BertConfig).state_dict().keys()
    # token classification reads every position: left alone
    tokens = _model(BertForTokenClassification, BertConfig)
    assert not applies_to(tokens)
    with first_token_only(tokens):
        assert "forward" not in vars(tokens.bert.encoder.layer[-1])


def test_lora_model_gets_it_through_the_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(BertForSequenceClassification, BertConfig),
                           LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    ids, mask = _batch()
    model.eval()
    full = model(input_ids=ids, attention_mask=mask).logits
    assert applies_to(model)
    with first_token_only(model):
        fast = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


def test_training_with_it_matches_training_without_it(tiny_model, toy_splits, tmp_path, monkeypatch):
    """A whole strop run (dropout 0) with and without the first-token path: the same losses and final weights."""
    from conftest import tiny_overrides
    from safetensors.torch import load_file

    import strop
    from strop.models import cls_only
    from strop.training import loop as loop_mod

    extra = {"data.train": toy_splits["train"], "data.validation": toy_splits["validation"], "train.max_steps": 6,
             "model.dropout": 0, "model.hidden_dropout": 0, "model.attention_dropout": 0, "train.threads": 1}
    fast = strop.train(None, tiny_overrides(tiny_model, tmp_path / "fast", **extra))
    calls = []
    real = cls_only.first_token_only

    def off(model, enabled=True):
        calls.append(applies_to(model))
        return real(model, enabled=False)

    def no_layer(model):
        calls.append(applies_to(model))
        return None

    monkeypatch.setattr(loop_mod, "first_token_only", off)
    monkeypatch.setattr("strop.evaluate.evaluator.first_token_layer", no_layer)
    full = strop.train(None, tiny_overrides(tiny_model, tmp_path / "full", **extra))
    assert calls and all(calls)  # the tiny BERT classifier is a model it applies to
    a = load_file(str(fast.model_dir / "model.safetensors"))
    b = load_file(str(full.model_dir / "model.safetensors"))
    for key in a:
        # rounding differences only; Adam turns them into up to ~2e-5 here (key biases get no true gradient at all:
        # softmax ignores a shift, so their updates are rounding noise normalised to the lr's size)
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)
    assert fast.results["validation"]["accuracy"] == full.results["validation"]["accuracy"]


def test_a_subclass_with_its_own_head_is_left_alone():
    """Remote code may subclass a transformers classifier with a head that reads every position."""

    class MeanHead(BertForSequenceClassification):
        pass

    torch.manual_seed(0)
    assert applies_to(_model(BertForSequenceClassification, BertConfig))
    assert not applies_to(MeanHead(BertConfig(**SMALL, num_labels=3)))
