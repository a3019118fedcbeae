"""Tolerant reading of model answers, with every failure counted.

- `parse_tagged_answer`: a whole-sentence answer of `word/TAG` pairs, aligned
  back to the sentence's words. Words the answer misses, mangles beyond
  recognition or tags with an unknown label are failures: they get the task's
  fallback tag (so the metric pays for them) and are counted, never dropped.
- `match_label`: a generated answer to one ToPro question, matched to a label.
"""
from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass, field

SEPARATORS = ("/", "_", "|")
_EDGE_PUNCT = ".,;:!?()[]{}\"'`*"


def _norm(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold().strip()


def label_lookup(label_words: dict[str, str]) -> dict[str, str]:
    """Normalised answer text -> tag: each tag's label word and its own name."""
    lookup = {}
    for tag, word in label_words.items():
        lookup.setdefault(_norm(tag), tag)
        lookup.setdefault(_norm(word), tag)
    return lookup


def _tag_of(text: str, lookup: dict[str, str]) -> str | None:
    key = _norm(text).strip(_EDGE_PUNCT)
    if key in lookup:
        return lookup[key]
    return lookup.get(key.replace("_", "-"))


def answer_line(text: str) -> str:
    """The answer's first non-empty line (the format puts the answer on one line)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def parse_pairs(text: str, lookup: dict[str, str]) -> list[tuple[str, str | None]]:
    """`word/TAG` pairs of a line; tag None where a pair's label is not a known one.
    Tokens without any separator are skipped (commentary, not pairs)."""
    pairs = []
    for token in answer_line(text).split():
        found: tuple[str, str | None] | None = None
        for sep in SEPARATORS:
            if sep not in token:
                continue
            word, _, label = token.rpartition(sep)
            tag = _tag_of(label, lookup)
            if tag is not None and word:
                found = (word, tag)
                break
            if found is None and word:
                found = (word, None)
        if found is not None:
            pairs.append(found)
    return pairs


@dataclass
class ParsedAnswer:
    tags: list[str]  # one per sentence word; the fallback tag where failed
    failed: list[bool]  # per word: no valid tag could be read for it
    n_pairs: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # missing / invalid_tag / no_pairs

    @property
    def n_failed(self) -> int:
        return sum(self.failed)


def _alike(a: str, b: str) -> bool:
    """Two spellings of one word: most of their characters in common (accents,
    casing and edge punctuation aside)."""
    strip = lambda t: "".join(c for c in unicodedata.normalize("NFKD", t) if not unicodedata.combining(c)).strip(_EDGE_PUNCT)
    a, b = strip(a) or a, strip(b) or b
    return a == b or difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= 0.7


def parse_tagged_answer(text: str, words: list[str], lookup: dict[str, str],
                        fallback: str) -> ParsedAnswer:
    """Align an answer's pairs to `words`: matching words in order (difflib over
    normalised words), then equal-length unmatched stretches position by
    position where the two words look alike (a word the model respelled,
    "Parfumeur" for "Parfümeur", still gets its tag; a pair about another
    word, e.g. of a sentence the model made up, is a failure, not a tag)."""
    pairs = parse_pairs(text, lookup)
    tags: list[str | None] = [None] * len(words)
    invalid = [False] * len(words)
    gold = [_norm(w) for w in words]
    pred = [_norm(w) for w, _ in pairs]
    matcher = difflib.SequenceMatcher(None, gold, pred, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal" or (op == "replace" and i2 - i1 == j2 - j1):
            for i, j in zip(range(i1, i2), range(j1, j2)):
                if op == "replace" and not _alike(gold[i], pred[j]):
                    continue
                tags[i] = pairs[j][1]
                invalid[i] = pairs[j][1] is None
    failed = [t is None for t in tags]
    reasons = {}
    if not pairs:
        reasons["no_pairs"] = len(words)
    else:
        n_invalid = sum(invalid)
        n_missing = sum(failed) - n_invalid
        if n_invalid:
            reasons["invalid_tag"] = n_invalid
        if n_missing:
            reasons["missing"] = n_missing
    return ParsedAnswer([t if t is not None else fallback for t in tags], failed, len(pairs), reasons)


def match_label(text: str, lookup: dict[str, str]) -> str | None:
    """The label a generated ToPro answer names: its first word (or the whole
    first line) matched against label words and tag names; else the longest
    label word the answer starts with; None if nothing matches."""
    line = answer_line(text)
    if not line:
        return None
    first = line.split()[0]
    for candidate in (first, line):
        tag = _tag_of(candidate, lookup)
        if tag is not None:
            return tag
    key = _norm(line)
    starts = [k for k in lookup if key.startswith(k)]
    return lookup[max(starts, key=len)] if starts else None
