"""Where things are inside a model, for any architecture: its stack of transformer layers and its task head.

The head is what a task's `head_names` name (strop.tasks); `mark_heads` flags those modules when the model is built,
so PEFT's all-linear never wraps them, the optimizer can give them their own learning rate, and adapters save them,
whatever wrapper (PEFT's, DDP's) the model is later inside: the flag travels with the module (and PEFT's copies)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from strop.errors import ModelError

HEAD_FLAG = "_strop_head"


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The stack of layers: the ModuleList as long as config.num_hidden_layers (a transformer's layers;
    a ConvNeXt's stages), or as config.depths (the stages of a CNN whose config counts blocks per stage:
    ResNet)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None) or len(getattr(config, "depths", None) or []) or None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ModelError("cannot find this model's list of transformer layers")


def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's input layer: what get_input_embeddings() names (word embeddings, a ViT's patch embedding,
    strop's EfficientNet stem convolution), else the first module with weights of its own (the patch or stem
    convolution of a vision model that names none, e.g. ConvNeXt or ResNet)."""
    try:
        found = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # transformers raises for models without token embeddings
        found = None
    if isinstance(found, nn.Module):
        return found
    return next(m for m in model.modules() if any(True for _ in m.parameters(recurse=False)))


def mark_heads(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """Flag the model's direct children called `names` (those it has) as its task head."""
    for name in names:
        child = getattr(model, name, None)
        if isinstance(child, nn.Module):
            setattr(child, HEAD_FLAG, True)
    return model


def head_names(model: nn.Module) -> list[str]:
    """Full names of the modules flagged as the head, outermost only (PEFT's copies of a head included)."""
    found = [n for n, m in model.named_modules() if getattr(m, HEAD_FLAG, False)]
    return [n for n in found if not any(n != h and under(n, [h]) for h in found)]


def under(name: str, prefixes: list[str]) -> bool:
    """Whether the dotted `name` is one of `prefixes` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@contextlib.contextmanager
def output_positions(model: nn.Module, keep: torch.Tensor):
    """While active, the language model `model`'s output layer computes logits only at the positions
    `keep` ((batch, sequence) bool): the model returns (kept positions, vocabulary) instead of (batch,
    sequence, vocabulary). That layer is as wide as the vocabulary, the model's largest matmul, and a loss
    reads a few positions. A pre-hook on the output embedding: it works through PEFT and DDP wrappers."""
    inner = model.module if hasattr(model, "module") else model  # DDP
    head = inner.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][keep],) + tuple(args[1:]))
    try:
        yield
    finally:
        handle.remove()


def scored_positions(model: nn.Module, labels: torch.Tensor):
    """`output_positions` of a causal LM where the next token is scored (`labels[:, 1:] != -100`)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return output_positions(model, keep)
