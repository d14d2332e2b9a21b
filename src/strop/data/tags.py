"""Tag schemes for token classification: IOB1, IOB2 (= BIO) and BIOES; conversion, validation, repair, spans.

strop works in IOB2 internally (every entity starts with B-X, continues with I-X). Files in IOB1 or BIOES are converted
on load and predictions can be converted back (`from_iob2`). Spans are (start_word, end_word_exclusive, type).

Entity extraction (`spans`) reads invalid sequences the way conlleval and seqeval's default mode do: an I-X that does
not continue an X entity starts a new one. Validation (`invalid_positions`) reports those places, and `repair`
rewrites a sequence into the valid tags of the entities that lenient reading finds.
"""

from __future__ import annotations

SCHEMES = ("iob1", "iob2", "bioes")
PREFIXES = {"iob1": "BI", "iob2": "BI", "bioes": "BIES"}


def split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''). Raises ValueError for anything else."""
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[1] == "-" and tag[0] in "BIES":
        return tag[0], tag[2:]
    raise ValueError(tag)


def check_tag(tag: str, scheme: str) -> str | None:
    """None when `tag` is a well-formed tag of `scheme`; otherwise what is wrong with it."""
    try:
        prefix, _ = split_tag(tag)
    except ValueError:
        return f"tag {tag!r} is not O or <prefix>-<TYPE> with prefix B, I, E or S"
    if prefix != "O" and prefix not in PREFIXES[scheme]:
        return f"tag {tag!r} has prefix {prefix}-, which {scheme.upper()} does not use"
    return None


def detect_scheme(sequences) -> tuple[str, str]:
    """(scheme, why) from tag sequences: E-/S- tags -> bioes; an entity opened with I- and no B- after O -> iob1;
    else iob2."""
    b_opens = i_opens = False
    for tags in sequences:
        prev = "O"
        for tag in tags:
            p, t = tag[0], tag[2:]
            if p in "ES":
                return "bioes", f"E-/S- tags such as {tag!r}"
            opens = prev == "O" or prev[2:] != t
            if p == "B" and prev == "O":
                b_opens = True
            elif p == "I" and opens:
                i_opens = True
            prev = tag
    if i_opens and not b_opens:
        return "iob1", "entities start with I- (B- only between adjacent entities of one type)"
    return "iob2", "entities start with B-"


def spans(tags: list[str]) -> list[tuple[int, int, str]]:
    """Entities of an IOB2 sequence, read leniently (an I-X that continues nothing opens an entity)."""
    out, start, kind = [], None, None
    for i, tag in enumerate(tags):
        p, t = ("O", "") if tag == "O" else (tag[0], tag[2:])
        continues = p == "I" and kind == t and start is not None
        if start is not None and not continues:
            out.append((start, i, kind))
            start, kind = None, None
        if p in "BI" and not continues:
            start, kind = i, t
    if start is not None:
        out.append((start, len(tags), kind))
    return out


def from_spans(found: list[tuple[int, int, str]], n: int, scheme: str = "iob2") -> list[str]:
    """Valid tags of `scheme` for the entities `found` in a sequence of n words."""
    tags = ["O"] * n
    ends = set()
    for start, end, kind in found:
        for i in range(start, end):
            tags[i] = f"I-{kind}"
        if scheme == "bioes":
            tags[start] = f"S-{kind}" if end - start == 1 else f"B-{kind}"
            if end - start > 1:
                tags[end - 1] = f"E-{kind}"
        elif scheme == "iob2" or (start - 1) in ends and tags[start - 1][2:] == kind:
            tags[start] = f"B-{kind}"  # IOB1 uses B- only where an entity follows one of the same type
        ends.add(end - 1)
    return tags


def _lenient_spans(tags: list[str], scheme: str = "iob2") -> list[tuple[int, int, str]]:
    """Entities of a sequence in any scheme, read leniently: B-/S- open, I-/E- continue when the type matches (else
    open), S-/E- close."""
    out, start, kind, closed = [], None, None, True
    for i, tag in enumerate(tags):
        p, t = ("O", "") if tag == "O" else (tag[0], tag[2:])
        continues = p in "IE" and not closed and kind == t
        if start is not None and not continues:
            out.append((start, i, kind))
            start = None
        if p != "O" and not continues:
            start, kind = i, t
        closed = p in "ESO"
        if p in "ES" and start is not None:
            out.append((start, i + 1, kind))
            start = None
    if start is not None:
        out.append((start, len(tags), kind))
    return out


def to_iob2(tags: list[str], scheme: str) -> list[str]:
    """Convert a (valid) sequence of `scheme` to IOB2; invalid places are read leniently (see `repair`)."""
    if scheme == "iob2":
        return list(tags)
    return from_spans(_lenient_spans(tags, scheme), len(tags), "iob2")


def from_iob2(tags: list[str], scheme: str) -> list[str]:
    """Convert an IOB2 sequence to `scheme`."""
    return list(tags) if scheme == "iob2" else from_spans(spans(tags), len(tags), scheme)


def invalid_positions(tags: list[str], scheme: str) -> list[tuple[int, str]]:
    """(position, reason) for every tag that breaks `scheme`'s rules, e.g. I-PER after O in IOB2."""
    bad = []
    for i, tag in enumerate(tags):
        p, t = ("O", "") if tag == "O" else (tag[0], tag[2:])
        prev = tags[i - 1] if i else "O"
        pp, pt = ("O", "") if prev == "O" else (prev[0], prev[2:])
        nxt = tags[i + 1] if i + 1 < len(tags) else "O"
        np_, nt = ("O", "") if nxt == "O" else (nxt[0], nxt[2:])
        if scheme == "iob2" and p == "I" and (pp == "O" or pt != t):
            bad.append((i, f"{tag} follows {prev if i else 'the sentence start'}; in IOB2 an entity starts with B-"))
        elif scheme == "iob1" and p == "B" and (pp == "O" or pt != t):
            bad.append((i, f"{tag} follows {prev if i else 'the sentence start'}; in IOB1 B- only separates two "
                           "adjacent entities of one type"))
        elif scheme == "bioes":
            if p in "IE" and not (pp in "BI" and pt == t):
                bad.append((i, f"{tag} follows {prev if i else 'the sentence start'}; in BIOES it must follow "
                               f"B-{t} or I-{t}"))
            elif p in "BI" and not (np_ in "IE" and nt == t):
                bad.append((i, f"{tag} is followed by {nxt if i + 1 < len(tags) else 'the sentence end'}; in BIOES "
                               f"it must be followed by I-{t} or E-{t}"))
    return bad


def repair(tags: list[str], scheme: str) -> list[str]:
    """The valid `scheme` sequence of the entities that lenient reading finds (I-PER after O becomes B-PER in IOB2)."""
    return from_spans(_lenient_spans(tags, scheme), len(tags), scheme)


def tag_names(types: set[str]) -> list[str]:
    """IOB2 label names for entity types: O first, then B-/I- per type in sorted order."""
    return ["O"] + [f"{p}-{t}" for t in sorted(types) for p in "BI"]


def allowed_transitions(labels: list[str]) -> tuple[list[list[bool]], list[bool]]:
    """(allowed[i][j]: label j may follow label i, allowed_start[j]) for valid IOB2 sequences."""
    def ok(prev: str, cur: str) -> bool:
        return not cur.startswith("I-") or (prev != "O" and prev[2:] == cur[2:])

    return [[ok(a, b) for b in labels] for a in labels], [not b.startswith("I-") for b in labels]
