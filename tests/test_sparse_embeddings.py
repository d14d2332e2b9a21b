"""model.sparse_embeddings: word embeddings trained through sparse gradients and lazy AdamW rows (training/optim.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

import strop
from strop.training.optim import AdamW, clip_grad_norm


def _pair(sparse_rows: list[list[int]], steps: int, wd: float = 0.01, lr: float = 1e-2):
    """An embedding (+ a dense linear) trained `steps` steps on the id batches `sparse_rows` twice: with sparse
    gradients and strop's AdamW, and densely with torch's AdamW. Returns both (embedding, linear) pairs."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 6)
    lin = torch.nn.Linear(6, 1)
    dense_emb, dense_lin = copy.deepcopy(emb), copy.deepcopy(lin)
    emb.sparse = True
    opts = []
    for e, li, cls in ((emb, lin, AdamW), (dense_emb, dense_lin, torch.optim.AdamW)):
        opts.append(cls([{"params": [e.weight, li.weight], "weight_decay": wd},
                         {"params": [li.bias], "weight_decay": 0.0}], lr=lr))
    for i in range(steps):
        ids = torch.tensor(sparse_rows[i % len(sparse_rows)])
        for e, li, opt in ((emb, lin, opts[0]), (dense_emb, dense_lin, opts[1])):
            (li(e(ids)) ** 2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return (emb, lin, opts[0]), (dense_emb, dense_lin)


def test_rows_seen_every_step_match_dense_adamw_and_unseen_rows_stay_put():
    """Rows in every batch get exactly AdamW's update (decay and bias correction included); rows never looked up
    keep their values (lazy: no decay, no moment-driven drift), unlike dense AdamW which decays them."""
    (emb, lin, _), (d_emb, d_lin) = _pair([[1, 2, 2, 5], [5, 1, 2, 2]], steps=6)
    seen, unseen = [1, 2, 5], [0, 3, 19]
    torch.manual_seed(0)
    start = torch.nn.Embedding(20, 6).weight.detach()
    torch.testing.assert_close(emb.weight[seen], d_emb.weight[seen], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lin.weight, d_lin.weight, rtol=1e-6, atol=1e-7)
    assert torch.equal(emb.weight[unseen], start[unseen])
    assert not torch.allclose(d_emb.weight[unseen], start[unseen])  # dense AdamW decays them
    assert not torch.equal(emb.weight[seen], start[seen])


def test_a_row_skipped_for_a_step_keeps_its_moments_for_the_next():
    """Lazy AdamW replayed by hand from the recorded row gradients: row 3 is looked up in steps 1 and 3 only, so at
    step 3 its moments are those of step 1 (not decayed by step 2) and bias correction counts 3 steps."""
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 1)
    lr, wd, (b1, b2), eps = 0.05, 0.1, (0.9, 0.999), 1e-8
    opt = AdamW([{"params": [emb.weight], "weight_decay": wd}, {"params": list(lin.parameters()), "weight_decay": 0}],
                lr=lr, betas=(b1, b2), eps=eps)
    start = emb.weight.detach().clone()
    grads = []
    for ids in ([3, 4, 4], [4, 6], [3, 4]):
        (lin(emb(torch.tensor(ids))) ** 2).sum().backward()
        grads.append(emb.weight.grad.coalesce().to_dense())
        opt.step()
        opt.zero_grad(set_to_none=True)
    row = start[3].clone()
    m, v = torch.zeros(4), torch.zeros(4)
    for step in (1, 3):  # the steps whose batch holds row 3
        g = grads[step - 1][3]
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        row = row * (1 - lr * wd) - lr / (1 - b1 ** step) * m / ((v / (1 - b2 ** step)).sqrt() + eps)
    torch.testing.assert_close(emb.weight[3].detach(), row, rtol=1e-5, atol=1e-7)
    assert torch.equal(emb.weight[6].detach() != start[6], torch.ones(4, dtype=torch.bool))  # step 2 only
    assert torch.equal(emb.weight[0].detach(), start[0])  # never looked up
    assert float(opt.state[emb.weight]["step"]) == 3
    torch.testing.assert_close(opt.state[emb.weight]["exp_avg"][3], m)


