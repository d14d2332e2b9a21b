"""Small generated NER data: entity words come from fixed lists, so even a tiny random BERT learns them."""

from __future__ import annotations

import json
import random
from pathlib import Path

ENTITIES = {"PER": [["john", "smith"], ["maria"], ["ken", "lee"], ["anna", "berg"]],
            "LOC": [["paris"], ["new", "york"], ["berlin"], ["lake", "como"]],
            "ORG": [["acme", "corp"], ["unesco"], ["blue", "bank"]]}
FILLER = ["the", "visited", "said", "in", "with", "today", "and", "met", "from", "a", "report", "on"]


def toy_sentences(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """n sentences of (tokens, IOB2 tags)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(2, 4)):
            for w in rng.sample(FILLER, rng.randint(1, 3)):
                tokens.append(w)
                tags.append("O")
            kind = rng.choice(sorted(ENTITIES))
            words = rng.choice(ENTITIES[kind])
            tokens += words
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        out.append((tokens, tags))
    return out


def write_conll(path: Path, sentences, docstart: bool = True) -> Path:
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for tokens, tags in sentences:
        lines += [f"{t} NN B-NP {g}" for t, g in zip(tokens, tags)] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_token_jsonl(path: Path, sentences) -> Path:
    path.write_text("".join(json.dumps({"tokens": t, "tags": g}) + "\n" for t, g in sentences), encoding="utf-8")
    return path
