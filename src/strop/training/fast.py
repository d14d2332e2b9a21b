"""Training speed-ups that keep the math: a cheaper dropout mask and an allocator that stops page-faulting.

Both were found by profiling a CPU training step of the default model (DECISIONS.md, "Faster CPU training steps"):
- torch's dropout draws one 32-bit number per element (on non-Intel CPUs ATen's bernoulli_ has no vectorised path),
  about 12% of a step on this machine; `fast_dropout` draws one 64-bit number per three elements instead.
- glibc serves allocations over its mmap threshold (at most 32 MiB) with fresh pages every step, so the
  word-embedding gradient (30522 x 384 floats) is page-faulted in on each backward pass; `tune_allocator` keeps
  such blocks in the heap for reuse.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

import torch
from torch import nn

_LEVELS = 65536  # keep-probability resolution of fast_dropout: p is rounded to a multiple of 1/65536


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, saving the boolean mask (1 byte per element) rather than a float copy for backward."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def keep_mask(shape, p: float, device) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask with P(keep) = 1 - q, q = p rounded to a multiple of 1/65536, and the scale 1 / (1 - q).

    Each 64-bit draw of torch's generator (seeded by torch.manual_seed, saved in checkpoints) gives three independent
    16-bit uniforms (its top 16 bits are not used: int64 random_ leaves the sign bit 0)."""
    n = 1
    for d in shape:
        n *= d
    drop = round(p * _LEVELS)
    bits = torch.empty((n + 2) // 3, dtype=torch.int64, device=device).random_()
    u = bits.view(torch.int16).view(-1, 4)[:, :3]  # little-endian: the low 48 bits, uniform in [-32768, 32767]
    keep = (u >= drop - _LEVELS // 2).reshape(-1)[:n].view(shape)
    return keep, _LEVELS / (_LEVELS - drop)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout like torch.nn.functional.dropout, with the mask from keep_mask."""
    if not training or p <= 0:
        return x
    if p >= 1:
        return x * 0
    if sys.byteorder != "little":  # the int16 view of the 64-bit draws assumes it
        return nn.functional.dropout(x, p, True)
    keep, scale = keep_mask(x.shape, p, x.device)
    return _MaskedScale.apply(x, keep, scale)


class FastDropout(nn.Dropout):
    """nn.Dropout with fast_dropout's mask (same p, same place in the model; no parameters or state)."""

    def forward(self, x):
        return fast_dropout(x, self.p, self.training)


def attention_with_fast_dropout(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (AttentionInterface): with dropout in training, softmax(QK^T * s + mask),
    fast_dropout, times V (the eager formula); otherwise torch's scaled_dot_product_attention as `sdpa` does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not module.training or not dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                      **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = fast_dropout(nn.functional.softmax(weights, dim=-1), dropout, True)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


ATTENTION_NAME = "strop_fast_dropout"


def register_attention(name: str, attention) -> bool:
    """Register `attention` as a transformers attention function under `name`, fed the masks `sdpa` gets
    (boolean, or None). False where transformers has no AttentionInterface."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return True


def sdpa_configs(model: nn.Module) -> list:
    """The transformers configs inside `model` that run the `sdpa` attention (those fast dropout can take over)."""
    found, seen = [], set()
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and id(config) not in seen and getattr(config, "_attn_implementation", None) == "sdpa":
            seen.add(id(config))
            found.append(config)
    return found


@contextlib.contextmanager
def dropout_swapped(model: nn.Module, dropout_cls: type, replaces: tuple, attention_name: str, attention):
    """Within the block, every module of `model` whose type is in `replaces` is a `dropout_cls` (same p and mode),
    and transformers models that use `sdpa` attention run `attention` (registered as `attention_name`); both are
    put back afterwards, so saved models are unchanged."""
    swapped = []
    for m in model.modules():
        for name, child in m.named_children():
            if type(child) in replaces:
                new = dropout_cls(child.p, child.inplace)
                new.train(child.training)
                setattr(m, name, new)
                swapped.append((m, name, child))
    configs = sdpa_configs(model) if register_attention(attention_name, attention) else []
    for config in configs:
        config._attn_implementation = attention_name
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"
        for m, name, child in swapped:
            child.train(getattr(m, name).training)
            setattr(m, name, child)


@contextlib.contextmanager
def fast_dropout_in(model: nn.Module, enabled: bool = True):
    """Within the block, every nn.Dropout in `model` draws fast_dropout's masks, and transformers models that use
    `sdpa` attention run attention_with_fast_dropout; both are put back afterwards (saved models are unchanged)."""
    if not enabled:
        yield
        return
    with dropout_swapped(model, FastDropout, (nn.Dropout,), ATTENTION_NAME, attention_with_fast_dropout):
        yield


_TUNED = False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_DEFAULT = 128 * 1024  # both thresholds' glibc defaults


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  musl and others have neither
        return libc
    except (OSError, AttributeError):
        return None


def tune_allocator() -> bool:
    """Keep large freed blocks in glibc's heap (mmap threshold 1 GiB, trim threshold 2 GiB) so that per-step
    buffers such as the embedding gradient are reused instead of page-faulted in again. Process-wide; glibc only
    (a no-op elsewhere). Returns whether the settings were applied. Prefer `tuned_allocator`, which undoes it."""
    global _TUNED
    if _TUNED:
        return True
    libc = _libc()
    if libc is None:
        return False
    _TUNED = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31))
    return _TUNED


def untune_allocator() -> None:
    """Back to glibc's thresholds (128 KiB) and hand the kept free pages to the OS. After training, the same
    settings would let every differently shaped evaluation or explanation batch grow the heap past what it needs
    (measured: +80-100 MB over an SST-2 final evaluation and report)."""
    global _TUNED
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
    libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
    _TUNED = False
    release_memory()


@contextlib.contextmanager
def tuned_allocator(enabled: bool = True):
    """`tune_allocator` for the duration of a training loop, then glibc's own settings again (`untune_allocator`).
    Nested in an outer tuned region (a probe or a trial inside a tuned caller), it leaves the tuning to the outer one."""
    outer = _TUNED
    if not (enabled and tune_allocator()):
        yield False
        return
    try:
        yield True
    finally:
        if not outer:
            untune_allocator()


def release_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; `tune_allocator` keeps them during training).
    Call between phases: what training freed is then not counted again under the next phase's peak. Returns whether
    anything was released; a no-op off glibc. No `gc.collect()`: tensors are freed by reference counting, and a full
    collection in a long-lived process (a notebook, the test suite) took seconds per call."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
