"""Skip the work no output reads: the last encoder layer of a first-token classifier computed for that token only.

A BERT-family sequence classifier (`BertForSequenceClassification`, RoBERTa, XLM-R, ELECTRA) reads the last layer's
output at position 0 only (the pooler / classification head takes `hidden[:, 0]`). The other positions of the last
layer still need their keys and values (the first token attends to them) but not their queries, attention output,
feed-forward block or layer norms: about 10 of the layer's 12 h^2 matmul FLOPs per token, a sixth of a 6-layer
model's, in the forward and the backward pass. `first_token_only(model)` runs that layer so, with the layer's own
modules (LoRA, adapters and fast dropout included) and the model's own attention function: the same math, the
logits equal to rounding (tested). Everything else (saved weights, ONNX export, explanations that read every
layer's attentions) sees the unchanged model, because the layer's `forward` is only replaced inside the block.
"""

from __future__ import annotations

import contextlib
import types

from torch import nn

# heads that read the last hidden state at position 0 only (and nothing else of it)
FIRST_TOKEN_HEADS = frozenset({"BertForSequenceClassification", "RobertaForSequenceClassification",
                               "XLMRobertaForSequenceClassification", "ElectraForSequenceClassification",
                               "CamembertForSequenceClassification"})


def _is_first_token_head(cls: type) -> bool:
    """transformers' own class (a subclass, say from remote code, may read more than position 0), or FSDP2's
    wrapper class around it (named FSDP<name>)."""
    for c in cls.__mro__:
        if c.__name__ in FIRST_TOKEN_HEADS and c.__module__.startswith("transformers.models."):
            return cls is c or cls.__name__ == f"FSDP{c.__name__}"
    return False


def first_token_layer(model: nn.Module) -> nn.Module | None:
    """The last encoder layer of the first-token classifier inside `model` (PEFT wrappers included), when it has
    the BERT layer layout this module knows; else None (also for a model that is no nn.Module: ONNX Runtime's)."""
    for m in model.modules() if isinstance(model, nn.Module) else ():
        if not _is_first_token_head(type(m)):
            continue
        config = m.config
        if config.is_decoder or getattr(config, "add_cross_attention", False) or \
                getattr(config, "position_embedding_type", "absolute") != "absolute":
            return None
        base = getattr(m, m.base_model_prefix, None)
        layers = getattr(getattr(base, "encoder", None), "layer", None)
        if not layers:
            return None
        layer = layers[-1]
        attention = getattr(layer, "attention", None)
        self_attention = getattr(attention, "self", None)
        if not all(hasattr(self_attention, a) for a in ("query", "key", "value", "attention_head_size", "scaling")) \
                or not all(hasattr(layer, a) for a in ("intermediate", "output")) \
                or not hasattr(attention, "output") or getattr(layer, "chunk_size_feed_forward", 0):
            return None
        return layer
    return None


def _first_token_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """BertLayer.forward for the first position only: its query against every key, then attention output, FFN and
    layer norms on that one row. Returns (batch, 1, hidden)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    attention = self.attention
    sa = attention.self
    batch, length, _ = hidden_states.shape
    first = hidden_states[:, :1]
    size = sa.attention_head_size
    query = sa.query(first).view(batch, 1, -1, size).transpose(1, 2)
    key = sa.key(hidden_states).view(batch, length, -1, size).transpose(1, 2)
    value = sa.value(hidden_states).view(batch, length, -1, size).transpose(1, 2)
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[-2] > 1:
        mask = mask[:, :, :1, :]  # the first query's row of a (batch, 1, queries, keys) mask
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, eager_attention_forward)
    context, _ = attend(sa, query, key, value, mask, dropout=sa.dropout.p if sa.training else 0.0,
                        scaling=sa.scaling)
    attended = attention.output(context.reshape(batch, 1, -1), first)
    return self.output(self.intermediate(attended), attended)


def applies_to(model: nn.Module) -> bool:
    return first_token_layer(model) is not None


def first_token_only(model: nn.Module, enabled: bool = True):
    """Within the block, a first-token classifier's last layer computes position 0 only (see the module doc);
    other models are left as they are."""
    return computing_first_token(first_token_layer(model) if enabled else None)


@contextlib.contextmanager
def computing_first_token(layer: nn.Module | None):
    """first_token_only for a layer found once with first_token_layer (None: nothing changes), so a loop over
    batches does not search the model each time."""
    if layer is None or "forward" in vars(layer):
        yield
        return
    layer.forward = types.MethodType(_first_token_forward, layer)
    try:
        yield
    finally:
        # pop, not del: two serving threads entering at once may both have set it (either forward gives the same
        # logits, so the one that restores first changes only the other's speed)
        vars(layer).pop("forward", None)
