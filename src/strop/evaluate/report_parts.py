"""The report's parts: plots as inline PNG, tables, and one builder per section (data, curves, metrics,
confusion matrix, calibration, worst errors, entities, predicted vs true). Pure functions of their inputs; which of
the task-specific sections a run gets is its task's choice (`Task.report_sections`), the page is `report.py`'s."""

from __future__ import annotations

import base64
import html
import io

import numpy as np

def png_html(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def plain_text(text) -> str:
    """`text` as matplotlib draws it verbatim. Every string from the user (labels, entity types, split names) goes
    through here: a pair of `$` starts mathtext, so the label `US$ & CA$` would be drawn mangled and `$x^$` would fail
    to render at all (a ValueError from savefig); an escaped `\\$` is drawn as a plain `$`."""
    return str(text).replace("$", r"\$")


def new_figure(w: float = 6.0, h: float = 3.2, cols: int = 1):
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt.subplots(1, cols, figsize=(w, h))


def html_table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def summary_section(cfg, results: dict, meta: dict) -> str:
    t, p = cfg.train, cfg.peft
    rows = [["task", meta["task"]], ["labels", ", ".join(meta["labels"]) or "-"],
            ["model", cfg.model.path], ["pooling / max length", f"{cfg.model.pooling} / {cfg.model.max_length}"],
            ["peft", p.method], ["epochs run / steps", f"{results.get('epochs')} / {results.get('steps')}"],
            ["lr / batch size / scheduler", f"{t.lr} / {t.batch_size} / {t.scheduler}"],
            ["precision", results.get("precision")], ["seed", t.seed],
            ["best step", f"{results.get('best_step')} ({results.get('metric')}={_best_metric(results)})"],
            ["train seconds / samples per s", (f"{results.get('train_seconds', 0):.1f} / "
                                               f"{results.get('train_samples_per_s', 0):.1f}")]]
    if "trainable_params" in results:
        rows.append(["trainable parameters", f"{results['trainable_params']:,} of {results['total_params']:,}"])
    return html_table(["", ""], rows, "kv")


def _best_metric(results: dict):
    why = results.get("small_splits", {}).get("validation")
    return results.get("best_metric") if why is None else f"not shown: validation has {why}"


def data_section(data: dict, ds) -> str:
    splits = data.get("splits", {})
    # an image run's split summaries hold the pixel shape; its token counts are 1 per image, and its "texts"
    # are file names, so text lengths and shared texts would describe nothing
    images = any("image_shape" in i for i in splits.values())
    if images:
        shapes = [[s, i["examples"], " x ".join(map(str, i["image_shape"]))] for s, i in splits.items()]
        parts = [html_table(["split", "images", "channels x height x width"], shapes)]
    else:
        parts = [html_table(["split", "examples", "mean tokens", "max tokens", "truncated"],
                            [[s, i["examples"], i["mean_tokens"], i["max_tokens"], i["truncated"]]
                             for s, i in splits.items()])]
    counts = {s: i["label_counts"] for s, i in splits.items() if "label_counts" in i}
    if counts:
        parts.append(class_balance(counts))
    if images:
        return "".join(parts)
    if ds is None:
        parts.append('<p class="warn">the data files are not readable from here: text lengths and leakage '
                     "checks skipped</p>")
        return "".join(parts)
    fig, ax = new_figure()
    for split, ex in ds.splits.items():
        ax.hist([len(t.split()) for t in _texts(ex)], bins=40, alpha=0.5, label=plain_text(split))
    ax.set_xlabel("words per text")
    ax.set_title("text lengths")
    ax.legend()
    parts.append(png_html(fig))
    parts.append(leakage_html(ds))
    return "".join(parts)


def class_balance(counts: dict[str, dict[str, int]]) -> str:
    """Bars of each split's examples per class; counts: {split: {label: n}}."""
    fig, ax = new_figure()
    labels = list(next(iter(counts.values())))
    width = 0.8 / len(counts)
    for k, (split, c) in enumerate(counts.items()):
        ax.bar(np.arange(len(labels)) + k * width, [c[n] for n in labels], width, label=plain_text(split))
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, [plain_text(n) for n in labels], rotation=30,
                  ha="right")
    ax.set_title("class balance")
    ax.legend()
    return png_html(fig)


