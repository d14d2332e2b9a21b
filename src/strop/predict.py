"""Use a finished model: predict texts or files (input order kept), evaluate labelled files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from strop.data.batching import encode
from strop.data.examples import Columns, Examples, resolve_columns, to_examples
from strop.data.load import Table, read_lines, read_table
from strop.device import resolve_device
from strop.errors import DataError
from strop.evaluate.evaluator import batched_logits, evaluate, outputs
from strop.models.classifier import load_model
from strop.run import open_run


class Predictor:
    """A loaded model with its tokenizer and strop.json metadata (task, labels, columns, threshold)."""

    def __init__(self, model, tokenizer, meta: dict, device: torch.device, precision: str = "fp32"):
        self.model, self.tokenizer, self.meta = model.to(device), tokenizer, meta
        self.device, self.precision = device, precision
        self.task, self.labels = meta["task"], meta["labels"]

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", precision: str = "fp32") -> "Predictor":
        """From a run folder, its model/ folder, or an export folder (RUN/export, or one of its .onnx files)."""
        from strop.compress.onnx import export_file_of, load_export

        onnx_file = export_file_of(path)
        if onnx_file is not None:  # ONNX Runtime behind the same interface (CPU, fp32 graph or int8)
            model, tokenizer, meta = load_export(onnx_file)
        else:
            model, tokenizer, meta = load_model(open_run(path))
        if meta["task"] == "token_classification":  # entities instead of labels: its own predictor, same verbs
            from strop.predict_tokens import TokenPredictor

            return TokenPredictor(model, tokenizer, meta, resolve_device(device), precision)
        return cls(model, tokenizer, meta, resolve_device(device), precision)

    def _raw(self, examples: Examples, batch_size: int) -> np.ndarray:
        """Outputs in input order: (n, L) probabilities, or (n,) values for regression."""
        enc = encode(self.tokenizer, examples, self.meta["max_length"])
        out = None
        for idx, logits, _ in batched_logits(self.model, enc, batch_size, self.device, self.precision):
            values = outputs(logits, self.task).numpy()
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
        raw = self._raw(Examples(list(texts), pairs, None, list(range(len(texts)))), batch_size)
        return [self._format(row) for row in raw]

    def _format(self, row) -> dict:
        if self.task == "regression":
            return {"value": float(row)}
        probs = {name: float(p) for name, p in zip(self.labels, row)}
        if self.task == "multi_label":
            return {"labels": [n for n, p in probs.items() if p >= self.meta["threshold"]], "probs": probs}
        best = int(np.argmax(row))
        return {"label": self.labels[best], "score": float(row[best]), "probs": probs}

    def _file_examples(self, path, need_label: bool, text_column=None, pair_column=None, label_column=None,
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
        return table, to_examples(table, cols, self.task, self.labels, m.get("label_delimiter"), "input", need_label)

    def evaluate_file(self, path, batch_size: int = 128, **columns) -> dict:
        """Metrics of this model on a labelled file (same metrics as training's final evaluation)."""
        _, ex = self._file_examples(path, True, **columns)
        enc = encode(self.tokenizer, ex, self.meta["max_length"])
        metrics, _ = evaluate(self.model, enc, self.task, self.labels, batch_size, self.device, self.precision,
                              self.meta.get("threshold", 0.5))
        metrics["truncated"] = enc.n_truncated
        return metrics

    def predict_file(self, path, out: str | Path, batch_size: int = 64, **columns) -> int:
        """Write predictions for every row of `path` to `out` (.jsonl or .csv), keeping the input columns (an
        output named like an input column, such as a gold 'label', is written as 'pred_label')."""
        check_output(out)  # before the work, not after it
        table, ex = self._file_examples(path, False, **columns)
        rows = [self._format(r) for r in self._raw(ex, batch_size)]
        write_predictions(out, table.columns, table.rows, rows, self.labels, self.task)
        return len(rows)


def _present(table: Table, name: str | None) -> str | None:
    return name if name and name in table.columns else None


def _flat(pred: dict, labels: list[str], task: str) -> dict:
    """Prediction dict -> flat CSV columns."""
    if task == "token_classification":
        return {"entities": json.dumps(pred["entities"], ensure_ascii=False)}
    if task == "regression":
        return {"prediction": pred["value"]}
    flat = {"prediction": pred["label"] if task == "single_label" else "|".join(pred["labels"])}
    if task == "single_label":
        flat["score"] = pred["score"]
    flat.update({f"prob_{n}": pred["probs"][n] for n in labels})
    return flat


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


def write_predictions(out, columns, inputs, preds, labels, task) -> None:
    """Each input row with its prediction, in input order; the input's own columns are never overwritten."""
    out = check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix.lower() == ".csv":
        flat = [_flat(pred, labels, task) for pred in preds]
        names = _renamed(flat[0] if flat else [], columns)
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns) + list(names.values()))
            writer.writeheader()
            for row, values in zip(inputs, flat):
                writer.writerow({**row, **{names[k]: v for k, v in values.items()}})
    else:
        names = _renamed(preds[0] if preds else [], columns)
        with open(tmp, "w", encoding="utf-8") as f:
            for row, pred in zip(inputs, preds):
                f.write(json.dumps({**row, **{names[k]: v for k, v in pred.items()}}, ensure_ascii=False,
                                   default=str) + "\n")
    tmp.replace(out)  # never leave a half-written predictions file behind
