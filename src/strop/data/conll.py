"""Readers for token-classification data: CoNLL column files and JSONL with token and tag lists.

CoNLL: one token per line, whitespace-separated columns (token in `token_column`, tag in `tag_column`), sentences
separated by a blank line or a line of only spaces/tabs, `-DOCSTART-` lines skipped. JSONL: one sentence per line,
{"tokens": [...], "tags": [...]}. Every error names the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from strop.data.load import check_unicode, text_codec
from strop.errors import DataError

CONLL_SUFFIXES = (".conll", ".conll03", ".iob", ".iob1", ".iob2", ".bio", ".bioes", ".txt")
TOKENS_KEYS = ("tokens", "words")
TAGS_KEYS = ("tags", "ner_tags", "labels")


@dataclass
class Sentence:
    """One sentence: tokens, their tags (None for unlabelled input) and where it came from."""

    tokens: list[str]
    tags: list[str] | None
    path: str
    lines: list[int]  # 1-based line of each token (CoNLL), or the JSONL line repeated

    def where(self, i: int = 0) -> str:
        return f"{self.path}:{self.lines[i] if self.lines else '?'}"


def _text_lines(path: Path, encoding: str) -> list[str]:
    codec = text_codec(encoding)
    raw = path.read_bytes()
    try:
        return raw.decode(codec).splitlines()
    except UnicodeDecodeError as e:
        start = e.start + len(raw) - len(e.object)
        line = raw[:start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: byte 0x{raw[start]:02x} is not valid {encoding}; save the file as UTF-8 or "
                        "set data.encoding") from None


def read_conll(path: str | Path, token_column: int = 0, tag_column: int | None = -1,
               encoding: str = "utf-8") -> list[Sentence]:
    """Sentences of a CoNLL file; tag_column=None reads tokens only (prediction input)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; check the path")
    sentences: list[Sentence] = []
    tokens, tags, lines = [], [], []

    def flush():
        if tokens:
            sentences.append(Sentence(list(tokens), list(tags) if tag_column is not None else None, str(path),
                                      list(lines)))
        tokens.clear(), tags.clear(), lines.clear()

    need = max(token_column, tag_column if tag_column is not None and tag_column >= 0 else 0) + 1
    if tag_column is not None and tag_column < 0:
        need = max(need, -tag_column + (1 if token_column >= 0 else 0))
    for number, line in enumerate(_text_lines(path, encoding), start=1):
        fields = line.split()
        if not fields:
            flush()
            continue
        if fields[0] == "-DOCSTART-":
            flush()
            continue
        if len(fields) < need:
            what = f"the tag in column {tag_column} (ner.tag_column)" if tag_column is not None else \
                f"the token in column {token_column} (ner.token_column)"
            raise DataError(f"{path}:{number}: {line.strip()!r} has {len(fields)} column(s), but {what} needs "
                            f"{need}; fix the line, or set ner.token_column / ner.tag_column to the file's layout")
        tokens.append(fields[token_column])
        if tag_column is not None:
            tags.append(fields[tag_column])
        lines.append(number)
    flush()
    if not sentences:
        raise DataError(f"{path} holds no sentences (only blank or -DOCSTART- lines); expected one token per line "
                        "with its tag, sentences separated by blank lines")
    return sentences


def _key(row: dict, keys: tuple[str, ...], configured: str | None) -> str | None:
    if configured:
        return configured if configured in row else None
    return next((k for k in keys if k in row), None)


def read_token_jsonl(path: str | Path, need_tags: bool = True, tokens_key: str | None = None,
                     tags_key: str | None = None, encoding: str = "utf-8") -> list[Sentence]:
    """Sentences of a JSONL file with a list of tokens and (when need_tags) a list of tag strings per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; check the path")
    sentences = []
    for number, line in enumerate(_text_lines(path, encoding), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); one JSON object per "
                            "line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object with 'tokens' and 'tags', got "
                            f"{type(row).__name__}")
        check_unicode(row, line, f"{path}:{number}")
        tk, gk = _key(row, TOKENS_KEYS, tokens_key), _key(row, TAGS_KEYS, tags_key)
        if tk is None:
            raise DataError(f"{path}:{number}: no token list ({tokens_key or ' / '.join(TOKENS_KEYS)}) among keys "
                            f"{sorted(row)}; add it or set ner.tokens_key")
        tokens = row[tk]
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t.strip() for t in tokens):
            raise DataError(f"{path}:{number}: '{tk}' must be a non-empty list of non-empty strings, got "
                            f"{str(tokens)[:80]}")
        tags = None
        if need_tags:
            if gk is None:
                raise DataError(f"{path}:{number}: no tag list ({tags_key or ' / '.join(TAGS_KEYS)}) among keys "
                                f"{sorted(row)}; add it or set ner.tags_key")
            tags = row[gk]
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise DataError(f"{path}:{number}: '{gk}' must be a list of tag strings such as 'B-PER' (integer "
                                f"ids need their names), got {str(tags)[:80]}")
            if len(tags) != len(tokens):
                raise DataError(f"{path}:{number}: {len(tokens)} tokens but {len(tags)} tags; give one tag per "
                                "token")
        sentences.append(Sentence(tokens, tags, str(path), [number] * len(tokens)))
    if not sentences:
        raise DataError(f"{path} holds no sentences; expected one JSON object per line with 'tokens' and 'tags'")
    return sentences


def jsonl_has_token_lists(path: str | Path, encoding: str = "utf-8") -> bool:
    """True when the first JSON line of `path` (in data.encoding) holds a list of tokens (tokens / words)."""
    try:
        with open(path, encoding=text_codec(encoding)) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return isinstance(row, dict) and any(isinstance(row.get(k), list) for k in TOKENS_KEYS)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return False


def looks_like_conll(path: str | Path, probe: int = 200) -> bool:
    """True for a file whose first lines are -DOCSTART- or one token per line with a tag-like last column."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            head = [next(f, "") for _ in range(probe)]
    except OSError:
        return False
    rows = [line.split() for line in head if line.strip()]
    if not rows:
        return False
    if rows[0][0] == "-DOCSTART-":
        return True
    tagged = [r for r in rows if len(r) >= 2 and (r[-1] == "O" or r[-1][1:2] == "-")]
    return len(tagged) >= 0.9 * len(rows)


def read_sentences(path: str | Path, fmt: str, ner_cfg, need_tags: bool = True,
                   encoding: str = "utf-8") -> list[Sentence]:
    """Sentences of a token-classification file, CoNLL or JSONL (fmt auto = from the extension and content)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} not found; check the path (data.train/validation/test, or --data)")
    kind = fmt
    if fmt == "auto":
        kind = "jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "conll"
    if kind == "jsonl":
        return read_token_jsonl(path, need_tags, ner_cfg.tokens_key, ner_cfg.tags_key, encoding)
    if kind != "conll":
        raise DataError(f"{path}: token classification reads CoNLL or JSONL files, not data.format={fmt!r}")
    return read_conll(path, ner_cfg.token_column, ner_cfg.tag_column if need_tags else None, encoding)