def _texts(ex) -> list[str]:
    """Texts of a split (token-classification sentences joined by spaces)."""
    return ex.texts if hasattr(ex, "texts") else [" ".join(words) for words in ex.tokens]


def _key(text: str, pair: str | None) -> str:
    return " ".join(text.lower().split()) + ("\t" + " ".join(pair.lower().split()) if pair else "")


def shared_texts(ds) -> dict[str, list[str]]:
    """{'train/test': [texts in both]} after lower-casing and whitespace normalisation."""
    keys = {s: {_key(t, ex.pairs[i] if getattr(ex, "pairs", None) else None): t for i, t in enumerate(_texts(ex))}
            for s, ex in ds.splits.items()}
    out = {}
    names = list(keys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = sorted(set(keys[a]) & set(keys[b]))
            if both:
                out[f"{a}/{b}"] = [keys[a][k] for k in both]
    return out


def leakage_html(ds) -> str:
    shared = shared_texts(ds)
    if not shared:
        return '<p class="ok">no text appears in two splits (after lower-casing and whitespace normalisation)</p>'
    items = "".join(f"<li><b>{html.escape(k)}</b>: {len(v)} shared, e.g. "
                    f"{html.escape(' | '.join(x[:80] for x in v[:3]))}</li>" for k, v in shared.items())
    return (f'<p class="warn">leak warning: texts appear in more than one split, so held-out scores are '
            f"optimistic</p><ul>{items}</ul>")


def curves_section(records: list[dict], metric: str) -> str:
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "validation"]
    if not train:
        return "<p>no training steps were logged</p>"
    fig, (a, b) = new_figure(9, 3.2, cols=2)
    a.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        a.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss")
    a.set_xlabel("step")
    a.legend()
    a.set_title("loss")
    b.plot([r["step"] for r in train], [r["lr"] for r in train])
    b.set_xlabel("step")
    b.set_title("learning rate")
    parts = [png_html(fig)]
    if val and metric in val[0]:
        fig, ax = new_figure()
        ax.plot([r["step"] for r in val], [r[metric] for r in val], "o-")
        ax.set_xlabel("step")
        ax.set_title(plain_text(f"validation {metric}"))
        parts.append(png_html(fig))
    return "".join(parts)


def metrics_section(results: dict) -> str:
    """Final metrics of the splits large enough to mean something; for the others (results["small_splits"], set by
    run.small_splits) the reason, not the numbers, which stay in results.json."""
    small = results.get("small_splits", {})
    parts = [f"<p>{html.escape(s)} metrics not shown: {html.escape(why)}, too few for the numbers to mean "
             "anything (results.json keeps them)</p>" for s, why in small.items()]
    splits = [s for s in ("validation", "test") if s in results and s not in small]
    if not splits:
        return "".join(parts)
    known = ("roc_auc", "accuracy", "macro_f1", "micro_f1", "mcc", "ece", "exact_match", "pearson",
             "spearman", "rmse", "mae", "perplexity", "masked_accuracy", "loss")
    keys = [k for k in known if any(k in results[s] for s in splits)]
    rows = [[s, *[results[s].get(k, "-") for k in keys]] for s in splits]
    parts.append(html_table(["split", *keys], rows))
    for s in splits:
        per = results[s].get("per_class")
        if per:
            parts.append(f"<h3>per class ({s})</h3>")
            parts.append(html_table(["label", "precision", "recall", "f1", "support"],
                                [[n, v["precision"], v["recall"], v["f1"], v["support"]] for n, v in per.items()]))
    return "".join(parts)


