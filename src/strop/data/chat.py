"""Generation data: files of prompt -> completion pairs, Alpaca records or chat conversations -> conversations.

Every layout becomes one list of turns per example ({"role": system|user|assistant, "content": str}), so the model's
chat template renders all of them alike (data/chat_tokens.py):
- `prompt` + `completion` (also response / output / answer / target): one user turn, one assistant turn;
- `instruction` (+ optional `input`) + `output` (Alpaca): the instruction and input as one user turn;
- `messages` (OpenAI: role / content) or `conversations` (ShareGPT: from / value), several turns; the loss covers
  every assistant turn.
A test file may give `references` (a list of acceptable answers) instead of one completion; a prediction file needs
prompts only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from strop.data.examples import Columns
from strop.data.load import Table, read_table
from strop.data.prepare import Dataset, read_tables
from strop.data.split import split_ratio
from strop.errors import DataError

TASK = "generation"
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}  # ShareGPT / Gemini
CONVERSATION_COLUMNS = ("messages", "conversations")
PROMPT_COLUMNS = ("prompt", "instruction", "question", "query", "source", "input_text")
# not "target": classification tables use it for their labels (data/examples.LABEL_COLUMNS)
COMPLETION_COLUMNS = ("completion", "response", "output", "answer", "output_text")
REFERENCES_COLUMN = "references"
LAYOUTS = ("prompt + completion (or response / output / answer), instruction [+ input] + output (Alpaca), "
           "or messages / conversations (lists of {role, content} or {from, value} turns)")


@dataclass
class ChatExamples:
    """Validated examples of one split. conversations[i]: its turns; with a target, the last turn is the assistant's
    answer (scored at test time against references[i], which holds it and any other accepted answers)."""

    conversations: list[list[dict]]
    references: list[list[str]] | None  # None: prompts only (prediction input)
    rows: list[int]  # index of each example in its source table (to keep input columns in predictions)
    where: list[str]  # file:line of each example, for messages

    labels = None  # no class labels: the generic stages (few-shot checks, split sizes) see an unlabelled split

    def __len__(self) -> int:
        return len(self.conversations)

    def subset(self, idx) -> ChatExamples:
        idx = [int(i) for i in idx]
        refs = None if self.references is None else [self.references[i] for i in idx]
        return ChatExamples([self.conversations[i] for i in idx], refs, [self.rows[i] for i in idx],
                            [self.where[i] for i in idx])

    @property
    def texts(self) -> list[str]:
        """Each prompt as one text (the report's length histogram and split-leakage check read it)."""
        return ["\n".join(t["content"] for t in turns) for turns in self.prompts()]

    def prompts(self) -> list[list[dict]]:
        """Each conversation without its answer: what the model is asked."""
        return [c[:-1] if c and c[-1]["role"] == "assistant" and self.references is not None else c
                for c in self.conversations]


@dataclass
class Layout:
    """How a table holds its examples: kind 'conversation' (turns in `prompt`) or 'pair' (prompt [+ input] and
    completion columns); `references` names a column of answer lists."""

    kind: str
    prompt: str
    completion: str | None = None
    input: str | None = None
    references: str | None = None


def find_layout(columns: list[str], prompt: str | None = None, completion: str | None = None) -> Layout | None:
    """The layout of a table with these columns (prompt / completion: the user's column names), None if none."""
    found = set(columns)
    conv = next((c for c in CONVERSATION_COLUMNS if c in found), None)
    if conv and not prompt:
        refs = REFERENCES_COLUMN if REFERENCES_COLUMN in found else None
        return Layout("conversation", conv, references=refs)
    prompt = prompt or next((c for c in PROMPT_COLUMNS if c in found), None)
    if prompt is None or prompt not in found:
        return None
    completion = completion or next((c for c in COMPLETION_COLUMNS if c in found and c != prompt), None)
    refs = REFERENCES_COLUMN if REFERENCES_COLUMN in found else None
    extra = "input" if prompt == "instruction" and "input" in found else None
    if (completion is None or completion not in found) and refs is None:
        return Layout("pair", prompt, None, extra)  # prompts only: prediction input
    return Layout("pair", prompt, completion if completion in found else None, extra, refs)


def is_chat_data(cfg) -> bool:
    """task=generation, or task=auto with a training file laid out as generation data."""
    if cfg.task == TASK:
        return True
    if cfg.task != "auto" or not cfg.data.train or not Path(cfg.data.train).exists():
        return False
    try:
        table = read_table(cfg.data.train, cfg.data.format, cfg.data.encoding)
    except DataError:
        return False  # the fallback task reads it again and says what is wrong
    if isinstance(table, dict):
        table = table.get("train")
    if table is None:
        return False
    layout = find_layout(table.columns)
    return layout is not None and (layout.kind == "conversation" or layout.completion is not None)


# ---------------------------------------------------------------------------------------------------------------
# rows -> turns


def _text(value, where: str, what: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be text, got {type(value).__name__} ({str(value)[:40]!r})")
    return value


def _turn(item, where: str, k: int) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"{where}: turn {k} is {type(item).__name__}, not an object; write each turn as "
                        '{"role": "user", "content": "..."}')
    role = item.get("role", item.get("from"))
    content = item.get("content", item.get("value"))
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise DataError(f"{where}: turn {k} has role {role!r}; use one of {list(ROLES)} (ShareGPT's human / gpt "
                        "are read as user / assistant)")
    return {"role": role, "content": _text(content, where, f"turn {k}'s content")}


def conversation_of(row: dict, layout: Layout, where: str) -> list[dict]:
    """The turns of one row (its answer last when the row has one)."""
    if layout.kind == "conversation":
        turns = row.get(layout.prompt)
        if isinstance(turns, np.ndarray):  # Parquet lists
            turns = turns.tolist()
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: {layout.prompt!r} must be a non-empty list of turns, got "
                            f"{type(turns).__name__}")
        return [_turn(t, where, k) for k, t in enumerate(turns, 1)]
    prompt = _text(row.get(layout.prompt), where, repr(layout.prompt))
    if layout.input:
        extra = _text(row.get(layout.input), where, repr(layout.input))
        prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
    if not prompt.strip():
        raise DataError(f"{where}: the prompt ({layout.prompt!r}) is empty; give every row a prompt or remove it")
    turns = [{"role": "user", "content": prompt}]
    if layout.completion:
        turns.append({"role": "assistant",
                      "content": _text(row.get(layout.completion), where, repr(layout.completion))})
    return turns


