"""A fused LoRA linear for training: the same math as PEFT's `lora.Linear` forward in fewer kernels.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate modules, so each adapted layer runs a
cast of x per branch, a scaling multiply and an add, and autocast re-casts the frozen base weight on every call
(its cast cache only keeps weights that require gradients). Profiled on a LoRA training step of the default
model, those extra element-wise kernels took about a sixth of the step (DECISIONS.md, "Fused LoRA linear").

Here one autograd Function does `y = x W^T + b; y += scaling * (x A^T) B^T` with the second product accumulated
into `y` by addmm (no separate multiply or add), casts x once, and takes the frozen W from a copy cast once to the
compute dtype when the block starts. Backward computes only what is trainable: dX = dY W + scaling (dY B) A,
dA = scaling (dY B)^T X, dB = scaling dY^T (X A^T), db = sum(dY) when the bias trains. The module tree and its
parameters are PEFT's own, so saving, merging and loading are untouched; the block puts PEFT's forward back.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        xa = x2 @ a.t()  # (tokens, r)
        y = torch.addmm(bias.to(dtype), x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, a, b, xa)
        ctx.scaling, ctx.shape, ctx.has_bias = scaling, shape, bias is not None
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, a, b, xa = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        gb = g @ b  # (tokens, r)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(gb, a, alpha=s).view(ctx.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        grad_a = (gb.t() @ x2).mul_(s) if ctx.needs_input_grad[3] else None
        grad_b = (g.t() @ xa).mul_(s) if ctx.needs_input_grad[4] else None
        # gradients in the compute dtype: autograd casts each to its input's dtype (fp32 parameters)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _fusable(m: nn.Module) -> bool:
    """A PEFT LoRA Linear in the plain case: one active adapter, unmerged, no DoRA/variant, no LoRA dropout, a
    frozen nn.Linear base."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return False
    if type(m) is not LoraLinear or m.merged or m.disable_adapters or len(m.active_adapters) != 1:
        return False
    name = m.active_adapters[0]
    return (name in m.lora_A and name not in getattr(m, "lora_variant", {}) and isinstance(m.base_layer, nn.Linear)
            and not m.base_layer.weight.requires_grad and isinstance(m.lora_dropout[name], nn.Identity))


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs:  # PEFT's extras (adapter_names, variant arguments): its own forward
        return self._strop_peft_forward(x, *args, **kwargs)
    name, device = self.active_adapters[0], x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    weight = self._strop_weights.get(dtype)
    if weight is None:  # frozen: cast once per dtype for the whole block
        weight = self._strop_weights[dtype] = self.base_layer.weight.detach().to(dtype)
    with torch.autocast(device, enabled=False):  # the Function casts once itself
        return _LoraLinearFn.apply(x, weight, self.base_layer.bias, self.lora_A[name].weight,
                                   self.lora_B[name].weight, float(self.scaling[name]), dtype)


@contextlib.contextmanager
def fused_lora_in(model: nn.Module, enabled: bool = True):
    """Within the block, every plain PEFT LoRA Linear of `model` runs the fused forward; PEFT's is put back after."""
    patched = [m for m in model.modules() if _fusable(m)] if enabled else []
    for m in patched:
        m._strop_peft_forward, m._strop_weights = m.forward, {}
        m.forward = types.MethodType(_fused_forward, m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward, m._strop_weights, m._strop_peft_forward
