"""What every predict route checks in a request's inputs, whatever the task: counts, blank and unencodable texts,
and the word clipping that bounds the tokenizer's work on long inputs. No HTTP here beyond the error it raises.

classify.py (classification) and entities.py (token classification) build on these; app.py maps ApiError to a
response.
"""

from __future__ import annotations

import re

# inputs of up to this many characters are tokenized on the event loop: a thread hop costs more than tokenizing them
INLINE_TOKENIZE_CHARS = 2000
WORD = re.compile(r"\S+")


class ApiError(Exception):
    """An error answered as {"error": {...}} with this status."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def check_input_count(n: int, max_inputs: int) -> None:
    """An empty request is a 400, more than serve.max_inputs inputs a 413 (every task's request)."""
    if n == 0:
        raise ApiError(400, "empty_input", "inputs is empty; send at least one text, e.g. {\"inputs\": [\"hello\"]}")
    if n > max_inputs:
        raise ApiError(413, "too_many_inputs", f"{n} inputs in one request; the limit is {max_inputs} "
                       "(serve.max_inputs): split them over several requests")


def is_blank(text: str) -> bool:
    """True for a text with nothing but whitespace (str.isspace's set: the published schema's pattern matches the
    others, schema.NON_BLANK)."""
    return not text.strip()


def is_encodable(text: str) -> bool:
    """False for a text holding an unpaired UTF-16 surrogate (JSON's \\ud800-\\udfff escapes allow one), which no
    tokenizer can encode."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def clip_words(text: str, n: int) -> tuple[str, bool]:
    """(text up to the end of its n-th whitespace-separated word, whether anything but whitespace was cut)."""
    end = 0
    for i, match in enumerate(WORD.finditer(text)):
        if i == n:
            return text[:end], True
        end = match.end()
    return text, False
