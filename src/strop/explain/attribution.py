"""Why the model predicted what it did: integrated gradients (Captum) on the word embeddings, and attention rollout.

Integrated gradients attribute `logit[target](x) - logit[target](baseline)` to the input tokens; the baseline keeps
the special tokens ([CLS], [SEP]) and replaces every other token by [PAD]. Completeness — the attributions sum to that
logit difference — is checked and reported (`completeness.delta`); more steps shrink it. Attention rollout (Abnar &
Zuidema 2020) multiplies the head-averaged attention maps (plus the residual identity) through the layers and reads the
row of what the head sees ([CLS], or the mean over the tokens for pooling=mean): a cheaper, gradient-free view, not a
faithful attribution. Both need the run's PyTorch model: an ONNX export has no gradients and no attention maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from strop.errors import DataError, StropError


def require_captum():
    try:
        import captum
    except ImportError:
        raise StropError("strop explain needs Captum: pip install 'strop[explain]'") from None
    return captum


@dataclass
class Explanation:
    """Attributions of one input. tokens/attributions/rollout: per model token (special tokens included)."""

    text: str
    pair: str | None
    target: str  # the label explained (regression: 'value')
    prediction: dict
    tokens: list[str]
    offsets: list[tuple[int, int]]  # character span of each token in its own text; (0, 0) for special tokens
    segments: list[int]  # 0 = text, 1 = pair, -1 = special token
    attributions: list[float]
    completeness: dict  # {'sum': float, 'logit_diff': float, 'delta': float, 'steps': int}
    rollout: list[float] = field(default_factory=list)
    whole_words: bool = False  # tokens are already words (NER explanations): never merge them

    def words(self) -> list[dict]:
        """Tokens merged into whitespace words of the original text(s): [{'word', 'segment', 'start', 'end',
        'attribution'}] with attributions summed over a word's subwords."""
        out: list[dict] = []
        for (start, end), seg, a in zip(self.offsets, self.segments, self.attributions):
            if seg < 0:
                continue
            source = self.text if seg == 0 else self.pair
            last = out[-1] if out else None
            if (last and not self.whole_words and last["segment"] == seg and start == last["end"] and start > 0
                    and not source[start - 1].isspace()):
                last["end"], last["attribution"] = end, last["attribution"] + a
                last["word"] = source[last["start"]:end]
            else:
                out.append({"word": source[start:end], "segment": seg, "start": start, "end": end, "attribution": a})
        return out

    def to_dict(self) -> dict:
        return {"text": self.text, "pair": self.pair, "target": self.target, "prediction": self.prediction,
                "tokens": [{"token": t, "attribution": a, "rollout": r if self.rollout else None,
                            "segment": s, "start": o[0], "end": o[1]}
                           for t, a, r, s, o in zip(self.tokens, self.attributions,
                                                    self.rollout or [0.0] * len(self.tokens), self.segments,
                                                    self.offsets)],
                "words": self.words(), "completeness": self.completeness}


def require_torch_model(predictor) -> None:
    """Explanations differentiate through the model and read its attention maps: an ONNX export (which
    Predictor.load also accepts) has neither, so say which folder to give instead."""
    if isinstance(predictor.model, torch.nn.Module):
        return
    onnx_file = getattr(predictor.model, "path", None)
    run = Path(onnx_file).parent.parent if onnx_file else None  # an export is written to RUN/export/
    instead = run if run is not None and (run / "model" / "strop.json").is_file() else "runs/<name>"
    raise StropError(f"explanations need the run's PyTorch model (gradients and attention maps); "
                     f"{onnx_file or 'this model'} is an ONNX export. Give the run folder instead: strop explain "
                     f"{instead}")