def references_of(row: dict, layout: Layout, turns: list[dict], where: str) -> list[str] | None:
    """Accepted answers of a row: its references column, else its last assistant turn; None if it has neither."""
    if layout.references and row.get(layout.references) is not None:
        refs = row[layout.references]
        refs = refs.tolist() if isinstance(refs, np.ndarray) else refs
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise DataError(f"{where}: {layout.references!r} must be a non-empty list of non-empty texts")
        return refs
    if turns[-1]["role"] == "assistant":
        return [turns[-1]["content"]]
    return None


def check_answers(turns: list[dict], where: str) -> None:
    """A training row needs an assistant turn with text: without one nothing in it is learned."""
    answers = [t for t in turns if t["role"] == "assistant"]
    if not answers:
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing in it would be learned; add "
                        "the answer (completion / output / an assistant turn) or remove the row")
    empty = next((k for k, t in enumerate(turns, 1) if t["role"] == "assistant" and not t["content"].strip()), None)
    if empty is not None:
        raise DataError(f"{where}: assistant turn {empty} (the completion) is empty; give it the answer text or "
                        "remove the row")
    if turns[0]["role"] == "assistant" or (turns[0]["role"] == "system" and len(turns) > 1
                                           and turns[1]["role"] == "assistant"):
        raise DataError(f"{where}: the conversation starts with an assistant turn; begin it with the user's turn")


