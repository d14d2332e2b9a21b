"""AdamW with decoupled weight decay on weights only, and warmup + decay schedules."""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

from strop.models.layers import head_names, under
from strop.models.peft import is_norm

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float, lr: float, head_lr: float | None = None,
                 lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Split trainable parameters into decay / no-decay groups (biases and LayerNorm weights get no decay),
    give the task head its own learning rate when `head_lr` is set, and multiply the learning rate of parameters
    whose dotted name has a part in `lr_scales` (LoRA+: {"lora_B": 16})."""
    groups: dict[tuple[bool, bool, float], list] = {}
    # any normalisation layer (LayerNorm, RMSNorm, ...) keeps its scale free of decay
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    heads = head_names(model)  # also under PEFT's wrappers (base_model.model.classifier...)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or id(p) in norm_params or name.endswith(".bias")
        head = head_lr is not None and under(name, heads)
        scale = next((v for k, v in (lr_scales or {}).items() if k in name.split(".")), 1.0)
        groups.setdefault((no_decay, head, scale), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if no_decay else weight_decay,
             "lr": (head_lr if head else lr) * scale} for (no_decay, head, scale), ps in sorted(groups.items())]


class AdamW(torch.optim.AdamW):
    """torch's AdamW, plus lazy row updates for parameters whose gradient is sparse (a word-embedding matrix under
    model.sparse_embeddings): only the rows the batch looked up get the step (moments, decay, update), as in
    TensorFlow's LazyAdam and torch's SparseAdam, but with AdamW's decoupled weight decay. The moments live in the
    usual `exp_avg` / `exp_avg_sq` state (checkpointed with the rest); bias correction counts the parameter's steps.
    Dense parameters take torch's own (fused) step unchanged."""

    def step(self, closure=None):
        lazy = [(group, p) for group in self.param_groups for p in group["params"]
                if p.grad is not None and p.grad.is_sparse]
        grads = [p.grad for _, p in lazy]
        for _, p in lazy:
            p.grad = None  # torch's step skips parameters without a gradient
        try:
            loss = super().step(closure)
        finally:
            for (_, p), g in zip(lazy, grads):
                p.grad = g
        with torch.no_grad():
            for (group, p), g in zip(lazy, grads):
                self._lazy_rows(group, p, g.coalesce())
        return loss

    def _lazy_rows(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        rows, g = grad.indices()[0], grad.values().to(p.dtype)
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        m = state["exp_avg"].index_select(0, rows).lerp_(g, 1 - beta1)
        v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        updated = p.index_select(0, rows).mul_(1 - lr * group["weight_decay"])
        updated.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
        p.index_copy_(0, rows, updated)


def build_optimizer(model: nn.Module, cfg, lr_scales: dict[str, float] | None = None,
                    lazy_rows: bool = True) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only; fused kernels where this torch offers them on the device. `lazy_rows`:
    strop's AdamW (sparse gradients get lazy row steps); False = torch's own class, which DeepSpeed's ZeRO requires
    (it accepts only optimizer types it knows, and its gradients are dense)."""
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.head_lr, lr_scales)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    cls = AdamW if lazy_rows else torch.optim.AdamW
    try:
        return cls(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return cls(groups, foreach=True, **kwargs)


@contextlib.contextmanager
def sparse_embeddings_in(model: nn.Module, enabled: bool, engine: str = "ddp", world: int = 1):
    """Within the block, the word-embedding lookup of `model` gives sparse gradients (model.sparse_embeddings), which
    AdamW above turns into lazy row updates. Left dense where that cannot work or gains nothing: embeddings that are
    frozen or tied to an output layer (its gradient is dense anyway), and FSDP / DeepSpeed, which shard dense
    gradients only (DDP all-reduces sparse ones). Enter it before wrapping the model in DDP."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        words = get() if enabled and callable(get) else None
    except NotImplementedError:  # transformers' vision models without token embeddings (ConvNeXt, ResNet)
        words = None
    if not isinstance(words, nn.Embedding) or not words.weight.requires_grad or words.sparse:
        yield False
        return
    if sum(p is words.weight for m in model.modules() for p in m.parameters(recurse=False)) > 1:
        yield False  # tied (a language-model head): dense gradients reach it anyway
        return
    if world > 1 and engine != "ddp":
        log.info("model.sparse_embeddings: train.distributed=%s shards dense gradients only; the word embeddings "
                 "train densely", engine)
        yield False
        return
    words.sparse = True
    try:
        yield True
    finally:
        words.sparse = False


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (returns the total L2 norm before clipping), also over sparse gradients (coalesced
    in place, so repeated rows count once with their summed gradient, as in the dense gradient)."""
    sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
    if not sparse:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    dense = [p for p in params if p.grad is not None and not p.grad.is_sparse]
    for p in sparse:
        p.grad = p.grad.coalesce()
    norms = [torch.linalg.vector_norm(p.grad.values(), dtype=torch.float32) for p in sparse]
    if dense:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in dense]).float())
    total = torch.linalg.vector_norm(torch.stack(norms))
    if dense:
        torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in sparse:
        p.grad.values().mul_(coef.to(p.grad.dtype))
    return total


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