def _target_index(target: str | int | None, pred: dict, labels: list[str]) -> tuple[int, str]:
    """(logit index, label name) to explain; by default the prediction's: its label (single-label), its most
    probable label (multi-label), the value (regression)."""
    if "value" in pred:
        return 0, "value"
    if target is None:
        if "label" in pred:
            name = pred["label"]
        else:  # multi-label: the most probable label
            name = max(pred["probs"], key=pred["probs"].get)
        return labels.index(name), name
    if isinstance(target, int) or (isinstance(target, str) and target not in labels and target.isdigit()):
        i = int(target)
        if not 0 <= i < len(labels):
            raise DataError(f"target {target} is out of range; labels are {labels}")
        return i, labels[i]
    if target not in labels:
        raise DataError(f"target {target!r} is not a label of this model; labels are {labels}")
    return labels.index(target), target


def explain(predictor, text: str, pair: str | None = None, target: str | int | None = None, steps: int = 50,
            rollout: bool = True, internal_batch_size: int = 64, tolerance: float = 0.05,
            max_steps: int = 800) -> Explanation:
    """Integrated-gradients attributions (and attention rollout) for one input of a loaded Predictor.

    Starts with `steps` interpolation steps and doubles them (up to max_steps) until |sum of attributions - logit
    difference| <= tolerance x |logit difference|; `completeness` reports what was reached."""
    from captum.attr import LayerIntegratedGradients

    require_torch_model(predictor)
    if not isinstance(text, str) or not text.strip():
        raise DataError("the text to explain is empty")
    if predictor.meta.get("text_pair_column") and pair is None:
        raise DataError("this model classifies text pairs; give the second text too (--pair)")
    model, tok, meta = predictor.model, predictor.tokenizer, predictor.meta
    enc = tok(text, pair, truncation=True, max_length=meta["max_length"], return_offsets_mapping=True,
              return_tensors="pt")
    offsets = [tuple(o) for o in enc.pop("offset_mapping")[0].tolist()]
    seq_ids = enc.sequence_ids(0)
    inputs = {k: v.to(predictor.device) for k, v in enc.items()}
    pred = predictor.predict([text], pairs=[pair] if pair is not None else None)[0]
    index, name = _target_index(target, pred, predictor.labels)

    special = torch.tensor([s is None for s in seq_ids], device=predictor.device)
    baseline = torch.where(special, inputs["input_ids"], torch.full_like(inputs["input_ids"], tok.pad_token_id))
    extra = (inputs["attention_mask"], inputs.get("token_type_ids"))

    def forward(input_ids, attention_mask, token_type_ids):
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits.float()

    model.eval()
    with torch.no_grad():
        diff = float(forward(inputs["input_ids"], *extra)[0, index] - forward(baseline, *extra)[0, index])
    lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
    while True:  # double the steps until the attributions add up to the logit difference (or max_steps)
        attr, delta = lig.attribute(inputs["input_ids"], baselines=baseline, additional_forward_args=extra,
                                    target=index, n_steps=steps, internal_batch_size=internal_batch_size,
                                    return_convergence_delta=True)
        delta = float(delta.abs().max())
        if delta <= tolerance * max(abs(diff), 1e-2) or steps * 2 > max_steps:
            break
        steps *= 2
    scores = attr.sum(-1)[0].detach().float().cpu()
    completeness = {"sum": float(scores.sum()), "logit_diff": diff, "delta": delta, "steps": steps,
                    "within_tolerance": delta <= tolerance * max(abs(diff), 1e-2), "tolerance": tolerance}
    tokens = tok.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    segments = [-1 if s is None else s for s in seq_ids]
    roll = attention_rollout(model, inputs, meta.get("pooling", "cls")) if rollout else []
    return Explanation(text, pair, name, pred, tokens, [(int(a), int(b)) for a, b in offsets], segments,
                       scores.tolist(), completeness, roll)


