"""Scores of generated texts against one or several references each: BLEU and chrF (sacreBLEU, corpus level, as
published results report them), ROUGE-L (rouge-score, the best reference per output, averaged), exact match, and
the share of outputs that ended with the end-of-sequence token (not cut by the token limit)."""

from __future__ import annotations

import re

from strop.errors import ConfigError

GENERATION_METRICS = ("bleu", "rouge_l", "chrf", "exact_match", "stopped")


def _require():
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError("scoring generations needs sacrebleu and rouge-score: pip install 'strop[generate]'") \
            from None
    return sacrebleu, rouge_scorer


def normalise(text: str) -> str:
    """Exact match ignores case and runs of whitespace."""
    return re.sub(r"\s+", " ", text).strip().lower()


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacreBLEU's layout: stream k holds every output's k-th reference, None where an output has fewer."""
    width = max(len(r) for r in references)
    return [[r[k] if k < len(r) else None for r in references] for k in range(width)]


def score_generations(outputs: list[str], references: list[list[str]], stopped: list[bool]) -> dict:
    """{bleu, rouge_l, chrf, exact_match, stopped} in percent (0-100), plus n and references_per_output."""
    if len(outputs) != len(references) or not outputs:
        raise ValueError(f"{len(outputs)} outputs for {len(references)} reference lists")
    sacrebleu, rouge_scorer = _require()
    streams = reference_streams(references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score_multi(refs, out)["rougeL"].fmeasure for out, refs in zip(outputs, references)]
    exact = [normalise(out) in {normalise(r) for r in refs} for out, refs in zip(outputs, references)]
    return {"bleu": float(sacrebleu.corpus_bleu(outputs, streams).score),
            "rouge_l": 100 * sum(rouge) / len(rouge),
            "chrf": float(sacrebleu.corpus_chrf(outputs, streams).score),
            "exact_match": 100 * sum(exact) / len(exact),
            "stopped": 100 * sum(stopped) / len(stopped),
            "n": len(outputs), "references_per_output": sum(map(len, references)) / len(references)}
