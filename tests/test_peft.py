"""PEFT: LoRA, AdaLoRA (Hugging Face PEFT), bottleneck adapters and freezing on a tiny random BERT.

The regressions users of the existing tools report are each pinned here: the head is trained and saved with the
adapter (a reloaded run predicts what it predicted before saving), all-linear never wraps the head, AdaLoRA's ranks
really change, the optimizer sees only trainable parameters, merged == unmerged logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_overrides, toy_rows, write_csv, write_jsonl

import strop
from strop.cli import main
from strop.config import load_config, resolve_method_defaults
from strop.tasks import build_model, get_task, prepare
from strop.errors import ConfigError
from strop.models.peft import apply_peft, count_parameters, resolve_targets
from strop.training.optim import build_optimizer

METHODS = ["lora", "adalora", "adapter", "freeze"]


def _model(tiny_model, tmp_path, **over):
    src = write_csv(tmp_path / "train.csv", toy_rows(60, seed=5))
    cfg = load_config(None, {"data.train": str(src), "model.path": str(tiny_model), **over})
    ds = prepare(cfg)
    torch.manual_seed(0)
    return cfg, build_model(get_task(ds.task), cfg, ds.labels)


def _train(tiny_model, tmp_path, method: str, src=None, **extra):
    src = src or write_csv(tmp_path / "train.csv", toy_rows(90, seed=1))
    over = {"data.train": src, "peft.method": method, "train.epochs": 3, "name": method, **extra}
    return strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **over))


# ---------------------------------------------------------------------------------------------------------------
# targets and trainable parameters


def test_all_linear_never_wraps_the_head(tiny_model, tmp_path):
    cfg, model = _model(tiny_model, tmp_path)
    targets = resolve_targets(model, ["all-linear"], None)
    assert targets and not any("classifier" in t for t in targets)
    assert any(t.endswith("attention.self.query") for t in targets) and any(t.endswith("pooler.dense") for t in targets)
    peft_model, _ = apply_peft(model, load_config(None, {"peft.method": "lora"}).peft, 10)
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped and not any("classifier" in n for n in wrapped)
    # the head is trained in full (modules_to_save) and nothing else outside the LoRA matrices
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "classifier.modules_to_save" in n for n in trainable)


@pytest.mark.parametrize("targets, message", [
    (["classifier"], "matches the task head"),
    (["re:.*classifier.*"], "matches the task head"),
    (["querry"], "matches no linear layer"),
])
def test_bad_targets_name_the_field(tiny_model, tmp_path, targets, message):
    _, model = _model(tiny_model, tmp_path)
    with pytest.raises(ConfigError, match=message) as e:
        resolve_targets(model, targets, None)
    assert "peft.target_modules" in str(e.value)


def test_targets_by_suffix_and_regex(tiny_model, tmp_path):
    _, model = _model(tiny_model, tmp_path)
    by_suffix = resolve_targets(model, ["query", "value"], None)
    by_regex = resolve_targets(model, [r"re:.*\.(query|value)"], None)
    assert by_suffix == by_regex and len(by_suffix) == 4  # 2 layers x (query, value)


@pytest.mark.parametrize("method", METHODS)
def test_optimizer_sees_only_trainable_parameters(tiny_model, tmp_path, method):
    cfg, model = _model(tiny_model, tmp_path, **{"peft.method": method, "peft.unfrozen_layers": 1})
    model, _ = apply_peft(model, cfg.peft, 100)
    trainable, total = count_parameters(model)
    assert 0 < trainable < 0.5 * total
    resolve_method_defaults(cfg)  # train.lr: the method's default, as a run resolves it
    in_optimizer = {id(p) for g in build_optimizer(model, cfg.train).param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    head = [p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]
    assert head, "the task head must always train"


def test_freeze_trains_only_the_top_layers(tiny_model, tmp_path):
    cfg, model = _model(tiny_model, tmp_path, **{"peft.method": "freeze", "peft.unfrozen_layers": 1})
    model, _ = apply_peft(model, cfg.peft, 100)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".layer.1." in n for n in trainable) and not any(".layer.0." in n for n in trainable)
    assert not any("embeddings" in n for n in trainable)
    too_many = load_config(None, {"peft.method": "freeze", "peft.unfrozen_layers": 5}).peft
    with pytest.raises(ConfigError, match="peft.unfrozen_layers=5 but the model has 2 layers"):
        apply_peft(_model(tiny_model, tmp_path)[1], too_many, 100)


@pytest.mark.parametrize("over, message", [
    ({"peft.method": "none", "peft.target_modules": "query"}, "peft.target_modules"),
    ({"peft.method": "freeze", "peft.target_modules": "query"}, "no effect with peft.method='freeze'"),
    ({"peft.method": "lora", "peft.r": 0}, "peft.r=0 must be > 0"),
    ({"peft.method": "adalora", "peft.init_r": 4, "peft.r": 8}, "peft.init_r=4 is below the target rank"),
    ({"peft.method": "lora", "peft.dropout": 1.5}, "peft.dropout=1.5"),
    ({"peft.method": "lora", "peft.target_modules": "all-linear,query"}, "all-linear must be the only entry"),
    ({"peft.method": "lora", "peft.target_modules": "re:[unclosed"}, "not a valid regular expression"),
    ({"peft.method": "adapter", "peft.adapter_size": -1}, "peft.adapter_size=-1"),
    ({"peft.method": "loar"}, "peft.method='loar' is not one of"),
])
def test_invalid_combinations_name_the_field(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, over)


def test_adalora_schedule_longer_than_the_run_is_refused(tiny_model, tmp_path):
    cfg, model = _model(tiny_model, tmp_path, **{"peft.method": "adalora", "peft.tinit": 6, "peft.tfinal": 5})
    with pytest.raises(ConfigError, match=r"peft.tinit \(6 steps\) \+ peft.tfinal \(5 steps\) >= the run's 10 steps"):
        apply_peft(model, cfg.peft, 10)


# ---------------------------------------------------------------------------------------------------------------
# training, saving, reloading


@pytest.mark.parametrize("method", METHODS)
def test_reloaded_run_predicts_what_the_trained_model_did(tiny_model, tmp_path, method):
    """The validation metrics computed in memory at the end of training (unmerged adapters, head as trained) are
    reproduced exactly by the reloaded run: a head missing from the save would give different losses."""
    run = _train(tiny_model, tmp_path, method, **{"train.lr": 5e-2})
    meta = json.loads((run.model_dir / "strop.json").read_text())
    assert meta["peft"]["method"] == method and 0 < meta["peft"]["trainable_params"] < meta["peft"]["total_params"]
    assert run.results["trainable_params"] == meta["peft"]["trainable_params"]
    split = run.run_dir / "data.json"
    assert split.is_file()
    again = strop.load(run.run_dir)
    # the run carved validation from train; evaluate the same rows again through the saved model
    from strop.tasks import prepare as prep

    cfg = load_config(run.run_dir / "config.yaml")
    rows = prep(cfg).splits["validation"]
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": t, "label": meta["labels"][y]}
                                              for t, y in zip(rows.texts, rows.labels)])
    metrics = again.evaluate_file(val)
    assert metrics["accuracy"] == pytest.approx(run.results["validation"]["accuracy"])
    assert metrics["loss"] == pytest.approx(run.results["validation"]["loss"], abs=1e-5)


def test_lora_adapter_loads_with_plain_peft_and_matches_the_merged_model(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = _train(tiny_model, tmp_path, "lora", **{"train.lr": 5e-2})
    adapter = run.run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    size = (adapter / "adapter_model.safetensors").stat().st_size
    assert size < 0.1 * (run.model_dir / "model.safetensors").stat().st_size  # small: many tasks share one base
    meta = json.loads((run.model_dir / "strop.json").read_text())
    assert meta["peft"]["merged"] is True and meta["peft"]["merge_max_abs_diff"] < 1e-4

    texts = ["refund for my card please", "where is the courier with my parcel", "reset password"]
    tok = AutoTokenizer.from_pretrained(str(run.model_dir))
    inputs = tok(texts, padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(str(run.model_dir)).eval()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model)
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"],
                                                              num_labels=len(meta["labels"]))
    unmerged = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(unmerged(**inputs).logits, merged(**inputs).logits, rtol=1e-4, atol=1e-5)
    # strop loads the adapter folder too (base from adapter_config.json): same predictions as the merged model/
    from_adapter, from_model = strop.load(adapter).predict(texts), strop.load(run.run_dir).predict(texts)
    for a, b in zip(from_adapter, from_model):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_adalora_ranks_change_during_training(tiny_model, tmp_path):
    run = _train(tiny_model, tmp_path, "adalora", **{"peft.init_r": 6, "peft.r": 2, "peft.tinit": 2,
                                                      "peft.tfinal": 4, "peft.delta_t": 2, "train.lr": 5e-2})
    config = json.loads((run.run_dir / "adapter" / "adapter_config.json").read_text())
    pattern = config["rank_pattern"]
    assert pattern, "AdaLoRA never re-allocated ranks (rank_pattern empty): it behaved as plain LoRA"
    ranks = {name: sum(bool(x) for x in mask) for name, mask in pattern.items()}
    assert all(len(mask) == 6 for mask in pattern.values())
    assert min(ranks.values()) < 6, ranks  # some module lost rank ...
    assert sum(ranks.values()) <= 2 * len(ranks)  # ... down to the budget of r=2 per module on average
    assert len(set(ranks.values())) > 1 or min(ranks.values()) == 2


def test_adalora_hook_runs_after_the_optimizer_step(tiny_model, tmp_path, monkeypatch):
    """update_and_allocate sees gradients (it needs them for importance) and every step number once, in order."""
    from peft.tuners.adalora import AdaLoraModel

    seen = []
    original = AdaLoraModel.update_and_allocate

    def spy(self, step):
        grads = [p.grad for n, p in self.model.named_parameters() if "lora_E" in n]
        seen.append((step, all(g is not None for g in grads)))
        return original(self, step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy)
    run = _train(tiny_model, tmp_path, "adalora", **{"peft.tinit": 2, "peft.tfinal": 4, "train.epochs": 1})
    steps = run.results["steps"]
    assert [s for s, _ in seen] == list(range(1, steps + 1))
    assert all(has_grad for _, has_grad in seen)


@pytest.mark.parametrize("task", ["multi_label", "regression", "pairs"])
def test_lora_works_for_every_classification_task(tiny_model, tmp_path, task, capsys):
    rows = toy_rows(80, seed=4, pairs=task == "pairs")
    if task == "multi_label":
        for i, r in enumerate(rows):
            r["label"] = [r["label"]] + (["urgent"] if i % 3 == 0 else [])
    elif task == "regression":
        for r in rows:
            r["label"] = {"account": 0.5, "billing": 2.25, "shipping": 4.0}[r["label"]]
    src = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "runs"
    assert main(["train", *tiny_overrides(tiny_model, out, **{"data.train": src, "train.epochs": 2,
                                                              "peft.method": "lora"})]) == 0
    captured = capsys.readouterr()
    assert "peft.method=lora: trainable parameters" in captured.out + captured.err
    meta = json.loads((out / "run" / "model" / "strop.json").read_text())
    assert meta["task"] == ("single_label" if task == "pairs" else task)
    assert meta["peft"]["merge_max_abs_diff"] < 1e-4
    predictor = strop.load(out / "run")
    pred = predictor.predict(["refund card"], pairs=["please help"] if task == "pairs" else None)[0]
    if task == "regression":
        assert set(pred) == {"value"} and np.isfinite(pred["value"])
    else:  # a distribution over the run's labels (sigmoids for multi-label: each in [0, 1])
        probs = np.array(list(pred["probs"].values()))
        assert list(pred["probs"]) == meta["labels"] and ((probs >= 0) & (probs <= 1)).all()
        if task != "multi_label":
            assert probs.sum() == pytest.approx(1.0, abs=1e-5) and pred["label"] == max(pred["probs"],
                                                                                        key=pred["probs"].get)


def test_lora_with_mean_pooling(tiny_model, tmp_path):
    run = _train(tiny_model, tmp_path, "lora", **{"model.pooling": "mean"})
    assert (run.model_dir / "head.safetensors").is_file()
    assert strop.load(run.run_dir).predict(["refund card"])[0]["label"] in run.results["validation"]["per_class"]


def test_adapter_run_saves_base_and_adapters(tiny_model, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    run = _train(tiny_model, tmp_path, "adapter", **{"peft.adapter_size": 4})
    state = load_file(str(run.model_dir / "adapters.safetensors"))
    assert state and all(k.split(".")[-2] in ("down", "up") for k in state)
    assert all(v.shape[0] == 4 or v.shape[-1] == 4 for k, v in state.items() if k.endswith("weight"))
    # the base part is a plain HF folder (adapters re-applied by strop.load; non-linear, so they cannot be merged)
    AutoModelForSequenceClassification.from_pretrained(str(run.model_dir))


def test_lora_plus_gives_the_b_matrices_their_own_learning_rate(tiny_model, tmp_path):
    cfg, model = _model(tiny_model, tmp_path, **{"peft.method": "lora", "peft.lr_ratio": 16, "train.lr": 1e-3})
    peft_model, hook = apply_peft(model, cfg.peft, 10)
    optimizer = build_optimizer(peft_model, cfg.train, hook.lr_scales)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            assert lr_of[id(p)] == pytest.approx(1.6e-2 if "lora_B" in name else 1e-3), name
    # the plain default: one learning rate for all
    cfg, model = _model(tiny_model, tmp_path, **{"peft.method": "lora", "train.lr": 1e-3})
    peft_model, hook = apply_peft(model, cfg.peft, 10)
    assert {g["lr"] for g in build_optimizer(peft_model, cfg.train, hook.lr_scales).param_groups} == {1e-3}


def test_lora_train_norms_trains_and_saves_norms_and_biases(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg, model = _model(tiny_model, tmp_path, **{"peft.method": "lora", "peft.train_norms": True})
    peft_model, _ = apply_peft(model, cfg.peft, 10)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("LayerNorm.modules_to_save" in n for n in trainable)
    assert any(n.endswith("attention.self.query.base_layer.bias") for n in trainable)
    assert not any(n.endswith("query.base_layer.weight") for n in trainable)  # the weights stay frozen

    run = _train(tiny_model, tmp_path, "lora", **{"peft.train_norms": True, "train.lr": 5e-2})
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model))
    trained = AutoModelForSequenceClassification.from_pretrained(str(run.model_dir))
    moved = [n for n, p in trained.named_parameters() if ("LayerNorm" in n or n.endswith(".bias")) and
             "classifier" not in n and not torch.equal(p, base.get_parameter(n))]
    assert any("LayerNorm" in n for n in moved) and any(n.endswith("query.bias") for n in moved)
    # the small adapter/ folder holds them too: base + adapter predicts what the merged model/ predicts
    meta = json.loads((run.model_dir / "strop.json").read_text())
    assert meta["peft"]["train_norms"] is True
    unmerged = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model), num_labels=len(meta["labels"])), str(run.run_dir / "adapter")).eval()
    inputs = {"input_ids": torch.tensor([[2, 7, 9, 11, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(unmerged(**inputs).logits, trained.eval()(**inputs).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("over, message", [
    ({"peft.method": "adapter", "peft.lr_ratio": 16}, "peft.lr_ratio=16.0 has no effect with peft.method='adapter'"),
    ({"peft.method": "none", "peft.train_norms": True}, "peft.train_norms=True has no effect"),
    ({"peft.method": "lora", "peft.lr_ratio": 0}, "peft.lr_ratio=0.0 must be > 0"),
])
def test_lora_plus_and_train_norms_misuse_is_refused(over, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, over)


def test_wrapping_and_loading_adapters_prints_no_deprecation_warning(tiny_model, tmp_path):
    """PEFT reads transformers' deprecated `is_gradient_checkpointing`; a user must not see that FutureWarning on
    every LoRA run (or every load of an adapter folder), while PEFT's other warnings still come through."""
    import warnings

    cfg, model = _model(tiny_model, tmp_path, **{"peft.method": "lora"})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        apply_peft(model, cfg.peft, 10)
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]


def test_merge_tolerance_is_absolute_for_small_logits_and_relative_for_large_ones():
    """A correct LoRA merge of a 6-class emotion model differed by 1.9e-4 from the unmerged model (float32 rounding
    of W + BA against Wx + B(Ax), which grows with the logits): the check scales with the logits' size."""
    from strop.models.peft import merge_tolerance

    assert merge_tolerance(torch.tensor([[0.3, -0.8]])) == pytest.approx(1e-4)  # |logits| <= 1: absolute 1e-4
    assert merge_tolerance(torch.tensor([[9.4, -2.0]])) == pytest.approx(9.4e-4)
    assert 1.9e-4 < merge_tolerance(torch.tensor([[-2.0, 1.0]]))  # logits of 2 or more allow the failing run's 1.9e-4
    assert merge_tolerance(torch.tensor([[2.0]]), atol=1e-6) == pytest.approx(2e-6)
