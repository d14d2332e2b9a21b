"""Fused CPU kernels for BERT-layer training (strop.training.fused_layer): the documented hashed dropout mask, the
same math as the stock layer, the same mask in the forward and backward pass, and the stock layers whenever the
kernels cannot be built or do not apply."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, BertForTokenClassification, RobertaConfig,
                          RobertaForSequenceClassification)

from strop.training import fused_layer
from strop.training.fused_layer import (DropoutAddNorm, SoftmaxDropout, fusable_layers, fused_layers_in, kernels)

pytestmark = pytest.mark.skipif(kernels() is None, reason="the fused kernels cannot be built here (no C++ compiler)")

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def _model(cls=BertForSequenceClassification, config_cls=BertConfig, dropout=0.0, **extra):
    torch.manual_seed(0)
    config = config_cls(**SMALL, num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        **extra)
    return cls(config)


def _batch(pad_id=0):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate((11, 7, 3, 9)):
        ids[row, n:], mask[row, n:] = pad_id, 0
    return ids, mask


def _hash_reference(n: int, s0: int, s1: int) -> torch.Tensor:
    """The mask hash as documented (murmur3's fmix32, twice), in int64 arithmetic kept to 32 bits."""
    m32 = 0xFFFFFFFF

    def fmix(h):
        h = h ^ (h >> 16)
        h = (h * 0x85EBCA6B) & m32
        h = h ^ (h >> 13)
        h = (h * 0xC2B2AE35) & m32
        return h ^ (h >> 16)

    i = torch.arange(n, dtype=torch.int64)
    return fmix(fmix((i * 0x9E3779B1 + s0) & m32) ^ s1)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_is_the_documented_hash_with_the_right_rate(p):
    n, s0, s1 = 200_000, 123456789, 4000000000
    keep = kernels().keep_mask(n, s0, s1, p)
    assert torch.equal(keep, _hash_reference(n, s0, s1) >= round(p * 2 ** 32))
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    k = keep.float()
    # neighbours and another seed's mask are independent of this one: agreement rate p^2 + (1-p)^2
    expected = p * p + (1 - p) * (1 - p)
    assert abs((k[1:] == k[:-1]).float().mean().item() - expected) < 0.01
    other = kernels().keep_mask(n, s0 + 1, s1, p).float()
    assert abs((k == other).float().mean().item() - expected) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_add_norm_matches_autograd_with_the_same_mask(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    res = torch.randn(3, 5, 48, requires_grad=True)
    w = (1 + 0.1 * torch.randn(48)).requires_grad_()
    b = (0.1 * torch.randn(48)).requires_grad_()
    s0, s1, p, eps = 11, 22, 0.3, 1e-12
    out, low = DropoutAddNorm.apply(x, res, w, b, s0, s1, p, eps)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    got = [t.grad.clone() for t in (x, res, w, b)]
    for t in (x, res, w, b):
        t.grad = None
    keep = kernels().keep_mask(x.numel(), s0, s1, p).view(x.shape)
    ref = torch.nn.functional.layer_norm(x.float() * keep / (1 - p) + res, (48,), w, b, eps)
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (low is None) == (dtype == torch.float32)
    if low is not None:
        assert low.dtype == dtype and torch.equal(low, ref.detach().to(dtype))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, e in zip(got, (x.grad, res.grad, w.grad, b.grad)):
        torch.testing.assert_close(a.float(), e.float(), **tol)


@pytest.mark.parametrize("queries", [1, 7])
def test_softmax_dropout_matches_autograd_with_the_same_mask(queries):
    torch.manual_seed(0)
    scores = torch.randn(2, 3, queries, 7, requires_grad=True)
    mask = torch.ones(2, queries, 7, dtype=torch.bool)
    mask[1, :, 4:] = False  # padding keys of the second row
    s0, s1, p, scaling = 5, 6, 0.2, 0.25
    probs = SoftmaxDropout.apply(scores, mask, s0, s1, scaling, p)
    g = torch.randn_like(probs)
    (probs * g).sum().backward()
    got = scores.grad.clone()
    scores.grad = None
    keep = kernels().keep_mask(scores.numel(), s0, s1, p).view(scores.shape)
    masked = (scores * scaling).masked_fill(~mask[:, None], torch.finfo(torch.float32).min)
    ref = torch.softmax(masked, -1) * keep / (1 - p)
    (ref * g).sum().backward()
    torch.testing.assert_close(probs, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, scores.grad, rtol=1e-4, atol=1e-6)
    assert torch.all(probs[1, :, :, 4:] == 0)


@pytest.mark.parametrize("cls,config_cls,attn", [
    (BertForSequenceClassification, BertConfig, "sdpa"), (BertForSequenceClassification, BertConfig, "eager"),
    (RobertaForSequenceClassification, RobertaConfig, "sdpa"), (BertForTokenClassification, BertConfig, "sdpa")],
    ids=["bert", "bert-eager", "roberta", "token-classification"])
def test_same_outputs_and_gradients_as_the_stock_layers_without_dropout(cls, config_cls, attn):
    extra = {"pad_token_id": 1} if config_cls is RobertaConfig else {}
    stock = _model(cls, config_cls, attn_implementation=attn, **extra).train()
    fused = copy.deepcopy(stock)
    ids, mask = _batch(pad_id=extra.get("pad_token_id", 0))
    a = stock(input_ids=ids, attention_mask=mask).logits
    a.sum().backward()
    with fused_layers_in(fused) as n:
        assert n == 2
        b = fused(input_ids=ids, attention_mask=mask).logits
        b.sum().backward()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(stock.named_parameters(), fused.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_is_as_close_to_fp32_as_the_stock_bf16_path():
    stock = _model().train()
    fused = copy.deepcopy(stock)
    ids, mask = _batch()
    exact = stock(input_ids=ids, attention_mask=mask).logits.detach()
    with torch.autocast("cpu", torch.bfloat16):
        a = stock(input_ids=ids, attention_mask=mask).logits.float()
        with fused_layers_in(fused):
            b = fused(input_ids=ids, attention_mask=mask).logits.float()
    stock_err, fused_err = (a - exact).abs().max().item(), (b - exact).abs().max().item()
    assert fused_err <= 2 * stock_err + 1e-3


def test_dropout_is_random_per_step_reproducible_per_seed_and_off_in_eval():
    model = _model(dropout=0.3).train()
    ids, mask = _batch()
    with fused_layers_in(model):
        torch.manual_seed(5)
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=mask).logits
        torch.manual_seed(5)
        c = model(input_ids=ids, attention_mask=mask).logits
        model.eval()
        d = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(a, b) and torch.equal(a, c)
    torch.testing.assert_close(d, model(input_ids=ids, attention_mask=mask).logits)  # eval: the stock forward


def test_the_model_is_unchanged_outside_the_block_and_unknown_layers_are_left_alone():
    model = _model(dropout=0.1)
    with fused_layers_in(model):
        assert all("forward" in vars(layer) for layer in model.bert.encoder.layer)
        assert type(model.dropout).__name__ == "HashDropout"
        assert model.config._attn_implementation == fused_layer.ATTENTION_NAME
    assert not any("forward" in vars(m) for m in model.modules())
    assert type(model.dropout) is torch.nn.Dropout and model.config._attn_implementation == "sdpa"
    # a layer with a hook, or one of a subclass (remote code), is not fused
    model.bert.encoder.layer[0].output.register_forward_hook(lambda *a: None)
    assert fusable_layers(model) == [model.bert.encoder.layer[1]]
    with fused_layers_in(model, enabled=False) as n:
        assert n == 0


def test_without_a_compiler_training_uses_the_stock_layers_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(fused_layer, "_ops", None)
    monkeypatch.setattr(fused_layer, "_failure", [])
    monkeypatch.setattr(fused_layer, "SOURCE", fused_layer.SOURCE.with_name("no_such_kernels.cpp"))
    model = _model()
    with caplog.at_level(logging.WARNING), fused_layers_in(model) as n:
        assert n == 0
    assert "train.fused_kernels" in caplog.text and "stock layers" in caplog.text
    assert not any("forward" in vars(m) for m in model.modules())


def test_results_are_bitwise_the_same_whatever_the_heap_looks_like():
    """The kernels' sums must not depend on where their scratch buffers land (a resumed run is bit-for-bit the
    straight one only if they do not)."""
    torch.manual_seed(0)
    scores = torch.randn(4, 2, 9, 9, requires_grad=True)
    x = torch.randn(4, 9, 32, requires_grad=True)
    res = torch.randn(4, 9, 32)
    w, b = torch.ones(32, requires_grad=True), torch.zeros(32, requires_grad=True)
    mask = torch.ones(4, 1, 9, dtype=torch.bool)
    mask[2, :, 5:] = False

    def run():
        for t in (scores, x, w, b):
            t.grad = None
        probs = SoftmaxDropout.apply(scores, mask, 1, 2, 0.3, 0.1)
        out, _ = DropoutAddNorm.apply(x, res, w, b, 3, 4, 0.1, 1e-12)
        ((probs * probs).sum() + (out * out.roll(1)).sum()).backward()
        return [probs.detach(), out.detach(), scores.grad, x.grad, w.grad, b.grad]

    first = run()
    import random
    rng, keep = random.Random(0), []
    for _ in range(12):
        keep.append(bytearray(rng.randrange(1, 5000)))  # moves where the next malloc'd buffers start
        assert all(torch.equal(a, b) for a, b in zip(first, run()))
