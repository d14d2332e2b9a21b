"""AdamW with decoupled weight decay on weights only, and warmup + decay schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from strop.models.peft import is_head, is_norm


def param_groups(model: nn.Module, weight_decay: float, lr: float, head_lr: float | None = None,
                 lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Split trainable parameters into decay / no-decay groups (biases and LayerNorm weights get no decay),
    give the task head its own learning rate when `head_lr` is set, and multiply the learning rate of parameters
    whose dotted name has a part in `lr_scales` (LoRA+: {"lora_B": 16})."""
    groups: dict[tuple[bool, bool, float], list] = {}
    # any normalisation layer (LayerNorm, RMSNorm, ...) keeps its scale free of decay
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or id(p) in norm_params or name.endswith(".bias")
        head = head_lr is not None and is_head(name)  # also under PEFT's wrappers (base_model.model.classifier...)
        scale = next((v for k, v in (lr_scales or {}).items() if k in name.split(".")), 1.0)
        groups.setdefault((no_decay, head, scale), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if no_decay else weight_decay,
             "lr": (head_lr if head else lr) * scale} for (no_decay, head, scale), ps in sorted(groups.items())]


def build_optimizer(model: nn.Module, cfg, lr_scales: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only; fused kernels where this torch offers them on the device."""
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.head_lr, lr_scales)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`warmup` < 1 is a fraction of all steps, else a number of steps."""
    return int(math.ceil(warmup * total_steps)) if warmup < 1 else int(warmup)


def build_scheduler(optimizer, kind: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the peak lr over `warmup` steps, then linear/cosine decay to 0 or constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
