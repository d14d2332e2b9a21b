"""Conversations -> token ids with the supervised positions marked, through the model's own chat template.

One function renders every conversation, in training and when a finished model is asked (predict, chat, serve):
`conversation_ids` cuts the rendered text into segments at each assistant turn and tokenizes segment by segment, so
a prompt's tokens at prediction time are exactly the tokens that preceded the answer in training (a test checks
it). Each answer is supervised up to and including the end-of-sequence token (appended when the template does not
end a turn with it), so the model learns to stop. What the template adds after EOS (a newline) is context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from strop.data.batching import Encoded
from strop.errors import DataError, ModelError

# the format of a model without a chat template (a base model): role-labelled turns, the answer after "assistant:"
# (transformers renders templates with trim_blocks: a newline must be an expression, not text after a block tag).
# The answer follows "assistant:" after one space, which the generator drops from what it returns.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}"
                  "{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@dataclass
class ChatEncoded(Encoded):
    """A tokenized generation split. labels[i]: (len,) bool, the supervised positions of example i; prompts[i]:
    the ids a model is given to answer example i; references[i]: its accepted answers (None: prompts only)."""

    prompts: list[list[int]] = field(default_factory=list)
    references: list[list[str]] | None = None
    n_prompt_truncated: int = 0
    segments: list[list[int]] | None = None  # packed rows (`pack`): the length of each example in each row


def ensure_template(tokenizer) -> str | None:
    """Give a tokenizer without a chat template the plain one; returns a note to print, or None."""
    if getattr(tokenizer, "chat_template", None):
        return None
    tokenizer.chat_template = PLAIN_TEMPLATE
    return ("this model has no chat template (a base model?): examples are rendered as 'user: <prompt>' / "
            "'assistant: <answer>' lines, and predict / serve use the same format (saved with the model)")


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no end-of-sequence token, so the model could not learn to stop; set "
                         "eos_token in the model folder's tokenizer_config.json")
    return int(tokenizer.eos_token_id)


def render(tokenizer, turns: list[dict], generation_prompt: bool) -> str:
    if not turns:
        return ""
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def segments(tokenizer, turns: list[dict], ask: bool) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_answer) segments; ask: end with the generation prompt (the model's
    turn next) instead of an answer."""
    out, done = [], ""
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prefix, full = render(tokenizer, turns[:i], True), render(tokenizer, turns[:i + 1], False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ModelError("the model's chat template renders an earlier part of a conversation differently once "
                             "later turns follow (it rewrites past turns), so answers cannot be marked for the "
                             "loss; give single-turn examples or a model whose template only appends")
        out += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    if ask:
        prompt = render(tokenizer, turns, True)
        if not prompt.startswith(done):
            raise ModelError("the model's chat template renders a conversation differently when asked for the next "
                             "turn; use a model whose template only appends")
        out.append((prompt[len(done):], False))
    elif done != render(tokenizer, turns, False):
        out.append((render(tokenizer, turns, False)[len(done):], False))
    return [(text, answer) for text, answer in out if text]


def conversation_ids(tokenizer, turns: list[dict], ask: bool = False,
                     train_on_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """(token ids, supervised flags) of a conversation; with ask, the ids a model is given to answer it."""
    eos = eos_id(tokenizer)
    ids, mask = [], []
    for text, answer in segments(tokenizer, turns, ask):
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        if answer:
            end = part.index(eos) + 1 if eos in part else len(part)
            head, tail = part[:end] + ([] if eos in part else [eos]), part[end:]
            ids += head + tail
            mask += [True] * len(head) + [train_on_prompt] * len(tail)
        else:
            ids += part
            mask += [train_on_prompt] * len(part)
    return ids, mask


def prompt_ids(tokenizer, turns: list[dict], max_length: int) -> tuple[list[int], bool]:
    """(ids a model is given to answer `turns`, whether the prompt was cut from the left to max_length)."""
    ids, _ = conversation_ids(tokenizer, turns, ask=True)
    return (ids[-max_length:], True) if len(ids) > max_length else (ids, False)


def _fit(ids: list[int], mask: list[bool], max_length: int, answer_start: int, where: str):
    """Cut a too-long example from the left (the oldest context goes first); the final answer is never cut."""
    if len(ids) <= max_length:
        return ids, mask, False
    answer = len(ids) - answer_start
    if answer + 1 > max_length:
        raise DataError(f"{where}: the answer alone takes {answer} tokens (with the end-of-sequence token and what "
                        f"the chat template adds after it), more than model.max_length={max_length} leaves room for "
                        "with any prompt; raise model.max_length or shorten that completion (answers are never cut)")
    return ids[-max_length:], mask[-max_length:], True


def encode_chat(tokenizer, examples, max_length: int, train_on_prompt: bool = False) -> ChatEncoded:
    """Tokenize every example once: the whole conversation (answers marked) for the loss, the prompt for
    generation. A rows with references only is scored for the loss against its first reference."""
    ids_all, masks, prompts, cut, cut_prompts = [], [], [], 0, 0
    refs = examples.references
    for k, turns in enumerate(examples.conversations):
        full = turns if turns[-1]["role"] == "assistant" or refs is None else \
            turns + [{"role": "assistant", "content": refs[k][0]}]
        ids, mask = conversation_ids(tokenizer, full, train_on_prompt=train_on_prompt)
        asked = full[:-1] if full[-1]["role"] == "assistant" else full
        # rendered once: the prompt's ids and where the answer starts
        prompt, _ = conversation_ids(tokenizer, asked, ask=True)
        answer_start = len(prompt) if full[-1]["role"] == "assistant" else len(ids)
        prompt_cut = len(prompt) > max_length
        prompt = prompt[-max_length:]
        ids, mask, was_cut = _fit(ids, mask, max_length, answer_start, examples.where[k])
        cut, cut_prompts = cut + was_cut, cut_prompts + prompt_cut
        ids_all.append(ids)
        masks.append(np.asarray(mask, dtype=bool))
        prompts.append(prompt)
    lengths = np.fromiter((len(x) for x in ids_all), dtype=np.int64, count=len(ids_all))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    return ChatEncoded(ids_all, None, masks, lengths, cut, int(pad), prompts=prompts, references=refs,
                       n_prompt_truncated=cut_prompts)


def supervised_count(enc: ChatEncoded, idx: np.ndarray) -> int:
    """Tokens the loss covers in examples `idx`: supervised positions that have a position before them."""
    return int(sum(int(enc.labels[i][1:].sum()) for i in idx))


def collate_chat(enc: ChatEncoded, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (the token id where supervised, -100 elsewhere; the loss
    shifts them by one). Packed rows also get position_ids that restart at each example and a (batch, 1, seq, seq)
    attention mask that keeps each example's causal attention inside the example."""
    width = int(enc.lengths[idx].max())
    ids = np.full((len(idx), width), enc.pad_id, dtype=np.int64)
    attn = np.zeros((len(idx), width), dtype=np.int64)
    labels = np.full((len(idx), width), -100, dtype=np.int64)
    for row, i in enumerate(idx):
        n = int(enc.lengths[i])
        ids[row, :n] = enc.input_ids[i]
        attn[row, :n] = 1
        labels[row, :n] = np.where(enc.labels[i], enc.input_ids[i], -100)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
             "labels": torch.from_numpy(labels)}
    if enc.segments is not None:
        batch["position_ids"], batch["attention_mask"] = packed_masks([enc.segments[i] for i in idx], width)
    return batch


def packed_masks(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, bool attention mask (rows, 1, width, width)) of packed rows: a token sees the earlier tokens
    of its own example only. Padding sees itself (a query with nothing to attend to would make NaN)."""
    positions = np.zeros((len(rows), width), dtype=np.int64)
    segment = np.full((len(rows), width), -1, dtype=np.int64)  # -1: padding
    for r, lengths in enumerate(rows):
        start = 0
        for k, n in enumerate(lengths):
            positions[r, start:start + n] = np.arange(n)
            segment[r, start:start + n] = k
            start += n
    seg = torch.from_numpy(segment)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    mask = (same & causal) | torch.eye(width, dtype=torch.bool)
    return torch.from_numpy(positions), mask[:, None]


def pack(enc: ChatEncoded, max_length: int) -> ChatEncoded:
    """Several short examples per row of at most `max_length` tokens (first-fit, longest first, deterministic), so
    a batch holds no padding to speak of. The first token of each example is never scored: it would be predicted
    from the previous example."""
    order = np.argsort(-enc.lengths, kind="stable")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(enc.lengths[i])
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([]), room.append(max_length)
            slot = len(rows) - 1
        rows[slot].append(int(i))
        room[slot] -= n
    ids, masks, segments = [], [], []
    for members in rows:
        ids.append([t for i in members for t in enc.input_ids[i]])
        masks.append(np.concatenate([np.r_[False, enc.labels[i][1:]] for i in members]))
        segments.append([int(enc.lengths[i]) for i in members])
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return ChatEncoded(ids, None, masks, lengths, enc.n_truncated, enc.pad_id, segments=segments)


def check_supervised(enc: ChatEncoded, where: list[str], split: str) -> None:
    """Refuse a training row that kept no supervised token (the answer cut away): it would train nothing."""
    empty = [k for k, m in enumerate(enc.labels) if not m[1:].any()]
    if empty:
        raise DataError(f"{where[empty[0]]}: no token of the answer is left to learn from ({len(empty)} {split} "
                        "row(s) like it); give the row an answer or raise model.max_length")


def marked_example(tokenizer, enc: ChatEncoded, i: int = 0) -> list[tuple[str, bool]]:
    """Example i as (text, supervised) runs: what the model reads, and which part of it the loss covers."""
    runs, ids, mask = [], enc.input_ids[i], enc.labels[i]
    start = 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or mask[k] != mask[start]:
            runs.append((tokenizer.decode(ids[start:k]), bool(mask[start])))
            start = k
    return runs
