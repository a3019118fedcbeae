"""Readers for sequence-labeling files: XTREME TSV, CoNLL-U and two-column CoNLL.

Every reader returns ``Sentence`` records and raises ``DataFormatError`` naming
the file and line of the first problem, so bad data never passes silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator


class DataFormatError(ValueError):
    """A data file is malformed, empty, missing, or holds an unknown label."""


@dataclass(frozen=True)
class Sentence:
    """One labelled sentence: parallel lists of words and tags."""

    words: list[str]
    tags: list[str]
    lang: str = ""
    source: str = ""
    """Where it came from, ``file:line`` of its first word."""

    def __len__(self) -> int:
        return len(self.words)


def _check_tags(sentences: list[Sentence], labels: Iterable[str] | None, path: Path,
                lines: list[int]) -> None:
    if labels is None:
        return
    allowed = set(labels)
    for sentence, first_line in zip(sentences, lines):
        for offset, tag in enumerate(sentence.tags):
            if tag not in allowed:
                raise DataFormatError(
                    f"{path}:{first_line + offset}: unknown tag {tag!r} for word "
                    f"{sentence.words[offset]!r}; allowed tags: {sorted(allowed)}")


def _blocks(path: Path) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    """Yield (first line number, [(line number, line)]) per blank-line separated block."""
    block: list[tuple[int, str]] = []
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            if line.strip() == "":
                if block:
                    yield block[0][0], block
                    block = []
                continue
            block.append((number, line))
    if block:  # the last sentence may lack a trailing blank line
        yield block[0][0], block


def _open_checked(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path}: file is empty")
    return path


def read_xtreme_tsv(path: str | Path, lang: str = "", labels: Iterable[str] | None = None,
                    limit: int | None = None) -> list[Sentence]:
    """XTREME's ``word<TAB>tag`` format, one token per line, blank line between sentences."""
    path = _open_checked(path)
    sentences, starts = [], []
    for start, block in _blocks(path):
        words, tags = [], []
        for number, line in block:
            if "\t" not in line:
                raise DataFormatError(f"{path}:{number}: expected 'word<TAB>tag', got {line!r} (no tab)")
            word, tag = line.split("\t", 1)
            tag = tag.strip()
            if not tag or "\t" in tag:
                raise DataFormatError(f"{path}:{number}: expected exactly two tab-separated columns, got {line!r}")
            if word == "":
                raise DataFormatError(f"{path}:{number}: empty word in {line!r}")
            words.append(word)
            tags.append(tag)
        sentences.append(Sentence(words, tags, lang, f"{path}:{start}"))
        starts.append(start)
        if limit is not None and len(sentences) >= limit:
            break
    if not sentences:
        raise DataFormatError(f"{path}: no sentences (file holds only blank lines)")
    _check_tags(sentences, labels, path, starts)
    return sentences


def read_conllu(path: str | Path, lang: str = "", labels: Iterable[str] | None = None,
                limit: int | None = None) -> list[Sentence]:
    """CoNLL-U: the UPOS column; multiword ranges (``1-2``) and empty nodes (``1.1``) are skipped."""
    path = _open_checked(path)
    sentences, starts = [], []
    for start, block in _blocks(path):
        words, tags, first = [], [], None
        for number, line in block:
            if line.startswith("#"):
                continue
            cols = line.split("\t")
            if len(cols) != 10:
                raise DataFormatError(f"{path}:{number}: CoNLL-U needs 10 tab-separated columns, got {len(cols)}")
            token_id = cols[0]
            if "-" in token_id or "." in token_id:
                continue
            if not token_id.isdigit():
                raise DataFormatError(f"{path}:{number}: bad token id {token_id!r}")
            first = first or number
            words.append(cols[1])
            tags.append(cols[3])
        if words:
            sentences.append(Sentence(words, tags, lang, f"{path}:{first}"))
            starts.append(first)
        if limit is not None and len(sentences) >= limit:
            break
    if not sentences:
        raise DataFormatError(f"{path}: no sentences")
    _check_tags(sentences, labels, path, starts)
    return sentences


def read_conll(path: str | Path, lang: str = "", labels: Iterable[str] | None = None,
               limit: int | None = None) -> list[Sentence]:
    """Two-column CoNLL: ``word tag`` split on whitespace; ``-DOCSTART-`` lines are skipped."""
    path = _open_checked(path)
    sentences, starts = [], []
    for start, block in _blocks(path):
        words, tags, first = [], [], None
        for number, line in block:
            cols = line.split()
            if cols and cols[0] == "-DOCSTART-":
                continue
            if len(cols) != 2:
                raise DataFormatError(f"{path}:{number}: expected 'word tag' (2 columns), got {line!r}")
            first = first or number
            words.append(cols[0])
            tags.append(cols[1])
        if words:
            sentences.append(Sentence(words, tags, lang, f"{path}:{first}"))
            starts.append(first)
        if limit is not None and len(sentences) >= limit:
            break
    if not sentences:
        raise DataFormatError(f"{path}: no sentences")
    _check_tags(sentences, labels, path, starts)
    return sentences


READERS = {"tsv": read_xtreme_tsv, "conllu": read_conllu, "conll": read_conll}
