"""Load a task's split for one language from a local folder or the hub."""
from __future__ import annotations

import os
from pathlib import Path

from topro.data.readers import READERS, DataFormatError, Sentence, TextExample, as_sentence
from topro.data.tasks import Task, get_task, language_meta

DATA_DIR_ENV = "TOPRO_DATA_DIR"
# A source checkout's neighbour ``../shared/data/xtreme`` (this project's machines and CI lay shared/ beside
# the clone): found without any setting, so every README command runs as written in a fresh clone.
CHECKOUT = Path(__file__).resolve().parents[3]
SHARED_DATA_DIR = CHECKOUT.parent / "shared" / "data" / "xtreme"


def hub_offline() -> bool:
    """True when the Hugging Face hub may not be used (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir`` if given, else ``$TOPRO_DATA_DIR``, else ``../shared/data/xtreme`` beside the source
    checkout where that folder exists, else ``None`` (the hub). The same lookup for every command."""
    value = data_dir or os.environ.get(DATA_DIR_ENV)
    if value:
        return Path(value).expanduser()
    if (CHECKOUT / "pyproject.toml").is_file() and SHARED_DATA_DIR.is_dir():
        return SHARED_DATA_DIR
    return None


def split_path(task: Task, lang: str, split: str, data_dir: Path) -> Path:
    return data_dir / task.name / task.file_pattern.format(split=split, lang=lang)


def available_languages(task: str | Task, split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Languages of ``task`` that have ``split`` in the local data folder (all, for the hub)."""
    task = get_task(task)
    root = resolve_data_dir(data_dir)
    if root is None:
        return list(task.languages)
    return [lang for lang in task.languages if split_path(task, lang, split, root).is_file()]


def default_split(task: Task | str, data_dir: str | None = None, langs: list[str] | None = None) -> str:
    """What ``topro evaluate`` scores without ``--split``: the task's ``final_split`` (UDPOS: test) when it
    is at hand, else dev (logged). Model selection never calls this: it reads English dev only."""
    import logging

    task = get_task(task)
    if task.final_split == "dev":
        return "dev"
    root = resolve_data_dir(data_dir)
    if root is None and not hub_offline():
        return task.final_split
    if root is not None:
        wanted = [lang for lang in (langs or task.languages) if lang != "all"] or task.languages
        if any(split_path(task, lang, task.final_split, root).is_file() for lang in wanted):
            return task.final_split
        if task.hub is not None and not hub_offline():
            return task.final_split
    logging.getLogger(__name__).warning(
        "%s: no %s split at hand (%s, hub offline); evaluating dev instead", task.name, task.final_split,
        root / task.name if root else "no data folder")
    return "dev"


def load_split(task: str | Task, lang: str, split: str, data_dir: str | os.PathLike | None = None,
               limit: int | None = None) -> list[Sentence]:
    """Sentences of ``task``'s ``split`` in ``lang``; tags are checked against the label set. A classification
    task's texts come as one-unit sentences (``topro.data.readers.as_sentence``)."""
    task = get_task(task)
    root = resolve_data_dir(data_dir)
    if root is None:
        return _load_from_hub(task, lang, split, limit)
    path = split_path(task, lang, split, root)
    if not path.is_file():
        return _load_missing_split(task, lang, split, root, path, limit)
    return READERS[task.format](path, lang=lang, labels=task.labels, limit=limit)


def _load_missing_split(task: Task, lang: str, split: str, root: Path, path: Path,
                        limit: int | None) -> list[Sentence]:
    """A split not in the local folder: from the hub where it is reachable, else a message saying where
    it was looked for and how the folder is laid out."""
    have = available_languages(task, split, root)
    layout = f"{root}/{task.name}/{task.file_pattern.format(split='<split>', lang='<lang>')}"
    only_test = f" ({lang} has only a test split in the benchmark)" if lang in task.test_only else ""
    why = f"{path}: no {split} split for language {lang!r} of task {task.name!r}{only_test}"
    where = f"--data-dir is laid out as {layout}; languages with a {split} split there: {have}"
    if task.hub is None or (hub_offline() and not Path(task.hub.path).expanduser().is_dir()):
        hub = "the hub is offline (HF_HUB_OFFLINE=1)" if task.hub else f"task {task.name!r} has no hub source"
        raise DataFormatError(f"{why}, and {hub}; {where}")
    try:
        return _load_from_hub(task, lang, split, limit)
    except DataFormatError as err:
        raise DataFormatError(f"{why}, and the hub did not have it either ({err}); {where}") from err


def _load_from_hub(task: Task, lang: str, split: str, limit: int | None) -> list[Sentence]:
    if task.hub is None:
        raise DataFormatError(f"task {task.name!r} has no hub source; pass --data-dir or set {DATA_DIR_ENV}")
    import datasets  # deferred: only needed without a local copy

    hub = task.hub
    config = hub.config.format(lang=lang, lang_name=language_meta(lang)["name"])
    hub_split = hub.splits.get(split, split)
    where = f"{hub.path}/{config}[{hub_split}]"
    try:
        ds = datasets.load_dataset(hub.path, config, split=hub_split)
    except Exception as err:  # network, missing config, missing split
        raise DataFormatError(f"{where}: could not load from the hub ({err}); "
                              f"pass --data-dir or set {DATA_DIR_ENV} to use a local copy") from err
    feature = ds.features[hub.tags]
    names = getattr(getattr(feature, "feature", None), "names", None)
    allowed = set(task.labels)
    sentences = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        if task.kind == "classification":
            sentences.append(_hub_text(task, row, lang, where, i, getattr(feature, "names", None), allowed))
            continue
        tags = [names[t] if names else str(t) for t in row[hub.tags]]
        for word, tag in zip(row[hub.words], tags):
            if tag not in allowed:
                raise DataFormatError(f"{where} row {i}: unknown tag {tag!r} for word {word!r}; "
                                      f"allowed tags: {sorted(allowed)}")
        sentences.append(Sentence(list(row[hub.words]), tags, lang, f"{where}#{i}"))
    if not sentences:
        raise DataFormatError(f"{where}: no sentences")
    return sentences


def _hub_text(task: Task, row: dict, lang: str, where: str, i: int, names: list[str] | None, allowed: set[str]) -> Sentence:
    """One hub row of a classification task (``hub.words``: the text column, ``hub.tags``: the label column)
    as a one-unit sentence."""
    value = row[task.hub.tags]
    label = names[value] if names and isinstance(value, int) else str(value)
    text = str(row[task.hub.words]).strip()
    if not text or label not in allowed:
        raise DataFormatError(f"{where} row {i}: " + (f"unknown label {label!r}; allowed labels: {sorted(allowed)}"
                                                      if text else f"empty text (label {label!r})"))
    return as_sentence(TextExample(text, label, lang, f"{where}#{i}"))
