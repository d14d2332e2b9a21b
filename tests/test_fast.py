"""The training speed-ups of training/fast.py keep the math: dropout's distribution, gradients, attention, models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from strop.training.fast import (ATTENTION_NAME, FastDropout, attention_with_fast_dropout, fast_dropout,
                                 fast_dropout_in, keep_mask, tune_allocator, tuned_allocator,
                                 untune_allocator)


def test_keep_mask_has_the_dropout_distribution():
    torch.manual_seed(0)
    keep, scale = keep_mask((1000, 1000), 0.1, "cpu")
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    q = round(0.1 * 65536) / 65536
    assert scale == pytest.approx(1 / (1 - q))
    # 1e6 Bernoulli(0.9) draws: the mean is within 5 standard deviations (0.0003 each) of 1 - q
    assert abs(keep.float().mean().item() - (1 - q)) < 5 * (0.9 * 0.1 / 1e6) ** 0.5
    # each of the three 16-bit lanes of a 64-bit draw is unbiased on its own (the unused top lane would not be)
    lanes = keep.reshape(-1)[:999999].view(-1, 3).float().mean(0)
    assert torch.all((lanes - (1 - q)).abs() < 5 * (0.9 * 0.1 / 333333) ** 0.5)
    # neighbouring elements are independent: P(both kept) = P(kept)^2
    flat = keep.reshape(-1).float()
    assert abs((flat[:-1] * flat[1:]).mean().item() - (1 - q) ** 2) < 0.002


def test_keep_mask_is_seeded_and_odd_sizes_work():
    torch.manual_seed(3)
    a, _ = keep_mask((7, 5), 0.3, "cpu")
    torch.manual_seed(3)
    b, _ = keep_mask((7, 5), 0.3, "cpu")
    assert torch.equal(a, b)
    for n in (1, 2, 3, 4, 5):
        assert keep_mask((n,), 0.5, "cpu")[0].shape == (n,)


def test_fast_dropout_output_and_gradient():
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(7)
    y = fast_dropout(x, 0.25)
    torch.manual_seed(7)
    keep, scale = keep_mask(x.shape, 0.25, "cpu")
    assert scale == 4 / 3  # 0.25 is a multiple of 1/65536: exact
    assert torch.equal(y, torch.where(keep, x * scale, torch.zeros(())))
    y.sum().backward()
    assert torch.equal(x.grad, keep.float() * scale)
    assert fast_dropout(x, 0.25, training=False) is x and fast_dropout(x, 0.0) is x
    assert torch.count_nonzero(fast_dropout(x, 1.0)) == 0
    # bf16 (autocast's activations) keeps its dtype
    assert fast_dropout(torch.randn(8, 8, dtype=torch.bfloat16), 0.1).dtype == torch.bfloat16


def test_fast_dropout_module_keeps_nn_dropout_interface():
    d = FastDropout(0.2)
    assert isinstance(d, nn.Dropout) and d.p == 0.2 and not list(d.parameters())
    x = torch.ones(10, 10)
    assert torch.equal(d.eval()(x), x)
    out = d.train()(x)
    scale = torch.tensor(1 / (1 - round(0.2 * 65536) / 65536), dtype=torch.float32).item()
    assert set(out.unique().tolist()) <= {0.0, scale}


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.is_causal = False


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, :, :, 3:] = False  # the second sequence has 2 padding tokens
    return q, k, v, mask


def test_attention_without_dropout_is_sdpa():
    module, (q, k, v, mask) = _Attn(), _qkv()
    expected = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    for training, p in ((False, 0.1), (True, 0.0)):
        module.train(training)
        out, _ = attention_with_fast_dropout(module, q, k, v, mask, dropout=p)
        torch.testing.assert_close(out, expected)


def test_attention_with_dropout_is_the_eager_formula_with_the_fast_mask():
    module, (q, k, v, mask) = _Attn().train(), _qkv()
    torch.manual_seed(5)
    out, _ = attention_with_fast_dropout(module, q, k, v, mask, dropout=0.1)
    torch.manual_seed(5)
    keep, scale = keep_mask((2, 3, 5, 5), 0.1, "cpu")
    scores = (q @ k.transpose(2, 3)) / 2.0
    probs = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1)
    expected = ((probs * keep * scale) @ v).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    assert torch.all(probs[1, :, :, 3:] == 0)  # padding never attended


def test_fast_dropout_in_swaps_and_restores_a_transformers_model(tiny_model):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=3)
    assert model.config._attn_implementation == "sdpa"
    n_dropout = sum(type(m) is nn.Dropout for m in model.modules())
    ids = torch.tensor([[101, 2023, 2003, 102, 0], [101, 7592, 2088, 2003, 102]])
    att = (ids != 0).long()
    model.eval()
    before = model(input_ids=ids, attention_mask=att).logits
    with fast_dropout_in(model):
        assert sum(type(m) is FastDropout for m in model.modules()) == n_dropout
        assert model.config._attn_implementation == ATTENTION_NAME
        torch.testing.assert_close(model(input_ids=ids, attention_mask=att).logits, before)  # eval: same model
        model.train()
        torch.manual_seed(0)
        loss = model(input_ids=ids, attention_mask=att, labels=torch.tensor([0, 2])).loss
        loss.backward()
        assert torch.isfinite(loss) and model.classifier.weight.grad is not None
        model.eval()
    assert sum(type(m) is nn.Dropout for m in model.modules()) == n_dropout
    assert model.config._attn_implementation == "sdpa"
    with fast_dropout_in(model, enabled=False):
        assert model.config._attn_implementation == "sdpa"


def test_training_with_fast_dropout_is_reproducible_and_saves_a_plain_model(tiny_model, toy_splits, tmp_path):
    import strop

    from conftest import tiny_overrides

    def run(name, **extra):
        over = tiny_overrides(tiny_model, tmp_path / "runs", name=name, **{
            "data.train": toy_splits["train"], "data.validation": toy_splits["validation"],
            "train.epochs": 2, "eval.report": False, **extra})
        r = strop.train(overrides=over)
        losses = [json.loads(line)["loss"] for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line).get("split") == "train"]
        return r, losses

    a, la = run("a", **{"train.fast_dropout": True})
    b, lb = run("b", **{"train.fast_dropout": True})
    c, lc = run("c", **{"train.fast_dropout": False})
    assert la == lb  # same seed, same masks
    assert la != lc  # the masks come from a different generator use than torch's dropout
    config = json.loads((a.model_dir / "config.json").read_text())
    assert config.get("_attn_implementation", config.get("attn_implementation")) in (None, "sdpa")


def test_tune_allocator_applies_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_allocator() is True
    assert tune_allocator() is True  # idempotent
    untune_allocator()


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_tuned_allocator_keeps_freed_buffers_then_gives_them_back():
    """Inside a training loop a freed 256 MB buffer stays in the heap for the next step; once the loop is over the
    pages go back to the OS, so the final evaluation and the report do not stack on training's high-water mark."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    with tuned_allocator() as applied:
        assert applied
        before = _rss_mb()
        buf = torch.ones(64 * 1024 * 1024)  # 256 MB, far above glibc's own mmap threshold
        del buf
        kept = _rss_mb() - before
        assert kept > 200, f"the freed buffer should stay in the heap while tuned (kept {kept:.0f} MB)"
    assert _rss_mb() - before < 50, "leaving tuned_allocator must hand the kept pages back"
    buf = torch.ones(64 * 1024 * 1024)  # glibc's thresholds again: a large buffer is mapped and unmapped
    del buf
    assert _rss_mb() - before < 50
    with tuned_allocator(enabled=False) as applied:
        assert applied is False
    from strop.training import fast

    with tuned_allocator():
        with tuned_allocator():
            pass
        assert fast._TUNED, "an inner training loop must not undo its caller's tuning"
    assert not fast._TUNED


@pytest.mark.parametrize("preset, expected", [(None, "64"), ("512", "512")])
def test_import_strop_caps_the_onednn_primitive_cache_unless_the_user_set_it(preset, expected):
    """Without the cap, oneDNN's per-shape primitive cache grew a training run's RSS by 300-600 MB."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    code = "import os, strop; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected
