"""Model building, HF parity of saved models, the optimizer, gradient accumulation and reproducibility."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_overrides, toy_rows, write_csv

from strop.config import load_config
from strop.data.batching import collate_inputs, encode, epoch_batches, eval_batches
from strop.tasks import build_model, get_task, load_trained, prepare
from strop.models.backbone import load_tokenizer
from strop.training.loop import accumulate_gradients
from strop.training.optim import build_scheduler, param_groups


@pytest.fixture()
def setup(tiny_model, tmp_path):
    src = write_csv(tmp_path / "train.csv", toy_rows(60, seed=5))
    cfg = load_config(None, {"data.train": str(src), "model.path": str(tiny_model)})
    ds = prepare(cfg)
    enc = encode(load_tokenizer(tiny_model), ds.splits["train"], 64)
    return cfg, ds, enc


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("micro", [1, 3, 4])
def test_gradient_accumulation_equals_one_large_batch(setup, micro):
    cfg, ds, enc = setup
    torch.manual_seed(0)
    model = build_model(get_task(ds.task), cfg, ds.labels).eval()  # eval: no dropout, so both paths see the same net
    idx = np.arange(10)  # 10 examples: micro 3 and 4 leave a smaller last micro-batch
    full_loss = accumulate_gradients(model, enc, idx, 10, get_task(ds.task), torch.device("cpu"), "fp32")
    full = _grads(model)
    model.zero_grad(set_to_none=True)
    acc_loss = accumulate_gradients(model, enc, idx, micro, get_task(ds.task), torch.device("cpu"), "fp32")
    acc = _grads(model)
    torch.testing.assert_close(acc_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert full.keys() == acc.keys() and len(full) > 10
    for name in full:
        torch.testing.assert_close(acc[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_saved_model_matches_plain_transformers(tiny_model, toy_splits, tmp_path):
    """model/ loads with AutoModelForSequenceClassification and gives the logits strop gives."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import strop

    run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{"data.train": toy_splits["train"]}))
    texts = ["refund for my card please", "where is the courier with my parcel today", "reset password"]
    predictor = strop.load(run.run_dir)
    ours = torch.tensor([[p["probs"][n] for n in predictor.labels] for p in predictor.predict(texts)])

    hf = AutoModelForSequenceClassification.from_pretrained(str(run.model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(run.model_dir))
    with torch.no_grad():
        logits = hf(**tok(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(logits.softmax(-1), ours, rtol=1e-5, atol=1e-6)
    assert hf.config.id2label == dict(enumerate(predictor.labels))


def test_mean_pooling_round_trip(tiny_model, toy_splits, tmp_path):
    import strop

    run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{"data.train": toy_splits["train"],
                                                                               "model.pooling": "mean"}))
    assert (run.model_dir / "head.safetensors").is_file()
    model, tok, meta, _ = load_trained(run.model_dir)
    assert meta["pooling"] == "mean"
    # the saved run's test accuracy is reproduced by the reloaded model on the same carved test split
    metrics = strop.load(run.run_dir).predict(["refund card", "parcel courier"])
    assert len(metrics) == 2
    cfg = load_config(run.run_dir / "config.yaml")
    test = prepare(cfg).splits["test"]
    preds = strop.load(run.run_dir).predict(test.texts)
    labels = json.loads((run.model_dir / "strop.json").read_text())["labels"]
    acc = np.mean([labels.index(p["label"]) == y for p, y in zip(preds, test.labels)])
    assert acc == pytest.approx(run.results["test"]["accuracy"])


def test_same_config_and_seed_give_the_same_losses(tiny_model, toy_splits, tmp_path):
    import strop

    def losses(name):
        run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", name=name,
                                               **{"data.train": toy_splits["train"], "train.log_every": 1}))
        records = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["split"] == "train"]

    a, b = losses("a"), losses("b")
    assert len(a) == 36 and a == b
    c = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", name="c", **{
        "data.train": toy_splits["train"], "train.log_every": 1, "train.seed": 7}))
    records = [json.loads(x) for x in (c.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if r["split"] == "train"] != a


def test_no_weight_decay_on_bias_and_layernorm(setup):
    cfg, ds, _ = setup
    model = build_model(get_task(ds.task), cfg, ds.labels)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.01, 1e-4, head_lr=1e-3)
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            no_decay = name.endswith(".bias") or "LayerNorm" in name
            assert (g["weight_decay"] == 0.0) == no_decay, name
            assert g["lr"] == (1e-3 if name.startswith("classifier") else 1e-4), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_decays(kind):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, kind, warmup=4, total=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == sorted(lrs[:5]) and lrs[0] < 0.5 and lrs[4] == 1.0
    if kind == "constant":
        assert lrs[-1] == 1.0
    else:
        assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] < 0.1


def test_epoch_batches_are_deterministic_complete_and_less_padded():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=1000)
    a = epoch_batches(lengths, 32, seed=1, epoch=0)
    assert [x.tolist() for x in a] == [x.tolist() for x in epoch_batches(lengths, 32, seed=1, epoch=0)]
    assert [x.tolist() for x in a] != [x.tolist() for x in epoch_batches(lengths, 32, seed=1, epoch=1)]
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))

    def padding(batches):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)

    random_order = epoch_batches(lengths, 32, seed=1, epoch=0, grouped=False)
    assert sorted(np.concatenate(random_order).tolist()) == list(range(1000))
    assert padding(a) < 0.2 * padding(random_order)


