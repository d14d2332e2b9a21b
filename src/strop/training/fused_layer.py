"""Fused element-wise work of BERT-family encoder layers for CPU training: fewer passes over memory, cheap dropout.

A profile of a CPU training step of the default model (BENCHMARKS.md, issue 6) leaves about 40% of the time outside
the matmuls, which already run at the core's bf16 peak. Most of that 40% is element-wise work that eager PyTorch does
one pass at a time: dropout masks (ATen's `bernoulli_` draws one Mersenne-Twister number per element, about 9 ns per
element here), the scale, the residual add, dtype casts, layer norm, softmax. Inside `fused_layers_in`, each stock
encoder layer of a BERT-layout model runs its own Linear modules (so LoRA, adapters and fused LoRA still apply) and
hands the work between them to two C++ kernels (fused_kernels.cpp):

- softmax(QK^T * scale, masked) + attention dropout, written in the matmul's dtype;
- dropout + residual add + LayerNorm, after the attention output and after the feed-forward output, written in fp32
  and, under autocast, also in bf16 for the next matmuls (so autocast has nothing to cast).

Dropout keeps each element with probability 1 - p (to 2^-32) and scales it by 1 / (1 - p), as nn.Dropout does, but
its mask is a counter-based hash (murmur3's 32-bit finaliser, twice) of the element's flat index, keyed by two 32-bit
seeds drawn from torch's generator per call. So a mask costs a few vector instructions per element and is recomputed
in the backward pass instead of stored. Every other nn.Dropout of the model, and the attention of a layer that is
not fused (first_token_only's), draw hashed masks too. The distribution is the same; the random stream differs from
torch's, so a run is reproducible with itself (same seed, same masks; a resumed run draws the same seeds) but not
bit-for-bit with a run without the kernels. With dropout off, outputs and gradients equal the stock layer's to
rounding (tests/test_fused_layer.py).

The kernels are built with the machine's C++ compiler on first use (torch.utils.cpp_extension, about 35 s, then
cached). Where that fails (no compiler), the block warns once and trains with the stock layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import types
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# transformers' BERT-layout encoder layers (same submodule names and post-LN order)
LAYER_CLASSES = frozenset({"BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer", "CamembertLayer"})
SOURCE = Path(__file__).with_name("fused_kernels.cpp")

_ops = None
_failure: list[str] = []


def _build_flags() -> list[str]:
    # -fopenmp: at::parallel_for is a header template that runs its chunks in an OpenMP parallel region compiled into
    # the caller, so without it every kernel runs on one thread. The extension then links libgomp.so.1, which
    # resolves to the copy torch already loaded (one OpenMP runtime, one thread pool, torch.set_num_threads applies).
    return ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]


def kernels():
    """The compiled kernels (torch.utils.cpp_extension, built on first use with this machine's C++ compiler, about
    30 s, then loaded from torch's extension cache), or None when they cannot be built here (warned once)."""
    global _ops
    if _ops is not None or _failure:
        return _ops
    try:
        from torch.utils.cpp_extension import load

        # the build is specific to this CPU (-march=native) and this source: both name the cached build
        cpu = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
        flags = next((line for line in cpu.splitlines() if line.startswith("flags")), "")
        key = hashlib.sha256((SOURCE.read_text() + flags + torch.__version__ + " ".join(_build_flags())).encode())
        _ops = load(name=f"strop_fused_{key.hexdigest()[:12]}", sources=[str(SOURCE)], extra_cflags=_build_flags(),
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001  any build failure means: train with the stock layers
        _failure.append(f"{type(e).__name__}: {e}")
        log.warning("train.fused_kernels: the fused CPU kernels could not be built here (%s); training with the "
                    "stock layers. Install a C++ compiler (g++) and ninja for the faster path, or set "
                    "train.fused_kernels=false to silence this.", _failure[0][-600:])
    return _ops


def _seeds(n: int) -> list[int]:
    """n 32-bit seeds from torch's generator (so torch.manual_seed and saved RNG states govern the masks)."""
    return torch.randint(0, 2 ** 32, (n,), dtype=torch.int64).tolist()


class DropoutAddNorm(torch.autograd.Function):
    """LayerNorm(dropout(x) + residual): returns the fp32 result and, when x is lower precision, the same in x's
    dtype (what the next matmul reads under autocast), else None."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, s0: int, s1: int, p: float, eps: float):
        out, low, y, mean, rstd = _ops.dropout_add_norm_fwd(x.contiguous(), residual.contiguous().float(),
                                                            weight.float(), bias.float(), s0, s1, p, eps)
        ctx.save_for_backward(y, mean, rstd, weight)
        ctx.args = (s0, s1, p, x.dtype, residual.dtype, weight.dtype)
        return out, low  # low: None when x is fp32

    @staticmethod
    def backward(ctx, g, g_low):
        y, mean, rstd, weight = ctx.saved_tensors
        s0, s1, p, x_dtype, r_dtype, w_dtype = ctx.args
        dx, dres, dw, db = _ops.dropout_add_norm_bwd(g, g_low, y, mean, rstd, weight.float(), s0, s1, p, x_dtype)
        return dx, dres.to(r_dtype), dw.to(w_dtype), db.to(w_dtype), None, None, None, None


class SoftmaxDropout(torch.autograd.Function):
    """dropout(softmax(scores * scaling, masked)) in scores' dtype; `mask` bool (batch, 1 or queries, keys) or None."""

    @staticmethod
    def forward(ctx, scores, mask, s0: int, s1: int, scaling: float, p: float):
        dropped, probs = _ops.softmax_dropout_fwd(scores.contiguous(), mask, s0, s1, scaling, p)
        ctx.save_for_backward(probs)
        ctx.args = (s0, s1, scaling, p, scores.dtype)
        return dropped

    @staticmethod
    def backward(ctx, g):
        (probs,) = ctx.saved_tensors
        s0, s1, scaling, p, dtype = ctx.args
        return _ops.softmax_dropout_bwd(g, probs, s0, s1, scaling, p, dtype), None, None, None, None, None


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s0: int, s1: int, p: float):
        ctx.args = (s0, s1, p)
        return _ops.dropout_apply(x, s0, s1, p)

    @staticmethod
    def backward(ctx, g):
        s0, s1, p = ctx.args
        return _ops.dropout_apply(g, s0, s1, p), None, None, None


def hashed_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout (as nn.functional.dropout in training) with the hashed mask."""
    if p <= 0:
        return x
    s0, s1 = _seeds(2)
    return _Dropout.apply(x, s0, s1, float(p))


def _bool_mask(mask: torch.Tensor | None, batch: int, queries: int, keys: int) -> torch.Tensor | None:
    """transformers' attention mask (boolean True = attend, or additive float: 0 = attend) as the kernel's
    bool (batch, 1 or queries, keys), or None when every position attends."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        mask = mask == 0
    mask = mask.expand(batch, 1, mask.shape[-2], keys) if mask.dim() == 4 else mask.view(batch, 1, -1, keys)
    return mask.reshape(batch, mask.shape[-2], keys)


def attend(sa: nn.Module, query, key, value, attention_mask, dropout: float, scaling: float):
    """softmax(QK^T * scaling, masked), hashed dropout, times V; (batch, queries, heads * head size)."""
    batch, _, queries, _ = query.shape
    s0, s1 = _seeds(2)
    scores = torch.matmul(query, key.transpose(2, 3))
    probs = SoftmaxDropout.apply(scores, _bool_mask(attention_mask, batch, queries, key.shape[2]), s0, s1,
                                 float(scaling), float(dropout))
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).reshape(batch, queries, -1)


