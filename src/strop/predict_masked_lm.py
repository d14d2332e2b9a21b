"""A finished masked-LM run as `strop.load` gives it: it scores held-out text, and predicts nothing.

`evaluate_file` (`strop eval RUN --data held.txt`) reads documents as training did (data/corpus.py), packs
them with the run's settings and reports perplexity under the fixed evaluation masks
(data/masked_text.py), so it reproduces the run's final numbers on the same file. Predicting, explaining
and serving are refused with the task's reason: the run's product is its encoder, which a classifier is
fine-tuned from."""

from __future__ import annotations

import torch

from strop.data.corpus import documents_of, read_split_table
from strop.data.corpus import text_column as find_text_column
from strop.errors import DataError, ModelError


class MaskedLMScorer:
    """A loaded masked-LM model with its tokenizer, strop.json metadata and task object."""

    def __init__(self, model, tokenizer, meta: dict, device: torch.device, precision: str = "fp32",
                 task=None):
        self.model, self.tokenizer, self.meta = model.to(device), tokenizer, meta
        self.device, self.precision = device, precision
        self.task, self.labels = task, meta["labels"]

    def evaluate_file(self, path, batch_size: int = 128, fmt: str = "auto", encoding: str = "utf-8",
                      text_column: str | None = None, **_columns) -> dict:
        """{perplexity, masked_accuracy, loss, masked_tokens, documents} of the documents in `path` (.txt:
        one per line; a table: its text column, the run's own name when the table has it)."""
        table = read_split_table(path, fmt, encoding)
        if isinstance(table, dict):
            raise DataError(f"{path} holds several splits {sorted(table)}; point to one")
        trained = self.meta.get("text_column")
        name = text_column or (trained if trained in table.columns else None)
        docs = documents_of(table, find_text_column(table, name), "input")
        enc = self.task.encode(self.tokenizer, docs, self.meta)
        metrics, _ = self.task.evaluate(self.model, enc, self.labels, batch_size, self.device,
                                        self.precision)
        return {**metrics, "documents": len(docs)}

    def refuse(self, *args, **kwargs):
        raise ModelError(f"cannot predict with this model: {self.task.predict_refusal}")

    predict = predict_inputs = predict_file = explain = explain_inputs = refuse
