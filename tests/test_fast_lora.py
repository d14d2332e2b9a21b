"""The fused LoRA linear computes what PEFT's LoRA forward computes: outputs and every gradient, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_rows, write_csv

from strop.config import load_config
from strop.tasks import build_model, get_task, prepare
from strop.models.peft import apply_peft
from strop.training.fast_lora import fused_lora_in


def _lora_model(tiny_model, tmp_path, **over):
    src = write_csv(tmp_path / "train.csv", toy_rows(20, seed=5))
    cfg = load_config(None, {"data.train": str(src), "model.path": str(tiny_model), "peft.method": "lora", **over})
    ds = prepare(cfg)
    torch.manual_seed(0)
    model, _ = apply_peft(build_model(get_task(ds.task), cfg, ds.labels), cfg.peft, 10)
    with torch.no_grad():  # B starts at zero: move it so the LoRA branch matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()  # no backbone dropout: both paths see the same network


def _run(model, precision: str):
    torch.manual_seed(1)
    ids = torch.randint(5, 40, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(input_ids=ids, attention_mask=mask).logits
    logits.float().pow(2).sum().backward()
    return logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("bf16", 3e-2)])
@pytest.mark.parametrize("train_norms", [False, True])
def test_fused_lora_matches_peft(tiny_model, tmp_path, precision, tol, train_norms):
    model = _lora_model(tiny_model, tmp_path, **{"peft.train_norms": train_norms})
    want, want_grads = _run(model, precision)
    with fused_lora_in(model) as n:
        assert n == sum(1 for m in model.modules() if hasattr(m, "lora_A"))
        got, got_grads = _run(model, precision)
    assert got_grads.keys() == want_grads.keys()
    assert any("lora_A" in k for k in got_grads) and any("lora_B" in k for k in got_grads)
    assert any(k.endswith("base_layer.bias") for k in got_grads) == train_norms
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for k in want_grads:
        assert got_grads[k].dtype == want_grads[k].dtype == torch.float32, k
        scale = want_grads[k].abs().max().clamp_min(1e-6)
        assert ((got_grads[k] - want_grads[k]).abs().max() / scale) < tol, k
    # PEFT's forward is back after the block
    again, _ = _run(model, precision)
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_fused_lora_leaves_other_setups_to_peft(tiny_model, tmp_path):
    dropout = _lora_model(tiny_model, tmp_path, **{"peft.dropout": 0.1})
    with fused_lora_in(dropout) as n:
        assert n == 0  # LoRA dropout draws a mask over the input: PEFT's path
    with fused_lora_in(_lora_model(tiny_model, tmp_path), enabled=False) as n:
        assert n == 0


def test_training_with_the_fused_linear_equals_peft_training(tiny_model, tmp_path):
    """Same seed, fp32: the loop with train.fused_lora on and off ends at the same weights (within float rounding)."""
    import strop
    from conftest import tiny_overrides

    src = write_csv(tmp_path / "train.csv", toy_rows(40, seed=2))
    runs = {}
    for fused in (True, False):
        over = {"data.train": src, "peft.method": "lora", "train.epochs": 2, "train.precision": "fp32",
                "train.lr": 5e-3, "train.fused_lora": fused, "name": f"fused-{fused}"}
        runs[fused] = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **over))
    a, b = (r.results["validation"] for r in (runs[True], runs[False]))
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-4) and a["accuracy"] == b["accuracy"]
    from safetensors.torch import load_file

    wa, wb = (load_file(str(r.model_dir / "model.safetensors")) for r in (runs[True], runs[False]))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
