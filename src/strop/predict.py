"""Use a finished sequence classifier: predict texts or files (input order kept), evaluate labelled files.

Predictors are made by the task registry (`strop.load` / `strop.tasks.load_predictor`), which also handles ONNX
exports; what differs between single-label, multi-label and regression (outputs, their format) is the task's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from strop.data.examples import Columns, Examples, resolve_columns, to_examples
from strop.data.load import Table, read_lines, read_table
from strop.errors import DataError
from strop.evaluate.evaluator import batched_logits
from strop.explain.attribution import explain


class Predictor:
    """A loaded model with its tokenizer, strop.json metadata (labels, columns, threshold) and task object."""

    def __init__(self, model, tokenizer, meta: dict, device: torch.device, precision: str = "fp32", task=None):
        self.model, self.tokenizer, self.meta = model.to(device), tokenizer, meta
        self.device, self.precision = device, precision
        self.task, self.labels = task, meta["labels"]

    def outputs_of(self, examples: Examples, batch_size: int) -> np.ndarray:
        """Outputs in input order: (n, L) probabilities, or (n,) values for regression."""
        enc = self.task.encode(self.tokenizer, examples, self.meta)
        out = None
        for idx, logits, _ in batched_logits(self.model, enc, batch_size, self.device, self.precision):
            values = self.task.outputs(logits).numpy()
            if out is None:
                out = np.zeros((len(enc),) + values.shape[1:], dtype=np.float32)
            out[idx] = values
        return out

    def predict(self, texts: list[str] | str, pairs: list[str] | None = None, batch_size: int = 64) -> list[dict]:
        """One dict per text: {'label', 'score', 'probs'} (single-label), {'labels', 'probs'} (multi-label) or
        {'value'} (regression)."""
        if isinstance(texts, str):
            texts = [texts]
        if pairs is not None and len(pairs) != len(texts):
            raise DataError(f"got {len(texts)} texts but {len(pairs)} pairs; give one pair per text")
        if self.meta.get("text_pair_column") and pairs is None:
            raise DataError("this model classifies text pairs; pass pairs=[...] (or a pair column in the file)")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"text {i} is empty; every input needs some text")
        raw = self.outputs_of(Examples(list(texts), pairs, None, list(range(len(texts)))), batch_size)
        return [self.task.format(row, self.labels, self.meta) for row in raw]

    def file_examples(self, path, need_label: bool, text_column=None, pair_column=None, label_column=None,
                       fmt: str = "auto", encoding: str = "utf-8") -> tuple[Table, Examples]:
        if fmt == "auto" and Path(path).suffix.lower() == ".txt":  # one text per line, as on stdin
            table = read_lines(path, encoding, self.meta["text_column"])
        else:
            table = read_table(path, fmt, encoding)
        if isinstance(table, dict):
            raise DataError(f"{path} holds several splits {sorted(table)}; point to one")
        m = self.meta
        cols = resolve_columns(table, text_column or _present(table, m["text_column"]),
                               pair_column or _present(table, m.get("text_pair_column")),
                               label_column or _present(table, m.get("label_column")), need_label)
        if m.get("text_pair_column") and not cols.pair:
            raise DataError(f"{path}: this model classifies text pairs, but no pair column was found among "
                            f"{table.columns}; expected {m['text_pair_column']!r}")
        if not m.get("text_pair_column"):
            cols = Columns(cols.text, None, cols.label)
        return table, to_examples(table, cols, self.task.label_kind, self.labels, m.get("label_delimiter"), "input",
                                  need_label)

    def predict_inputs(self, inputs: list, pairs: list[str] | None = None, batch_size: int = 64) -> list[dict]:
        """Serve's batches: texts (and pairs), as `predict`."""
        return self.predict(inputs, pairs, batch_size=batch_size)

    def labelled_encoding(self, path, **columns):
        """A labelled file encoded as training encoded its data (export's parity checks use it)."""
        _, ex = self.file_examples(path, True, **columns)
        return self.task.encode(self.tokenizer, ex, self.meta)

    def evaluate_file(self, path, batch_size: int = 128, **columns) -> dict:
        """Metrics of this model on a labelled file (same metrics as training's final evaluation)."""
        _, ex = self.file_examples(path, True, **columns)
        enc = self.task.encode(self.tokenizer, ex, self.meta)
        metrics, _ = self.task.evaluate(self.model, enc, self.labels, batch_size, self.device, self.precision,
                                        self.meta.get("threshold", 0.5))
        metrics["truncated"] = enc.n_truncated
        return metrics

    def predict_file(self, path, out: str | Path, batch_size: int = 64, **columns) -> int:
        """Write predictions for every row of `path` to `out` (.jsonl or .csv), keeping the input columns (an
        output named like an input column, such as a gold 'label', is written as 'pred_label')."""
        check_output(out)  # before the work, not after it
        table, ex = self.file_examples(path, False, **columns)
        rows = [self.task.format(r, self.labels, self.meta) for r in self.outputs_of(ex, batch_size)]
        write_predictions(out, table.columns, table.rows, rows, self.flat)
        return len(rows)

    def explain(self, text: str, pair: str | None = None, target=None, steps: int = 50) -> list:
        """Integrated-gradients attributions for one input (explain/attribution.py), as a one-item list."""
        return [explain(self, text, pair, target=target, steps=steps)]

    def explain_inputs(self, path) -> list[tuple[str, str | None]]:
        """The (text, pair) inputs of a file to explain."""
        _, ex = self.file_examples(path, False)
        return list(zip(ex.texts, ex.pairs or [None] * len(ex.texts)))

    def flat(self, pred: dict) -> dict:
        """A prediction as flat CSV columns."""
        return self.task.flat(pred, self.labels)