def confusion_section(results: dict, labels: list[str], split: str) -> str:
    cm = np.array(results.get(split, {}).get("confusion_matrix") or [])
    if cm.size == 0:
        return ""
    fig, ax = new_figure(1.2 + 0.55 * len(labels), 1.0 + 0.5 * len(labels))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), [plain_text(n) for n in labels], rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), [plain_text(n) for n in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(plain_text(f"confusion matrix ({split})"))
    return png_html(fig)


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict:
    """Reliability bins and expected calibration error: ECE = sum_b |acc_b - conf_b| * n_b / n."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            acc, conf = float(correct[m].mean()), float(confidence[m].mean())
            ece += abs(acc - conf) * m.sum() / len(confidence)
            rows.append({"bin": [float(edges[b]), float(edges[b + 1])], "n": int(m.sum()), "accuracy": acc,
                         "confidence": conf})
    return {"ece": float(ece), "bins": rows}


def multi_label_calibration(probs: np.ndarray, labels: np.ndarray, threshold: float, bins: int = 10) -> dict:
    """Calibration of every per-label decision. probs, labels: (n, num_labels); a label is predicted when its
    probability >= threshold (the one tuned on validation), so a decision's confidence is p when it says yes and 1 - p
    when it says no (with threshold != 0.5 that can be below 0.5: a yes at p = 0.35 is a 35% bet)."""
    predicted = probs >= threshold
    confidence = np.where(predicted, probs, 1 - probs)
    return calibration(confidence.ravel(), (predicted == (labels > 0.5)).ravel(), bins)


def calibration_section(cal: dict, split: str) -> str:
    fig, ax = new_figure(4, 4)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    ax.plot([r["confidence"] for r in cal["bins"]], [r["accuracy"] for r in cal["bins"]], "o-", label="model")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(plain_text(f"reliability ({split}); ECE = {cal['ece']:.3f}"))
    ax.legend()
    return f"<p>expected calibration error: <b>{cal['ece']:.4f}</b></p>" + png_html(fig)


def errors_section(predictor, ex, probs: np.ndarray, k: int, explain_k: int) -> tuple[str, list[dict]]:
    """The k most confident wrong predictions; the first explain_k with integrated-gradients attributions."""
    from strop.explain.attribution import explain, to_html_spans

    labels = predictor.labels
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != ex.labels)
    order = wrong[np.argsort(-probs[wrong, pred[wrong]])][:k]
    if not len(order):
        return "<p>no errors on this split</p>", []
    rows, items = [], []
    for rank, i in enumerate(order):
        text, pair = ex.texts[i], ex.pairs[i] if ex.pairs else None
        shown = html.escape(text) + (f' <span class="sep">‖</span> {html.escape(pair)}' if pair else "")
        if rank < explain_k and _has_captum():
            e = explain(predictor, text, pair, target=int(pred[i]), rollout=False, max_steps=200,
                        internal_batch_size=16)  # a fourth of the default: the report stays light (~270 MB less)
            shown = to_html_spans(e)
        items.append({"text": text, "pair": pair, "true": labels[ex.labels[i]], "predicted": labels[pred[i]],
                      "confidence": float(probs[i, pred[i]])})
        rows.append(f"<tr><td>{float(probs[i, pred[i]]):.3f}</td><td>{html.escape(labels[ex.labels[i]])}</td>"
                    f"<td>{html.escape(labels[pred[i]])}</td><td class=\"text\">{shown}</td></tr>")
    if explain_k and not _has_captum():
        note = "<p>install strop[explain] (Captum) to see token attributions here</p>"
    else:
        note = (f"<p>attributions toward the predicted label (green = for, red = against) on the first {explain_k}"
                "</p>" if explain_k else "")
    return (note + '<div class="scroll"><table><thead><tr><th>confidence</th><th>true</th><th>predicted</th>'
            f'<th>text</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>'), items


def entities_section(predictor, ex, results: dict, split: str, k: int = 8) -> str:
    """NER: per-type F1 bars and the first sentences with errors, gold vs predicted spans highlighted."""
    from strop.data.tags import spans

    parts = []
    per = (results.get(split) or {}).get("per_type") or {}
    if per:
        fig, ax = new_figure()
        ax.bar(range(len(per)), [v["f1"] for v in per.values()])
        ax.set_xticks(range(len(per)), [plain_text(t) for t in per])  # entity types come from the data
        ax.set_ylim(0, 1)
        ax.set_title(plain_text(f"entity F1 per type ({split})"))
        parts.append(png_html(fig))
    sentences = ex.tokens[:400]
    tagged = predictor.tag(sentences)
    shown = 0
    rows = []
    for words, gold_ids, (pred_ids, _) in zip(sentences, ex.tags, tagged):
        gold = {(a, b, t) for a, b, t in spans([predictor.labels[i] for i in gold_ids])}
        pred = {(a, b, t) for a, b, t in spans([predictor.labels[i] for i in pred_ids])}
        if gold == pred:
            continue
        rows.append(f"<tr><td>gold</td><td>{_marked(words, gold)}</td></tr>"
                    f"<tr><td>predicted</td><td>{_marked(words, pred)}</td></tr>")
        shown += 1
        if shown >= k:
            break
    if rows:
        parts.append(f"<p>sentences with errors ({split}): gold vs predicted spans</p><div class=\"scroll\"><table>"
                     f"{''.join(rows)}</table></div>")
    else:
        parts.append("<p>no errors in the first 400 sentences</p>")
    return "".join(parts)


def _marked(words: list[str], entities: set) -> str:
    starts = {a: (b, t) for a, b, t in entities}
    out, i = [], 0
    while i < len(words):
        if i in starts:
            b, t = starts[i]
            out.append(f'<mark class="ent" title="{html.escape(t)}">{html.escape(" ".join(words[i:b]))}'
                       f"<sub>{html.escape(t)}</sub></mark>")
            i = b
        else:
            out.append(html.escape(words[i]))
            i += 1
    return " ".join(out)


def _has_captum() -> bool:
    import importlib.util

    return importlib.util.find_spec("captum") is not None


def regression_section(pred: np.ndarray, true: np.ndarray, split: str) -> str:
    fig, ax = new_figure(4, 4)
    ax.scatter(true, pred, s=8, alpha=0.5)
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "--", color="grey")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(plain_text(f"predicted vs true ({split})"))
    return png_html(fig)


# ---------------------------------------------------------------------------------------------------------------
# the page


CSS = """
body{font-family:system-ui,-apple-system,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:64rem;margin:0 auto;padding:1rem}
section{background:#fff;border:1px solid #e3e3e3;border-radius:8px;padding:.8rem 1rem;margin:1rem 0}
h1{font-size:1.4rem;margin:.5rem 0}h2{font-size:1.15rem;margin:.2rem 0 .6rem}h3{font-size:1rem}
img{max-width:100%;height:auto;display:block;margin:.5rem 0}
table{border-collapse:collapse;font-size:.9rem}td,th{border-bottom:1px solid #eee;padding:.25rem .5rem;text-align:left}
.scroll{overflow-x:auto;max-width:100%}.warn{color:#b45309;font-weight:600}.ok{color:#15803d}
nav a{margin-right:.6rem}.text{min-width:12rem}mark.ent{background:#dbeafe;border-radius:3px;padding:0 2px}
.grid{display:flex;flex-wrap:wrap;gap:.6rem}
.tile{margin:0;padding:.3rem;border:2px solid #15803d;border-radius:6px;font-size:.75rem;width:16.6rem}
.tile.bad{border-color:#dc2626}.tile figcaption{overflow-wrap:anywhere}
.tile img{display:inline-block;width:8rem;height:8rem;object-fit:contain;margin:0;image-rendering:pixelated}
"""

SCRIPT = """
(function(){
  var imgs=[].slice.call(document.images);
  var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
  document.body.dataset.images=ok+"/"+imgs.length;
  document.body.dataset.overflow=String(document.documentElement.scrollWidth>window.innerWidth+1);
  document.body.dataset.sections=[].slice.call(document.querySelectorAll("section")).map(function(s){return s.id;}).join(",");
  document.body.dataset.rendered="1";
})();
"""


def generations_section(predictor, ex, split: str, base=None, k: int = 8) -> str:
    """Generation: the first `k` prompts of a split, the fine-tuned model's answer beside the references and (when
    the base model loads) the base model's answer to the same prompt."""
    prompts = ex.prompts()[:k]
    tuned = predictor.predict(prompts)
    before = base.predict(prompts) if base is not None else None
    header = ["prompt", "reference(s)", "fine-tuned"] + (["base model"] if before is not None else [])
    rows = []
    for i, turns in enumerate(prompts):
        refs = " | ".join(ex.references[i][:3]) + (f" (+{len(ex.references[i]) - 3})"
                                                  if len(ex.references[i]) > 3 else "")
        row = [turns[-1]["content"], refs, _answer(tuned[i])]
        rows.append(row + ([_answer(before[i])] if before is not None else []))
    note = "" if before is not None else '<p class="warn">the base model could not be loaded here: no comparison</p>'
    return f"<p>sample answers ({html.escape(split)}, greedy)</p>" + html_table(header, rows) + note


def _answer(pred: dict) -> str:
    return pred["text"] + ("" if pred["finish_reason"] == "stop" else " [cut at the token limit]")
