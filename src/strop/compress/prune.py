"""Pruning: magnitude (unstructured) zeroing, and structured removal of attention heads and FFN neurons.

Unstructured pruning zeroes the smallest weights but keeps every matrix dense, so it saves no time and no disk space
with dense kernels; it only says how much of the weights the task can do without. Structured pruning removes whole
heads / FFN neurons, so the matrices really shrink and every forward pass does less work.

Layout: BERT-style encoders (BERT, RoBERTa, ELECTRA, XLM-R, MiniLM ...), whose layers hold
attention.self.{query,key,value}, attention.output.dense, intermediate.dense and output.dense.
The same number of heads / neurons is kept in every layer, so the config still describes the model: FFN pruning
sets `intermediate_size` (plain transformers loads it); transformers 5 dropped `pruned_heads`, so a head-pruned model
records `attention_heads_kept` in strop.json and loads with strop (`load_pruned`), or as ONNX.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from strop.errors import ExportError


def base_of(model: nn.Module) -> nn.Module:
    """The encoder model inside a classifier (BertModel for BertForSequenceClassification or MeanPoolClassifier)."""
    return model.backbone if hasattr(model, "backbone") else model.base_model


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of a BERT-style classifier; a clear error for other layouts."""
    base = base_of(model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    arch = getattr(model.config, "model_type", type(model).__name__)
    if layers is None or not all(hasattr(layer, "attention") and hasattr(getattr(layer.attention, "self", None),
                                                                         "query") and hasattr(layer, "intermediate")
                                 for layer in layers):
        raise ExportError(f"pruning and distillation support BERT-style encoders (bert, roberta, electra, "
                          f"xlm-roberta, ...); this model's architecture {arch!r} has another layer layout")
    return list(layers)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """Every nn.Linear inside the encoder layers (attention and FFN); embeddings and head are left alone."""
    return [m for layer in encoder_layers(model) for m in layer.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float) -> float:
    """Zero the `sparsity` share of smallest-|w| weights in each encoder Linear; returns the achieved sparsity."""
    if not 0 <= sparsity < 1:
        raise ExportError(f"--prune magnitude={sparsity}: sparsity must be in [0, 1), e.g. magnitude=0.5")
    zeros = total = 0
    for linear in linear_layers(model):
        w = linear.weight
        k = int(sparsity * w.numel())
        if k:
            cut = w.abs().flatten().kthvalue(k).values
            w.masked_fill_(w.abs() <= cut, 0.0)
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / total


def sparsity_of(model: nn.Module) -> float:
    """Share of exactly-zero weights in the encoder Linear layers."""
    ws = [m.weight for m in linear_layers(model)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    out.weight = nn.Parameter(weight.contiguous().clone())
    if bias is not None:
        out.bias = nn.Parameter(bias.contiguous().clone())
    return out


def _rows(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """Keep output features `keep` of `linear`."""
    return _linear(linear.weight[keep], linear.bias[keep] if linear.bias is not None else None)


def _cols(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """Keep input features `keep` of `linear`."""
    return _linear(linear.weight[:, keep], linear.bias)


def _head_norms(weight: torch.Tensor, d: int) -> torch.Tensor:
    """Squared L2 norm per head of a (heads * d, hidden) weight -> (heads,)."""
    return weight.reshape(-1, d, weight.shape[-1]).pow(2).sum((1, 2))


def n_heads(layer: nn.Module) -> int:
    att = layer.attention.self
    return att.query.out_features // att.attention_head_size


def ffn_size(layer: nn.Module) -> int:
    """FFN neurons of one layer (intermediate_size)."""
    return layer.intermediate.dense.out_features


def keep_count(kind: str, fraction: float, total: int, what: str) -> int:
    """How many of `total` heads / neurons per layer `--prune kind=fraction` keeps (round(fraction * total) go);
    an error when the fraction is out of [0, 1) or would remove all of them."""
    if not 0 <= fraction < 1:
        raise ExportError(f"--prune {kind}={fraction}: must be a fraction in [0, 1), e.g. {kind}=0.5")
    keep_n = total - round(fraction * total)
    if keep_n < 1:
        most = math.floor(1000 * (total - 1) / total) / 1000  # 3 decimals, rounded down so that it keeps one
        raise ExportError(f"--prune {kind}={fraction} would remove all {total} {what} of every layer "
                          f"(round({fraction} x {total}) = {total}); use at most {kind}={most:g} to keep one")
    return keep_n


@torch.no_grad()
def prune_heads(model: nn.Module, fraction: float) -> int:
    """Remove the `fraction` of attention heads with the smallest weight norm in every layer; returns heads kept
    per layer. Importance of head h: L2 norm of its query/key/value rows and its output-projection columns."""
    layers = encoder_layers(model)
    keep_n = keep_count("heads", fraction, n_heads(layers[0]), "attention heads")
    for layer in layers:
        att, out = layer.attention.self, layer.attention.output
        d = att.attention_head_size
        score = sum(_head_norms(w, d) for w in (att.query.weight, att.key.weight, att.value.weight,
                                                 out.dense.weight.t()))
        heads = score.topk(keep_n).indices.sort().values
        rows = (heads[:, None] * d + torch.arange(d)).flatten()
        att.query, att.key, att.value = _rows(att.query, rows), _rows(att.key, rows), _rows(att.value, rows)
        out.dense = _cols(out.dense, rows)
        att.num_attention_heads, att.all_head_size = keep_n, keep_n * d
    return keep_n


@torch.no_grad()
def prune_ffn(model: nn.Module, fraction: float) -> int:
    """Remove the `fraction` of FFN neurons with the smallest weight norm in every layer; returns neurons kept per
    layer and sets config.intermediate_size to it. Importance of neuron j: |W_in[j]| * |W_out[:, j]|."""
    layers = encoder_layers(model)
    keep_n = keep_count("ffn", fraction, ffn_size(layers[0]), "FFN neurons")
    for layer in layers:
        w_in, w_out = layer.intermediate.dense, layer.output.dense
        score = w_in.weight.norm(dim=1) * w_out.weight.norm(dim=0)
        keep = score.topk(keep_n).indices.sort().values
        layer.intermediate.dense, layer.output.dense = _rows(w_in, keep), _cols(w_out, keep)
    for config in {id(c): c for c in (model.config, base_of(model).config)}.values():
        config.intermediate_size = keep_n
    return keep_n


def shrink_heads_for_loading(model: nn.Module, keep_n: int) -> None:
    """Give every layer `keep_n` heads' worth of (uninitialised) weights, so a head-pruned state dict loads."""
    for layer in encoder_layers(model):
        att, out = layer.attention.self, layer.attention.output
        rows = torch.arange(keep_n * att.attention_head_size)
        att.query, att.key, att.value = _rows(att.query, rows), _rows(att.key, rows), _rows(att.value, rows)
        out.dense = _cols(out.dense, rows)
        att.num_attention_heads, att.all_head_size = keep_n, len(rows)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parse_prune(spec: str) -> dict[str, float]:
    """'heads=0.25,ffn=0.5' or 'magnitude=0.5' -> {'heads': 0.25, 'ffn': 0.5}; errors name the bad part."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        if key not in ("magnitude", "heads", "ffn") or not value:
            raise ExportError(f"--prune {spec!r}: use magnitude=S (unstructured) and/or heads=F,ffn=F "
                              "(structured), each a fraction in [0, 1), e.g. --prune heads=0.25,ffn=0.5")
        try:
            out[key] = float(value)
        except ValueError:
            raise ExportError(f"--prune {spec!r}: {value!r} is not a number; e.g. {key}=0.5") from None
        if not (0 <= out[key] < 1) or math.isnan(out[key]):
            raise ExportError(f"--prune {spec!r}: {key}={value} must be a fraction in [0, 1)")
    if not out:
        raise ExportError("--prune needs a value, e.g. --prune heads=0.25,ffn=0.5 or --prune magnitude=0.5")
    return out


def load_head_pruned(folder, meta: dict, num_labels: int) -> nn.Module:
    """A head-pruned classifier saved by `save_model`: built from config.json, shrunk to
    meta['attention_heads_kept'] heads per layer, then its safetensors weights loaded (strictly)."""
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    from strop.models.classifier import mean_pool_classifier

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder))
    weights = {}
    for path in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(str(path)))
    if meta.get("pooling") == "mean":
        model = mean_pool_classifier(AutoModel.from_config(config), num_labels, meta)
        shrink_heads_for_loading(model, meta["attention_heads_kept"])
        model.backbone.load_state_dict(weights)
        model.classifier.load_state_dict(load_file(str(folder / "head.safetensors")))
    else:
        model = AutoModelForSequenceClassification.from_config(config)
        shrink_heads_for_loading(model, meta["attention_heads_kept"])
        model.load_state_dict(weights)
    return model