def test_clip_grad_norm_over_sparse_gradients_equals_the_dense_clip():
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(30, 8, sparse=True), torch.nn.Linear(8, 2)
    d_emb, d_lin = copy.deepcopy(emb), copy.deepcopy(lin)
    d_emb.sparse = False
    ids = torch.tensor([[1, 1, 4, 9], [9, 2, 1, 0]])  # repeated rows: their gradients sum before the norm
    for e, li in ((emb, lin), (d_emb, d_lin)):
        (li(e(ids)) * 10).pow(2).sum().backward()
    assert emb.weight.grad.is_sparse
    total = clip_grad_norm([emb.weight, lin.weight, lin.bias], 0.5)
    d_total = torch.nn.utils.clip_grad_norm_([d_emb.weight, d_lin.weight, d_lin.bias], 0.5)
    torch.testing.assert_close(total, d_total)
    assert float(total) > 0.5  # it did clip
    torch.testing.assert_close(emb.weight.grad.to_dense(), d_emb.weight.grad)
    torch.testing.assert_close(lin.weight.grad, d_lin.weight.grad)
    # a NaN gradient shows in the norm, which the loop's guard reads
    emb.weight.grad.values()[0, 0] = math.nan
    assert math.isnan(float(clip_grad_norm([emb.weight, lin.weight], 1.0)))


def test_training_with_sparse_embeddings_updates_only_seen_rows(tiny_model, toy_splits, tmp_path):
    """A real run: the word-embedding matrix changes only in the rows of tokens the training data contains; the
    dev evaluation and saved model work as usual."""
    from transformers import AutoTokenizer

    extra = {"data.train": toy_splits["train"], "data.validation": toy_splits["validation"], "train.max_steps": 12,
             "model.sparse_embeddings": True}
    run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "out", **extra))
    before = load_file(str(tiny_model / "model.safetensors"))["embeddings.word_embeddings.weight"]
    after = next(v for k, v in load_file(str(run.model_dir / "model.safetensors")).items()
                 if k.endswith("word_embeddings.weight"))
    changed = (after != before).any(dim=1)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    import csv

    with open(toy_splits["train"], newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    seen = {i for t in texts for i in tok(t)["input_ids"]}
    assert changed.any()
    assert set(torch.nonzero(changed).flatten().tolist()) <= seen
    assert run.results["validation"]


def test_sparse_embeddings_only_where_they_work_and_only_inside_the_block():
    """On inside the block and off after it; left dense for frozen or tied embeddings, for FSDP / DeepSpeed with
    several processes, and when switched off."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    from strop.training.optim import sparse_embeddings_in

    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    model = BertForSequenceClassification(config)
    words = model.get_input_embeddings()
    with sparse_embeddings_in(model, True) as on:
        assert on and words.sparse
    assert not words.sparse
    for engine, world, expect in (("ddp", 2, True), ("fsdp", 2, False), ("deepspeed", 2, False), ("fsdp", 1, True)):
        with sparse_embeddings_in(model, True, engine, world) as on:
            assert on is expect and words.sparse is expect, (engine, world)
    with sparse_embeddings_in(model, False) as on:
        assert not on and not words.sparse
    words.weight.requires_grad_(False)
    with sparse_embeddings_in(model, True) as on:
        assert not on and not words.sparse
    tied = BertForMaskedLM(config)  # the decoder shares the embedding matrix: its gradient is dense anyway
    with sparse_embeddings_in(tied, True) as on:
        assert not on and not tied.get_input_embeddings().sparse


def test_a_run_from_before_sparse_embeddings_resumes_as_it_trained(tiny_model, toy_splits, tmp_path, monkeypatch):
    """A run folder whose config.yaml predates model.sparse_embeddings was trained with dense embeddings: resuming it
    keeps them dense (the value that run used, not today's default), without a changed-settings refusal."""
    import yaml

    from strop.training import loop as loop_mod

    extra = {"data.train": toy_splits["train"], "data.validation": toy_splits["validation"], "train.max_steps": 8,
             "train.save_every": 2, "model.sparse_embeddings": False}
    real_save = loop_mod.save_checkpoint

    class Crash(Exception):
        pass

    def crash_after(run_dir, model, optimizer, scheduler, state, **kw):
        real_save(run_dir, model, optimizer, scheduler, state, **kw)
        if state.step == 4:
            raise Crash

    with monkeypatch.context() as m:
        m.setattr(loop_mod, "save_checkpoint", crash_after)
        with pytest.raises(Crash):
            strop.train(None, tiny_overrides(tiny_model, tmp_path / "out", **extra))
    run_dir = tmp_path / "out" / "run"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["model"]["sparse_embeddings"]  # as written before the setting existed
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))

    seen = []
    real_fit = loop_mod._fit

    def spy(model, *args, **kwargs):
        seen.append(model.get_input_embeddings().sparse)
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(loop_mod, "_fit", spy)
    resumed = strop.train(resume=run_dir)
    assert resumed.results["resumed_from_step"] == 4 and resumed.results["steps"] == 8
    assert seen == [False]
