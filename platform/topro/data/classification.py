"""Sentence-level classification data (task ``kind: classification``): ``text<TAB>label`` files, and the
PAN-X-derived entity-type task built from local data (Ray- and torch-free).

A classification task's files hold one example per line, ``text<TAB>label``; a line with no tab, an empty
text or a label the task does not have stops the reader with ``file:line``. ``derive_panx_entity_types``
builds such files from PAN-X: every sentence whose entities are all of one type (PER, ORG or LOC), labelled
with that type, for every language and split with PAN-X data at hand (task ``panx_type``,
``data/task_specs/panx_type.yaml``).

Training, evaluation and serving read a text as a one-unit ``Sentence`` (``as_sentence``: its one "word"
the whole text, its one tag the class), so batching, the loop, decoding, few-shot sampling and the
generalized zero-shot bookkeeping are the token tasks' own; the method class the registry names for the
``classification`` kind (``methods/classification.py``) encodes it as one prompt (or one head read) per text.

    python -m topro.data.classification --data-dir $TOPRO_DATA_DIR --out data/derived
    # then: --data-dir data/derived (files data/derived/panx_type/{train,dev}-<lang>.tsv)
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from topro import atomic
from topro.data.readers import (DataFormatError, Sentence, TextExample, as_sentence, read_text_sentences,  # noqa: F401
                                read_text_tsv, read_xtreme_tsv)
from topro.data.tasks import Task, get_task

DERIVED_TASK = "panx_type"
SOURCE_TASK = "panx"


def load_texts(task: str | Task, lang: str, split: str, data_dir: str | os.PathLike | None = None,
               limit: int | None = None) -> list[TextExample]:
    """The examples of a classification task's ``split`` in ``lang`` from the local data folder."""
    from topro.data.loading import resolve_data_dir, split_path

    task = get_task(task)
    if task.kind != "classification":
        raise ValueError(f"task {task.name!r} is a {task.kind} task; load it with topro.data.load_split")
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DataFormatError(f"task {task.name!r}: no data folder given (--data-dir or $TOPRO_DATA_DIR)")
    return read_text_tsv(split_path(task, lang, split, root), lang, task.labels, limit)


def single_type(tags: list[str]) -> str | None:
    """The one entity type of a sentence's IOB2 tags, or ``None`` (no entity, or several types)."""
    types = {t[2:] for t in tags if t[:2] in ("B-", "I-")}
    return types.pop() if len(types) == 1 else None


def derive_panx_entity_types(data_dir: str | Path, out: str | Path, splits: tuple[str, ...] = ("train", "dev"),
                             langs: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Write ``<out>/panx_type/{split}-{lang}.tsv`` from PAN-X in ``data_dir`` for every language (of
    ``langs``, default all) and split with a PAN-X file; returns ``{"<split>-<lang>": {type: count}}``."""
    source, target = get_task(SOURCE_TASK), get_task(DERIVED_TASK)
    folder = Path(out) / target.name
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for lang in langs or source.languages:
        for split in splits:
            path = Path(data_dir) / source.name / source.file_pattern.format(split=split, lang=lang)
            if not path.is_file():
                continue
            lines, tally = [], {label: 0 for label in target.labels}
            for sentence in read_xtreme_tsv(path, lang, source.labels):
                kind = single_type(sentence.tags)
                if kind is None:
                    continue
                text = " ".join(w.replace("\t", " ") for w in sentence.words)
                lines.append(f"{text}\t{kind}")
                tally[kind] += 1
            if lines:
                atomic.write_text(folder / target.file_pattern.format(split=split, lang=lang),
                                  "\n".join(lines) + "\n", "derived_task_data")
                counts[f"{split}-{lang}"] = tally
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Derive the panx_type classification task from local PAN-X data")
    p.add_argument("--data-dir", default=os.environ.get("TOPRO_DATA_DIR"), help="folder holding panx/")
    p.add_argument("--out", required=True, help="folder to write panx_type/ into")
    p.add_argument("--langs", help="comma-separated languages (default: every PAN-X language with data)")
    args = p.parse_args(argv)
    if not args.data_dir:
        p.error("--data-dir (or $TOPRO_DATA_DIR) is required")
    langs = [x for x in args.langs.split(",") if x] if args.langs else None
    for name, tally in derive_panx_entity_types(args.data_dir, args.out, langs=langs).items():
        print(name, " ".join(f"{k}={v}" for k, v in tally.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
