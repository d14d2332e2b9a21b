"""Use a finished token-classification model: entities with character offsets for raw or pre-tokenised text.

Every entity is {text, type, start, end, score}: `text == source[start:end]` where source is the input text (raw
input) or the tokens joined by single spaces (pre-tokenised input); score is the mean probability of the entity's
word tags. Pre-tokenised input also gets the word tags back, in the scheme of the training files.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from strop.data.conll import CONLL_SUFFIXES, looks_like_conll, read_sentences
from strop.data.load import read_lines, read_table
from strop.data.ner import TokenExamples, check_sentences, to_token_examples
from strop.data.tags import from_iob2, spans
from strop.data.tokens import TokenEncoded, split_words, word_logits
from strop.errors import DataError
from strop.evaluate.entities import TagDecoder
from strop.explain.attribution import explain_entities
from strop.evaluate.evaluator import batched_logits
from strop.runs import write_atomic


class TokenPredictor:
    """A loaded token classifier with its tokenizer and strop.json metadata (labels, scheme, casing, decoding)."""

    def __init__(self, model, tokenizer, meta: dict, device: torch.device, precision: str = "fp32", task=None):
        self.model, self.tokenizer, self.meta = model.to(device), tokenizer, meta
        self.device, self.precision = device, precision
        self.task, self.labels = task, meta["labels"]
        self.decode = TagDecoder(self.labels, meta.get("decoding", "constrained"))

    def encode_examples(self, examples: TokenExamples):
        return self.task.encode(self.tokenizer, examples, self.meta)  # as the run encoded its data

    def tag(self, sentences: list[list[str]], batch_size: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
        """(IOB2 tag ids, probability of each chosen tag) per sentence of words."""
        for i, words in enumerate(sentences):
            if not words or not all(isinstance(w, str) and w.strip() for w in words):
                raise DataError(f"input {i}: needs a non-empty list of non-empty words, got {str(words)[:80]}")
        enc = self.encode_examples(TokenExamples([list(s) for s in sentences], None, []))
        stream = ((idx, logits.numpy()) for idx, logits, _ in
                  batched_logits(self.model, enc, batch_size, self.device, self.precision))
        return [self.decode(logits) for logits in word_logits(enc, stream)]

    def _entities(self, text: str, offsets: list[tuple[int, int]], ids: np.ndarray, probs: np.ndarray) -> list[dict]:
        tags = [self.labels[t] for t in ids]
        out = []
        for s, e, kind in spans(tags):
            start, end = offsets[s][0], offsets[e - 1][1]
            out.append({"text": text[start:end], "type": kind, "start": start, "end": end,
                        "score": float(probs[s:e].mean()), "words": [s, e]})
        return out

    def predict(self, texts: list[str] | str, batch_size: int = 64, word_split: str | None = None) -> list[dict]:
        """Raw texts -> [{'entities': [{text, type, start, end, score, words}]}] with offsets into each text."""
        if isinstance(texts, str):
            texts = [texts]
        how = word_split or self.meta.get("word_split", "simple")
        words = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"text {i} is empty; every input needs some text")
            words.append(split_words(text, how))
        tagged = self.tag([[w for w, _, _ in ws] for ws in words], batch_size)
        return [{"entities": self._entities(text, [(s, e) for _, s, e in ws], ids, probs)}
                for text, ws, (ids, probs) in zip(texts, words, tagged)]

    def predict_tokens(self, sentences: list[list[str]], batch_size: int = 64) -> list[dict]:
        """Pre-tokenised sentences -> [{'text', 'tags', 'entities'}]; text is the tokens joined by spaces and the
        tags are in the training files' scheme."""
        out = []
        for words, (ids, probs) in zip(sentences, self.tag(sentences, batch_size)):
            offsets, pos = [], 0
            for w in words:
                offsets.append((pos, pos + len(w)))
                pos += len(w) + 1
            text = " ".join(words)
            tags = from_iob2([self.labels[t] for t in ids], self.meta.get("scheme", "iob2"))
            out.append({"text": text, "tags": tags, "entities": self._entities(text, offsets, ids, probs)})
        return out

    # ---- files

    def _ner_cfg(self) -> SimpleNamespace:
        m = self.meta
        return SimpleNamespace(token_column=m.get("token_column", 0), tag_column=m.get("tag_column", -1),
                               tokens_key=m.get("tokens_key"), tags_key=m.get("tags_key"))

    def encode_file(self, path, encoding: str = "utf-8") -> tuple[TokenEncoded, list[str]]:
        """(subword windows with gold tags, notes on repaired tags) of a labelled CoNLL or JSONL file (tags in the
        training files' scheme)."""
        sentences = read_sentences(path, "auto", self._ner_cfg(), need_tags=True, encoding=encoding)
        notes: list[str] = []
        iob2 = check_sentences(sentences, self.meta.get("scheme", "iob2"), "repair", "input", notes)
        ex = to_token_examples(sentences, iob2, {n: i for i, n in enumerate(self.labels)}, "input")
        return self.encode_examples(ex), notes

    def predict_inputs(self, inputs: list, pairs=None, batch_size: int = 64) -> list[dict]:
        """Serve's batches, in input order: a string is a raw text (-> entities with character offsets), a list of
        words is pre-split input (-> tags and entities)."""
        out: list = [None] * len(inputs)
        raw = [i for i, x in enumerate(inputs) if isinstance(x, str)]
        split = [i for i, x in enumerate(inputs) if not isinstance(x, str)]
        if raw:
            for i, p in zip(raw, self.predict([inputs[i] for i in raw], batch_size=batch_size)):
                out[i] = p
        if split:
            for i, p in zip(split, self.predict_tokens([inputs[i] for i in split], batch_size=batch_size)):
                out[i] = p
        return out

    def labelled_encoding(self, path, encoding: str = "utf-8"):
        """A labelled CoNLL / JSONL file as subword windows with gold tags (export's parity checks use it)."""
        return self.encode_file(path, encoding)[0]

    def evaluate_file(self, path, batch_size: int = 128, encoding: str = "utf-8", **_) -> dict:
        """Entity metrics of this model on a labelled CoNLL or JSONL file (tags in the training files' scheme)."""
        enc, notes = self.encode_file(path, encoding)
        metrics, _ = self.task.evaluate(self.model, enc, self.labels, batch_size, self.device, self.precision)
        metrics["repaired_tags"] = notes
        return metrics

    def predict_file(self, path, out: str | Path, batch_size: int = 64, encoding: str = "utf-8", **_) -> int:
        """Entities for every input of `path`: a CoNLL file, JSONL rows with 'tokens' (a list) or 'text', or a
        .txt file with one raw text per line. Writes JSON lines to `out`, keeping the input rows' fields."""
        rows, preds = self._file_predictions(Path(path), batch_size, encoding)
        out = Path(out)
        if out.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
            raise DataError(f"--out {out}: token classification writes JSON lines; use a .jsonl file name")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, "".join(json.dumps({**row, **pred}, ensure_ascii=False, default=str) + "\n"
                                  for row, pred in zip(rows, preds)))
        return len(preds)

    def explain(self, text: str, pair: str | None = None, target=None, steps: int = 50) -> list:
        """One explanation per predicted entity (explain/attribution.py)."""
        return explain_entities(self, text, steps=steps)

    def explain_inputs(self, path) -> list[tuple[str, None]]:
        """The texts of a file to explain: one raw text per line."""
        return [(row["text"], None) for row in read_lines(path).rows]

    def flat(self, pred: dict) -> dict:
        """A prediction as flat CSV columns."""
        return {"entities": json.dumps(pred["entities"], ensure_ascii=False)}

    def _file_predictions(self, path: Path, batch_size: int, encoding: str) -> tuple[list[dict], list[dict]]:
        if not path.is_file():
            raise DataError(f"data file {path} not found; check the path (--data)")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return self._jsonl_predictions(path, batch_size, encoding)
        if suffix in CONLL_SUFFIXES and (suffix != ".txt" or looks_like_conll(path)):
            sentences = read_sentences(path, "conll", self._ner_cfg(), need_tags=False, encoding=encoding)
            return [{} for _ in sentences], self.predict_tokens([s.tokens for s in sentences], batch_size)
        if suffix == ".txt":
            table = read_lines(path, encoding)
            return table.rows, self.predict([row["text"] for row in table.rows], batch_size)
        raise DataError(f"{path}: token classification predicts on CoNLL files, JSONL (with 'tokens' or 'text') or "
                        ".txt (one text per line)")

    def _jsonl_predictions(self, path: Path, batch_size: int, encoding: str) -> tuple[list[dict], list[dict]]:
        table = read_table(path, "jsonl", encoding)  # the shared reader: decoding errors and bad JSON name file:line
        rows = []
        for number, row in zip(table.lines, table.rows):
            key = next((k for k in ("tokens", "words") if k in row), None)
            if key is None and not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{number}: expected an object with 'tokens' (a list of words) or 'text' "
                                "(a string)")
            rows.append((number, row, key))
        if not rows:
            raise DataError(f"{path} has no rows; one JSON object per line")
        preds: list[dict | None] = [None] * len(rows)
        tok = [i for i, (_, _, key) in enumerate(rows) if key]
        raw = [i for i, (_, _, key) in enumerate(rows) if not key]
        for i, p in zip(tok, self.predict_tokens([rows[i][1][rows[i][2]] for i in tok], batch_size) if tok else []):
            preds[i] = p
        for i, p in zip(raw, self.predict([rows[i][1]["text"] for i in raw], batch_size) if raw else []):
            preds[i] = p
        return [r for _, r, _ in rows], preds