def _present(table: Table, name: str | None) -> str | None:
    return name if name and name in table.columns else None


OUT_SUFFIXES = (".csv", ".jsonl", ".json", ".ndjson")


def check_output(out: str | Path, suffixes: tuple[str, ...] = OUT_SUFFIXES, kinds: str = ".jsonl or .csv") -> Path:
    """`out` as a Path, refused before any work is done if it is a folder or has a suffix we cannot write."""
    out = Path(out)
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give a {kinds} file name in it")
    if out.suffix.lower() not in suffixes:
        raise DataError(f"--out {out}: use a {kinds} file name")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise DataError(f"--out {out}: {blocker} is a file, so no folder can be made there; choose another path")
    return out


def _renamed(keys, columns) -> dict[str, str]:
    """Output key -> column name: an input column of the same name (a gold 'label', say) is kept, and the output
    is written as 'pred_<key>' beside it (more 'pred_' until the name is free)."""
    taken, names = set(columns), {}
    for key in keys:
        name = key
        while name in taken:
            name = f"pred_{name}"
        names[key] = name
        taken.add(name)
    return names


def write_predictions(out, columns, inputs, preds, flat) -> None:
    """Each input row with its prediction, in input order; the input's own columns are never overwritten.
    `flat(pred)`: the prediction as CSV columns (the predictor's `flat`)."""
    out = check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix.lower() == ".csv":
        rows = [flat(pred) for pred in preds]
        names = _renamed(rows[0] if rows else [], columns)
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns) + list(names.values()))
            writer.writeheader()
            for row, values in zip(inputs, rows):
                writer.writerow({**row, **{names[k]: v for k, v in values.items()}})
    else:
        names = _renamed(preds[0] if preds else [], columns)
        with open(tmp, "w", encoding="utf-8") as f:
            for row, pred in zip(inputs, preds):
                f.write(json.dumps({**row, **{names[k]: v for k, v in pred.items()}}, ensure_ascii=False,
                                   default=str) + "\n")
    tmp.replace(out)  # never leave a half-written predictions file behind