def to_chat_examples(table: Table, layout: Layout, split: str, need_answers: bool) -> ChatExamples:
    """Rows -> turns (+ references). need_answers: every row must hold something to learn (training data)."""
    convs, refs, where = [], [], []
    for i, row in enumerate(table.rows):
        at = table.where(i)
        turns = conversation_of(row, layout, at)
        if need_answers:
            check_answers(turns, at)
        elif turns[-1]["role"] == "assistant" and not turns[-1]["content"].strip() and not layout.references:
            raise DataError(f"{at}: the completion is empty; give the expected answer, or leave the column out "
                            "to only generate")
        convs.append(turns)
        refs.append(references_of(row, layout, turns, at))
        where.append(at)
    missing = [w for w, r in zip(where, refs) if r is None]
    if split != "predict" and missing:
        raise DataError(f"{missing[0]}: the {split} row has no answer to score against ({len(missing)} such rows); "
                        "give a completion or a references list")
    return ChatExamples(convs, None if missing else refs, list(range(len(convs))), where)


# ---------------------------------------------------------------------------------------------------------------
# files -> Dataset


@dataclass
class ChatDataset(Dataset):
    def carve_missing(self, d) -> None:
        """Validation/test from train where no file gave them, by prompt: every completion of one prompt lands in
        the same split, so a validation prompt is never one the model trained on (E2E has ~9 per prompt)."""
        _carve(self.splits, d, self.notes)


def table_layout(table: Table, d, split: str) -> Layout:
    layout = find_layout(table.columns, d.text_column, d.label_column)
    if layout is None:
        raise DataError(f"{table.path}: no generation columns found (columns: {table.columns}); expected "
                        f"{LAYOUTS}. Name yours with data.text_column (prompt) and data.label_column (completion)")
    if split == "train" and layout.kind == "pair" and layout.completion is None:
        raise DataError(f"{table.path}: a prompt column ({layout.prompt!r}) but no completion column (columns: "
                        f"{table.columns}); training needs the answers: add a completion column or name it with "
                        "data.label_column")
    return layout


def prepare_chat(cfg, carve: bool = True) -> ChatDataset:
    d = cfg.data
    tables = read_tables(d)
    splits, layouts = {}, {}
    for split, table in tables.items():
        layouts[split] = table_layout(table, d, split)
        splits[split] = to_chat_examples(table, layouts[split], split, need_answers=split == "train")
    first = layouts["train"]
    columns = Columns(text=first.prompt, pair=first.input, label=first.completion)
    notes = [f"generation data: {first.kind} layout ({first.prompt}"
             + (f" -> {first.completion}" if first.completion else "") + ")"]
    ds = ChatDataset(TASK, [], columns, splits, notes)
    if carve:
        ds.carve_missing(d)
    return ds


def prompt_key(turns: list[dict]) -> str:
    """What identifies a prompt: its turns up to the last answer."""
    return "\x1e".join(f"{t['role']}\x1f{t['content']}" for t in (turns[:-1] if len(turns) > 1 else turns))


def _carve(splits: dict, d, notes: list[str]) -> None:
    missing = [s for s in ("validation", "test") if s not in splits and split_ratio(d, s) > 0]
    for i, split in enumerate(missing):
        ratio = split_ratio(d, split) / (1 - sum(split_ratio(d, s) for s in missing[:i]))
        train = splits["train"]
        groups: dict[str, list[int]] = {}
        for k, turns in enumerate(train.conversations):
            groups.setdefault(prompt_key(turns), []).append(k)
        keys = list(groups)
        rng = np.random.default_rng(d.split_seed + i)
        order = rng.permutation(len(keys))
        take, held = int(round(len(train) * ratio)), []
        for g in order:
            if len(held) >= take:
                break
            held += groups[keys[g]]
        if not held or len(held) == len(train):
            raise DataError(f"{split} split: {ratio:.2f} of {len(train)} examples ({len(keys)} distinct prompts) "
                            f"leaves {'nothing' if not held else 'no training data'}; give a data.{split} file "
                            f"or change data.{split}_ratio")
        rest = sorted(set(range(len(train))) - set(held))
        splits[split], splits["train"] = train.subset(sorted(held)), train.subset(rest)
        notes.append(f"{split} split: {len(held)} examples carved from train by prompt "
                     f"({len(set(prompt_key(train.conversations[k]) for k in held))} prompts, ratio "
                     f"{split_ratio(d, split)})")
