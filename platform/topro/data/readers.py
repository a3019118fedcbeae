"""Readers for sequence-labeling files: XTREME TSV, CoNLL-U and two-column CoNLL.

Every reader returns ``Sentence`` records and raises ``DataFormatError`` naming
the file and line of the first problem, so bad data never passes silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator


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
                word_lines: list[list[int]]) -> None:
    """``word_lines``: per sentence, the line number of each word (CoNLL-U interleaves lines that are not
    words: multiword ranges, empty nodes, comments)."""
    if labels is None:
        return
    allowed = set(labels)
    for sentence, numbers in zip(sentences, word_lines):
        for offset, tag in enumerate(sentence.tags):
            if tag not in allowed:
                raise DataFormatError(
                    f"{path}:{numbers[offset]}: unknown tag {tag!r} for word "
                    f"{sentence.words[offset]!r}; allowed tags: {sorted(allowed)}")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its line break), the file decoded as UTF-8; a bad byte is reported with
    its line, and a UTF-8 byte-order mark at the start is dropped (not kept in the first word)."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        number = data.count(b"\n", 0, err.start) + 1
        raise DataFormatError(f"{path}:{number}: not valid UTF-8 (byte "
                              f"{data[err.start]:#04x} at column {err.start - line_start + 1}); re-encode the "
                              "file as UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        yield number, line.rstrip("\r")


def _blocks(path: Path) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    """Yield (first line number, [(line number, line)]) per blank-line separated block."""
    block: list[tuple[int, str]] = []
    for number, line in _lines(path):
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


def _read_sentences(path: str | Path, parse: Callable[[Path, int, str], tuple[str, str] | None], lang: str,
                    labels: Iterable[str] | None, limit: int | None, no_sentences: str) -> list[Sentence]:
    """The frame every reader shares: blank-line separated blocks, one ``parse(path, number, line)`` per
    line (a (word, tag) pair, or None to skip the line; it raises naming the line), each sentence's
    source as ``path:first word's line``, ``limit`` sentences at most, then the tag check."""
    path = _open_checked(path)
    sentences, starts = [], []  # starts: per sentence, each word's line
    for _, block in _blocks(path):
        words, tags, numbers = [], [], []
        for number, line in block:
            pair = parse(path, number, line)
            if pair is None:
                continue
            words.append(pair[0])
            tags.append(pair[1])
            numbers.append(number)
        if words:
            sentences.append(Sentence(words, tags, lang, f"{path}:{numbers[0]}"))
            starts.append(numbers)
        if limit is not None and len(sentences) >= limit:
            break
    if not sentences:
        raise DataFormatError(f"{path}: {no_sentences}")
    _check_tags(sentences, labels, path, starts)
    return sentences


def _xtreme_tsv_line(path: Path, number: int, line: str) -> tuple[str, str]:
    if "\t" not in line:
        raise DataFormatError(f"{path}:{number}: expected 'word<TAB>tag', got {line!r} (no tab)")
    word, tag = line.split("\t", 1)
    tag = tag.strip()
    if not tag or "\t" in tag:
        raise DataFormatError(f"{path}:{number}: expected exactly two tab-separated columns, got {line!r}")
    if word == "":
        raise DataFormatError(f"{path}:{number}: empty word in {line!r}")
    return word, tag


def _conllu_line(path: Path, number: int, line: str) -> tuple[str, str] | None:
    if line.startswith("#"):
        return None
    cols = line.split("\t")
    if len(cols) != 10:
        raise DataFormatError(f"{path}:{number}: CoNLL-U needs 10 tab-separated columns, got {len(cols)}")
    token_id = cols[0]
    if "-" in token_id or "." in token_id:
        return None
    if not token_id.isdigit():
        raise DataFormatError(f"{path}:{number}: bad token id {token_id!r}")
    return cols[1], cols[3]


def _conll_line(path: Path, number: int, line: str) -> tuple[str, str] | None:
    cols = line.split()
    if cols and cols[0] == "-DOCSTART-":
        return None
    if len(cols) != 2:
        raise DataFormatError(f"{path}:{number}: expected 'word tag' (2 columns), got {line!r}")
    return cols[0], cols[1]


def read_xtreme_tsv(path: str | Path, lang: str = "", labels: Iterable[str] | None = None,
                    limit: int | None = None) -> list[Sentence]:
    """XTREME's ``word<TAB>tag`` format, one token per line, blank line between sentences."""
    return _read_sentences(path, _xtreme_tsv_line, lang, labels, limit,
                           "no sentences (file holds only blank lines)")


def read_conllu(path: str | Path, lang: str = "", labels: Iterable[str] | None = None,
                limit: int | None = None) -> list[Sentence]:
    """CoNLL-U: the UPOS column; multiword ranges (``1-2``) and empty nodes (``1.1``) are skipped."""
    return _read_sentences(path, _conllu_line, lang, labels, limit, "no sentences")


def read_conll(path: str | Path, lang: str = "", labels: Iterable[str] | None = None,
               limit: int | None = None) -> list[Sentence]:
    """Two-column CoNLL: ``word tag`` split on whitespace; ``-DOCSTART-`` lines are skipped."""
    return _read_sentences(path, _conll_line, lang, labels, limit, "no sentences")


@dataclass(frozen=True)
class TextExample:
    """One labelled text of a classification task."""

    text: str
    label: str
    lang: str = ""
    source: str = ""
    """``file:line``."""


def read_text_tsv(path: str | Path, lang: str = "", labels: list[str] | None = None,
                  limit: int | None = None) -> list[TextExample]:
    """``text<TAB>label`` per line (blank lines skipped); errors name ``file:line``."""
    path = _open_checked(path)
    allowed = set(labels) if labels is not None else None
    out = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataFormatError(f"{path}:{number}: expected 'text<TAB>label', got {line!r} (no tab)")
        text, label = line.rsplit("\t", 1)
        label = label.strip()
        if not text.strip():
            raise DataFormatError(f"{path}:{number}: empty text (label {label!r})")
        if allowed is not None and label not in allowed:
            raise DataFormatError(f"{path}:{number}: unknown label {label!r}; allowed labels: {sorted(allowed)}")
        out.append(TextExample(text.strip(), label, lang, f"{path}:{number}"))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataFormatError(f"{path}: no examples (file holds only blank lines)")
    return out


def as_sentence(example: TextExample) -> Sentence:
    """A text as the one-unit sentence the loop carries: words ``[text]``, tags ``[label]``."""
    return Sentence([example.text], [example.label], example.lang, example.source)


def read_text_sentences(path: str | Path, lang: str = "", labels: list[str] | None = None,
                        limit: int | None = None) -> list[Sentence]:
    """``read_text_tsv`` as one-unit sentences (what ``topro.data.load_split`` returns for these tasks)."""
    return [as_sentence(e) for e in read_text_tsv(path, lang, labels, limit)]


READERS = {"tsv": read_xtreme_tsv, "conllu": read_conllu, "conll": read_conll, "text_tsv": read_text_sentences}