def fused_layer_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """BertLayer.forward in training through the fused kernels (module doc). The low-precision copy of the output
    rides on the output tensor (`_strop_low`), so the next fused layer's matmuls need not cast it again."""
    attention, sa = self.attention, self.attention.self
    batch, length, _ = hidden_states.shape
    x = getattr(hidden_states, "_strop_low", None)
    x = hidden_states if x is None else x
    shape = (batch, length, -1, sa.attention_head_size)
    query = sa.query(x).view(shape).transpose(1, 2)
    key = sa.key(x).view(shape).transpose(1, 2)
    value = sa.value(x).view(shape).transpose(1, 2)
    context = attend(sa, query, key, value, attention_mask, sa.dropout.p, sa.scaling)
    s = _seeds(4)
    out = attention.output
    norm = out.LayerNorm
    attended, attended_low = DropoutAddNorm.apply(out.dense(context), hidden_states, norm.weight, norm.bias, s[0],
                                                  s[1], float(out.dropout.p), float(norm.eps))
    h = self.intermediate(attended if attended_low is None else attended_low)
    out = self.output
    norm = out.LayerNorm
    result, result_low = DropoutAddNorm.apply(out.dense(h), attended, norm.weight, norm.bias, s[2], s[3],
                                              float(out.dropout.p), float(norm.eps))
    if result_low is not None:
        result._strop_low = result_low
    return result