def test_eval_batches_cover_everything_once_and_bound_padding():
    rng = np.random.default_rng(0)
    mixed = rng.integers(3, 61, size=32)  # one serving batch of sentences of mixed length
    batches = eval_batches(mixed, 64)
    assert sorted(np.concatenate(batches).tolist()) == list(range(32))
    assert len(batches) > 1  # one batch padded to the longest would be mostly padding
    for b in batches:
        real = int(mixed[b].sum())
        assert int(mixed[b].max()) * len(b) <= 1.25 * real or len(b) == 1
        assert list(mixed[b]) == sorted(mixed[b], reverse=True)
    # a large set: neighbours in length order are alike, so batches stay full
    many = rng.integers(3, 61, size=5000)
    big = eval_batches(many, 64)
    assert sorted(np.concatenate(big).tolist()) == list(range(5000))
    assert max(len(b) for b in big) == 64 and sum(len(b) == 64 for b in big) >= len(big) - 8
    # equal lengths: plain chunks of batch_size
    assert [len(b) for b in eval_batches(np.full(10, 7), 4)] == [4, 4, 2]


def test_collate_pads_to_longest(setup):
    _, _, enc = setup
    idx = np.array([0, 1, 2])
    batch = collate_inputs(enc, idx)
    width = int(enc.lengths[idx].max())
    assert batch["input_ids"].shape == (3, width) and batch["attention_mask"].sum(1).tolist() == \
        enc.lengths[idx].tolist()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == enc.pad_id).all()


def test_long_texts_are_truncated_and_counted(setup, tiny_model):
    cfg, ds, _ = setup
    ex = ds.splits["train"]
    ex.texts[0] = "refund " * 500
    enc = encode(load_tokenizer(tiny_model), ex, 32)
    assert enc.n_truncated == 1 and enc.lengths.max() == 32 and enc.input_ids[0][-1] == 102  # [SEP] kept


def test_predictions_keep_input_order(tiny_model, toy_splits, tmp_path):
    import strop

    run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{"data.train": toy_splits["train"],
                                                                               "train.epochs": 1}))
    predictor = strop.load(run.run_dir)
    texts = ["refund " * n + "card" for n in (1, 9, 3, 20, 2, 7)]  # lengths out of order on purpose
    batched = predictor.predict(texts, batch_size=2)
    single = [predictor.predict([t])[0] for t in texts]
    for a, b in zip(batched, single):
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_real_default_model_trains_a_few_steps(pooling, tmp_path):
    """The packaged all-MiniLM-L6-v2 loads, trains 6 steps and its loss drops on the demo set."""
    import strop
    from conftest import DEMO

    run = strop.train(None, {"data.train": str(DEMO), "output_dir": str(tmp_path), "name": "real",
                             "model.pooling": pooling, "train.max_steps": 6, "train.batch_size": 16,
                             "train.lr": 1e-4, "train.log_every": 1, "model.max_length": 32, "train.warmup": 0})
    records = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2])
    assert run.results["validation"]["n"] == 40


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_frozen_layers_stop_backprop_above_them(setup, pooling):
    cfg, ds, enc = setup
    cfg.model.pooling, cfg.model.frozen_layers = pooling, 1
    torch.manual_seed(0)
    model = build_model(get_task(ds.task), cfg, ds.labels)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embeddings.position_embeddings" in n for n in frozen)
    assert any("embeddings.LayerNorm" in n for n in frozen)
    assert any(".layer.0." in n for n in frozen) and not any(".layer.1." in n for n in frozen)
    accumulate_gradients(model, enc, np.arange(8), 8, get_task(ds.task), torch.device("cpu"), "fp32")
    grads = _grads(model)
    assert grads and not any(n in grads for n in frozen)
    assert any(".layer.1." in n for n in grads) and any("classifier" in n for n in grads)
    # no graph was built below layer 1: the first trainable layer's input needs no gradient
    layer1_in = {}
    handle = model.get_submodule(next(n for n, _ in model.named_modules() if n.endswith("layer.1"))
                                 ).register_forward_pre_hook(lambda m, args: layer1_in.update(x=args[0]))
    batch = collate_inputs(enc, np.arange(4))
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    assert not layer1_in["x"].requires_grad


@pytest.mark.parametrize("over, message", [
    ({"model.frozen_layers": 2}, "model.frozen_layers=2 but the model has 2 layers"),
    ({"model.frozen_layers": -1}, "model.frozen_layers=-1 must be >= 0"),
    ({"model.frozen_layers": 1, "peft.method": "lora"}, "applies to full fine-tuning"),
])
def test_frozen_layers_misuse_is_refused(setup, over, message):
    from strop.errors import ConfigError

    cfg, ds, _ = setup
    with pytest.raises(ConfigError, match=message):
        c = load_config(None, {"data.train": cfg.data.train, "model.path": cfg.model.path, **over})
        build_model(get_task(ds.task), c, ds.labels)


@pytest.mark.parametrize("method", ["none", "lora"])
def test_training_and_saving_do_not_import_deepspeed(tiny_model, toy_splits, tmp_path, method):
    """Saving goes through transformers' save_pretrained, which asks accelerate whether the model is wrapped; with
    DeepSpeed installed that imports it (seconds, ~140 MB, a console warning). A plain run must not."""
    pytest.importorskip("deepspeed")
    if method == "lora":
        pytest.importorskip("peft")
    import subprocess
    import sys

    over = tiny_overrides(tiny_model, tmp_path / "runs", **{"data.train": toy_splits["train"], "train.epochs": 1,
                                                             "peft.method": method, "eval.report": False})
    code = ("import sys, strop; run = strop.train(None, sys.argv[1:]); "
            "assert (run.model_dir / 'model.safetensors').is_file(); print('deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *over], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False", "a training run imported deepspeed"