def encoder_of(model) -> torch.nn.Module:
    """The transformer under a classifier's head, the module that can return attention maps: strop's
    MeanPoolClassifier keeps it as `.backbone` (its own forward takes no `output_attentions`); Hugging Face
    `*ForSequenceClassification` / `*ForTokenClassification` models as `.base_model`."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, torch.nn.Module):
        return backbone
    return getattr(model, "base_model", model)


@torch.no_grad()
def attention_rollout(model, inputs: dict, pooling: str = "cls") -> list[float]:
    """Rollout of the attention over the input tokens, (seq_len,) summing to 1: the [CLS] row (pooling=cls), or the
    mean of the real tokens' rows (pooling=mean: the head reads the average of every token's state).

    inputs: input_ids, attention_mask (and token_type_ids), each (1, seq_len)."""
    encoder = encoder_of(model)
    previous = getattr(encoder.config, "_attn_implementation", None)
    try:
        if hasattr(encoder, "set_attn_implementation"):
            encoder.set_attn_implementation("eager")  # fused SDPA kernels return no attention weights
        out = encoder(**inputs, output_attentions=True)
    finally:
        if previous and hasattr(encoder, "set_attn_implementation"):
            encoder.set_attn_implementation(previous)
    attentions = getattr(out, "attentions", None)
    if not attentions:
        return []
    n = attentions[0].shape[-1]
    rollout = torch.eye(n)
    for layer in attentions:
        a = layer[0].float().mean(0).cpu() + torch.eye(n)  # heads averaged, residual added
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    if pooling == "mean":
        mask = inputs["attention_mask"][0].float().cpu()
        row = (rollout * mask[:, None]).sum(0) / mask.sum()
    else:
        row = rollout[0]
    return (row / row.sum()).tolist()


# ---------------------------------------------------------------------------------------------------------------
# rendering


def _rgb(a: float, scale: float) -> tuple[int, int, int, float]:
    """Green for evidence for the target, red against; alpha by magnitude."""
    alpha = min(1.0, abs(a) / scale) if scale > 0 else 0.0
    return ((22, 163, 74) if a >= 0 else (220, 38, 38)) + (round(alpha * 0.85, 3),)


def to_html_spans(ex: Explanation) -> str:
    """The input as coloured word spans (inline HTML; title shows the score)."""
    import html

    words = ex.words()
    scale = max((abs(w["attribution"]) for w in words), default=0.0)
    parts, segment = [], 0
    for w in words:
        if w["segment"] != segment:
            parts.append('<span class="sep">‖</span>')
            segment = w["segment"]
        r, g, b, alpha = _rgb(w["attribution"], scale)
        parts.append(f'<span class="tok" style="background:rgba({r},{g},{b},{alpha})" '
                     f'title="{w["attribution"]:+.4f}">{html.escape(w["word"])}</span>')
    return " ".join(parts)


def to_rich_text(ex: Explanation):
    """Coloured words for the terminal (rich.text.Text)."""
    from rich.text import Text

    words = ex.words()
    scale = max((abs(w["attribution"]) for w in words), default=0.0)
    out = Text()
    for w in words:
        r, g, b, alpha = _rgb(w["attribution"], scale)
        # blend toward white so weak attributions stay readable on any background
        mix = [round(255 - (255 - c) * alpha) for c in (r, g, b)]
        out.append(w["word"], style=f"black on #{mix[0]:02x}{mix[1]:02x}{mix[2]:02x}")
        out.append(" ")
    return out


def explanations_html(explanations: list[Explanation], title: str = "strop explain") -> str:
    """A self-contained page with one block per explanation."""
    import html

    blocks = []
    for ex in explanations:
        c = ex.completeness
        blocks.append(
            f'<div class="ex"><div class="meta">target <b>{html.escape(ex.target)}</b> · prediction '
            f'{html.escape(_pred_text(ex.prediction))} · completeness: sum {c["sum"]:+.4f} vs logit difference '
            f'{c["logit_diff"]:+.4f} (delta {c["delta"]:.2e}, {c["steps"]} steps)</div>'
            f'<div class="text">{to_html_spans(ex)}</div></div>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title><style>{SPAN_CSS}'
            f'body{{font-family:system-ui,sans-serif;margin:1rem;max-width:60rem}}.ex{{margin:1rem 0;padding:.6rem;'
            f'border:1px solid #ddd;border-radius:6px}}.meta{{color:#555;font-size:.85rem;margin-bottom:.4rem}}'
            f'</style></head><body><h1>{html.escape(title)}</h1>'
            f'<p>Integrated gradients on the word embeddings: green words push toward the target label, red away.</p>'
            f'{"".join(blocks)}</body></html>')


SPAN_CSS = (".tok{padding:1px 2px;border-radius:3px;line-height:1.9}.sep{color:#999;margin:0 .3rem}"
            ".text{overflow-wrap:anywhere}")


def _pred_text(pred: dict) -> str:
    if "type" in pred:  # an NER entity
        return f"{pred['type']} '{pred['text']}' ({pred['score']:.2f})"
    if "value" in pred:
        return f"{pred['value']:.4f}"
    if "label" in pred:
        return f"{pred['label']} ({pred['score']:.2f})"
    return ", ".join(pred.get("labels", [])) or "(no label above threshold)"


def top_tokens(ex: Explanation, k: int = 3) -> list[str]:
    """The k words with the largest positive attribution."""
    words = sorted(ex.words(), key=lambda w: -w["attribution"])
    return [w["word"] for w in words[:k]]




def explain_entities(predictor, text: str, steps: int = 50, tolerance: float = 0.05, max_steps: int = 800,
                     internal_batch_size: int = 64) -> list[Explanation]:
    """NER: one explanation per predicted entity — integrated gradients of the logit of the entity's first tag
    (B-TYPE) at its first subword, attributed to every word of the text (subword attributions summed per word)."""
    from captum.attr import LayerIntegratedGradients

    from strop.data.ner import TokenExamples
    from strop.data.tokens import split_words

    require_torch_model(predictor)
    if not isinstance(text, str) or not text.strip():
        raise DataError("the text to explain is empty")
    model, tok, labels = predictor.model, predictor.tokenizer, predictor.labels
    words = split_words(text, predictor.meta.get("word_split", "simple"))
    pred = predictor.predict([text])[0]
    enc = predictor.encode_examples(TokenExamples([[w for w, _, _ in words]], None, []))
    if len(enc) > 1:
        raise DataError(f"the text is longer than model.max_length={predictor.meta['max_length']} subwords; explain "
                        "a shorter passage (entities are explained within one window)")
    device = predictor.device
    ids = torch.tensor([enc.input_ids[0]], device=device)
    types = torch.tensor([enc.token_type_ids[0]], device=device) if enc.token_type_ids is not None else None
    mask = torch.ones_like(ids)
    word_of, first = enc.words[0], enc.first[0]
    baseline = torch.where(torch.tensor(word_of < 0, device=device), ids, torch.full_like(ids, tok.pad_token_id))
    model.eval()
    out = []
    for ent in pred["entities"]:
        pos = int(np.flatnonzero(first & (word_of == ent["words"][0]))[0])
        name = f"B-{ent['type']}"
        index = labels.index(name) if name in labels else int(model(input_ids=ids, attention_mask=mask).logits[0, pos]
                                                               .argmax())

        def forward(input_ids, attention_mask, token_type_ids, pos=pos):
            kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, pos].float()

        with torch.no_grad():
            diff = float(forward(ids, mask, types)[0, index] - forward(baseline, mask, types)[0, index])
        lig, n = LayerIntegratedGradients(forward, model.get_input_embeddings()), steps
        while True:
            attr, delta = lig.attribute(ids, baselines=baseline, additional_forward_args=(mask, types), target=index,
                                        n_steps=n, internal_batch_size=internal_batch_size,
                                        return_convergence_delta=True)
            delta = float(delta.abs().max())
            if delta <= tolerance * max(abs(diff), 1e-2) or n * 2 > max_steps:
                break
            n *= 2
        scores = attr.sum(-1)[0].detach().float().cpu().numpy()
        per_word = [float(scores[word_of == w].sum()) for w in range(len(words))]
        completeness = {"sum": float(scores.sum()), "logit_diff": diff, "delta": delta, "steps": n,
                        "within_tolerance": delta <= tolerance * max(abs(diff), 1e-2), "tolerance": tolerance}
        out.append(Explanation(text, None, f"{name} '{ent['text']}'", ent, [w for w, _, _ in words],
                               [(s, e) for _, s, e in words], [0] * len(words), per_word, completeness,
                               whole_words=True))
    return out
