"""Use a finished generation model: answer prompts (batched, left-padded, KV cache; greedy by default), stream one
answer token by token, answer a file, score a file with references.

Prompts go through the same renderer training used (data/chat_tokens.conversation_ids), so the model sees exactly
the tokens it learned to answer. A prompt is a string (one user turn) or a list of {role, content} turns.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from strop.data.batching import eval_batches
from strop.data.chat import ROLES, find_layout, to_chat_examples
from strop.data.chat_tokens import PLAIN_TEMPLATE, eos_id, prompt_ids
from strop.data.load import read_lines, read_table
from strop.errors import DataError
from strop.evaluate.generation_metrics import score_generations
from strop.predict import check_output, write_predictions


@dataclass
class Settings:
    """How to decode: max_new_tokens; temperature 0 = greedy; top_p (sampling only); stop strings."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def check(self) -> Settings:
        if self.max_new_tokens < 1:
            raise DataError(f"max_new_tokens={self.max_new_tokens}: generate at least 1 token")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise DataError(f"temperature={self.temperature} / top_p={self.top_p}: temperature must be >= 0 "
                            "(0 = greedy) and top_p in (0, 1]")
        return self


def as_turns(prompt) -> list[dict]:
    """A prompt as turns: a string is one user turn; a list of {role, content} is checked."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError("a prompt is empty; every prompt needs some text")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError("a prompt is a text or a non-empty list of {role, content} turns")
    for k, t in enumerate(prompt, 1):
        if not isinstance(t, dict) or t.get("role") not in ROLES or not isinstance(t.get("content"), str):
            raise DataError(f"turn {k} of a prompt must be {{'role': one of {list(ROLES)}, 'content': text}}")
    return [{"role": t["role"], "content": t["content"]} for t in prompt]


class Generator:
    """A loaded causal LM with its tokenizer and strop.json metadata; the generation task's predictor."""

    def __init__(self, model, tokenizer, meta: dict, device: torch.device, precision: str = "fp32", task=None):
        """precision bf16 casts the weights once (the generator owns `model`): autocast would re-cast every weight
        at every decoding step, which made greedy decoding 3x slower than fp32 on this CPU (measured, 4 prompts)."""
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        self.model, self.tokenizer, self.meta = model.to(device).eval(), tokenizer, meta
        self.device, self.precision, self.task = device, precision, task
        self.labels = []
        self.eos = eos_id(tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        saved = meta.get("generation", {})
        self.defaults = Settings(saved.get("max_new_tokens", 128), saved.get("temperature", 0.0),
                                 saved.get("top_p", 1.0), tuple(saved.get("stop", ())))

    def settings(self, **options) -> Settings:
        given = {k: v for k, v in options.items() if v is not None}
        if "stop" in given:
            given["stop"] = tuple([given["stop"]] if isinstance(given["stop"], str) else given["stop"])
        return Settings(**{**vars(self.defaults), **given}).check()

    def encode_prompt(self, prompt) -> list[int]:
        ids, _ = prompt_ids(self.tokenizer, as_turns(prompt), self.meta["max_length"])
        return ids

    # -- decoding ---------------------------------------------------------------------------------------------

    def _generate_batch(self, prompts: list[list[int]], s: Settings, streamer=None) -> list[list[int]]:
        from transformers import GenerationConfig

        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every row's next token is at the same position
            ids[row, width - len(p):] = torch.tensor(p)
            attn[row, width - len(p):] = 1
        config = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=s.temperature > 0,
                                  temperature=s.temperature if s.temperature > 0 else None,
                                  top_p=s.top_p if s.temperature > 0 else None, top_k=None,
                                  eos_token_id=self.eos, pad_token_id=self.pad,
                                  stop_strings=list(s.stop) or None)
        if s.temperature > 0:
            torch.manual_seed(s.seed)
        with torch.inference_mode():  # bf16 is in the weights already (__init__)
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                      generation_config=config, streamer=streamer,
                                      tokenizer=self.tokenizer if s.stop else None)
        return [row[width:].tolist() for row in out.cpu()]

    def finish(self, new: list[int], s: Settings) -> dict:
        """Generated ids -> {text, finish_reason, tokens}; cut at EOS or a stop string (neither is returned)."""
        stopped = self.eos in new
        new = new[:new.index(self.eos)] if stopped else [t for t in new if t != self.pad]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        if self.tokenizer.chat_template == PLAIN_TEMPLATE:
            text = text.removeprefix(" ")  # the plain format's space after "assistant:"
        cut = min((text.find(x) for x in s.stop if x in text), default=-1)
        if cut >= 0:
            text, stopped = text[:cut], True
        return {"text": text, "finish_reason": "stop" if stopped else "length", "tokens": len(new)}

    def generate_ids(self, prompts: list[list[int]], batch_size: int = 16, **options) -> list[dict]:
        """Answers to already-encoded prompts, in input order; batches of similar prompt length."""
        s = self.settings(**options)
        out: list[dict | None] = [None] * len(prompts)
        lengths = np.fromiter(map(len, prompts), dtype=np.int64, count=len(prompts))
        for idx in eval_batches(lengths, batch_size):
            for i, new in zip(idx, self._generate_batch([prompts[i] for i in idx], s)):
                out[i] = {**self.finish(new, s), "prompt_tokens": int(lengths[i])}
        return out

    def predict(self, prompts, pairs=None, batch_size: int = 16, **options) -> list[dict]:
        """One {text, finish_reason, tokens, prompt_tokens} per prompt (a text or a list of turns)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        return self.generate_ids([self.encode_prompt(p) for p in prompts], batch_size, **options)

    def predict_inputs(self, inputs: list, pairs=None, batch_size: int = 16) -> list[dict]:
        return self.predict(inputs, batch_size=batch_size)

    def stream(self, prompt, **options):
        """Yield the answer's text piece by piece as it is generated (one prompt)."""
        from transformers import TextIteratorStreamer

        s = self.settings(**options)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        ids = self.encode_prompt(prompt)
        worker = threading.Thread(target=self._generate_batch, args=([ids], s, streamer), daemon=True)
        worker.start()
        sent = ""
        for piece in streamer:
            sent += piece
            hit = min((sent.find(x) for x in s.stop if x in sent), default=-1)
            if hit >= 0:  # the stop string ends the answer; what came with it is not shown
                yield piece[:max(0, len(piece) - (len(sent) - hit))]
                break
            yield piece
        worker.join()

    # -- files ------------------------------------------------------------------------------------------------

    def file_examples(self, path, need_answers: bool, fmt: str = "auto", encoding: str = "utf-8", **columns):
        if fmt == "auto" and Path(path).suffix.lower() == ".txt":  # one prompt per line, as on stdin
            table = read_lines(path, encoding, "prompt")
        else:
            table = read_table(path, fmt, encoding)
        if isinstance(table, dict):
            raise DataError(f"{path} holds several splits {sorted(table)}; point to one")
        layout = find_layout(table.columns, columns.get("text_column"), columns.get("label_column"))
        if layout is None:
            raise DataError(f"{path}: no prompt column found (columns: {table.columns}); expected prompt (or "
                            "instruction, question), or messages; name yours with --text-column")
        ex = to_chat_examples(table, layout, "test" if need_answers else "predict", need_answers=False)
        return table, ex

    def predict_file(self, path, out: str | Path, batch_size: int = 16, fmt: str = "auto", encoding: str = "utf-8",
                     text_column=None, label_column=None, **options) -> int:
        """Answer every prompt of `path` (one per line in .txt; a prompt or messages column otherwise) into `out`
        (.jsonl or .csv), keeping the input columns."""
        check_output(out)
        table, ex = self.file_examples(path, False, fmt, encoding, text_column=text_column, label_column=label_column)
        rows = self.generate_ids([prompt_ids(self.tokenizer, p, self.meta["max_length"])[0] for p in ex.prompts()],
                                 batch_size, **options)
        write_predictions(out, table.columns, table.rows, rows, self.flat)
        return len(rows)

    def evaluate_file(self, path, batch_size: int = 16, **columns) -> dict:
        """Loss / perplexity and generation scores on a file with answers (completions or references)."""
        _, ex = self.file_examples(path, True, **columns)
        enc = self.task.encode(self.tokenizer, ex, self.meta)
        metrics, _ = self.task.evaluate(self.model, enc, [], batch_size, self.device, self.precision)
        outs = self.generate_ids(enc.prompts, batch_size)
        metrics.update(score_generations([o["text"] for o in outs], enc.references,
                                         [o["finish_reason"] == "stop" for o in outs]))
        metrics["truncated"] = enc.n_truncated
        return metrics

    def flat(self, pred: dict) -> dict:
        return {"generation": pred["text"], "finish_reason": pred["finish_reason"], "tokens": pred["tokens"]}