class HashDropout(nn.Dropout):
    """nn.Dropout with the hashed mask (module doc): same p, same place, no state."""

    def forward(self, x):
        return hashed_dropout(x, self.p) if self.training else x


def fused_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (AttentionInterface) for training: the fused softmax + hashed dropout. In
    evaluation (or without dropout) torch's scaled_dot_product_attention, as `sdpa` does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not module.training or not dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                      **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    return attend(module, query, key, value, attention_mask, dropout, scaling).contiguous(), None


ATTENTION_NAME = "strop_fused"


def _fusable(layer: nn.Module) -> bool:
    """A stock BERT-layout encoder layer of transformers (not a subclass, no hooks on its parts), self-attention only,
    absolute positions, no chunked feed-forward."""
    if type(layer).__name__ not in LAYER_CLASSES or not type(layer).__module__.startswith("transformers.models."):
        return False
    attention = getattr(layer, "attention", None)
    sa = getattr(attention, "self", None)
    config = getattr(sa, "config", None)
    if config is None or getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False) or \
            getattr(config, "position_embedding_type", "absolute") != "absolute" or \
            getattr(layer, "chunk_size_feed_forward", 0):
        return False
    parts = [attention, sa, attention.output, layer.intermediate, layer.output]
    if any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in [layer, *parts]):
        return False
    norms = [attention.output.LayerNorm, layer.output.LayerNorm]
    dropouts = [sa.dropout, attention.output.dropout, layer.output.dropout]
    return all(type(n) is nn.LayerNorm and n.elementwise_affine and n.bias is not None for n in norms) and \
        all(isinstance(d, nn.Dropout) for d in dropouts)


def fusable_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _fusable(m)] if isinstance(model, nn.Module) else []


@contextlib.contextmanager
def fused_layers_in(model: nn.Module, enabled: bool = True, skip: nn.Module | None = None):
    """Within the block, the fusable encoder layers of `model` (except `skip`, e.g. a layer first_token_only runs)
    run fused_layer_forward while in training mode, the stock forward otherwise. Yields the number fused."""
    layers = [m for m in fusable_layers(model) if m is not skip] if enabled else []
    if not layers or kernels() is None:
        yield 0
        return
    from strop.training.fast import FastDropout, dropout_swapped

    def forward(self, *args, **kwargs):
        impl = fused_layer_forward if self.training else type(self).forward
        return impl(self, *args, **kwargs)

    for layer in layers:
        layer.forward = types.MethodType(forward, layer)
    try:  # every other dropout of the model (embeddings, head, unfused layers) draws hashed masks too
        with dropout_swapped(model, HashDropout, (nn.Dropout, FastDropout), ATTENTION_NAME, fused_attention):
            yield len(layers)
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)
