"""Load a task's split for one language from a local folder or the hub."""
from __future__ import annotations

import os
from pathlib import Path

from topro.data.readers import READERS, DataFormatError, Sentence
from topro.data.tasks import Task, get_task, language_meta

DATA_DIR_ENV = "TOPRO_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir`` if given, else ``$TOPRO_DATA_DIR``, else ``None`` (the hub)."""
    value = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def split_path(task: Task, lang: str, split: str, data_dir: Path) -> Path:
    return data_dir / task.name / task.file_pattern.format(split=split, lang=lang)


def available_languages(task: str | Task, split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Languages of ``task`` that have ``split`` in the local data folder (all, for the hub)."""
    task = get_task(task)
    root = resolve_data_dir(data_dir)
    if root is None:
        return list(task.languages)
    return [lang for lang in task.languages if split_path(task, lang, split, root).is_file()]


def load_split(task: str | Task, lang: str, split: str, data_dir: str | os.PathLike | None = None,
               limit: int | None = None) -> list[Sentence]:
    """Sentences of ``task``'s ``split`` in ``lang``; tags are checked against the label set."""
    task = get_task(task)
    root = resolve_data_dir(data_dir)
    if root is None:
        return _load_from_hub(task, lang, split, limit)
    path = split_path(task, lang, split, root)
    if not path.is_file():
        have = available_languages(task, split, root)
        raise DataFormatError(
            f"{path}: no {split} split for language {lang!r} of task {task.name!r}; "
            f"languages with a {split} split in {root}: {have}")
    return READERS[task.format](path, lang=lang, labels=task.labels, limit=limit)


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
        tags = [names[t] if names else str(t) for t in row[hub.tags]]
        for word, tag in zip(row[hub.words], tags):
            if tag not in allowed:
                raise DataFormatError(f"{where} row {i}: unknown tag {tag!r} for word {word!r}; "
                                      f"allowed tags: {sorted(allowed)}")
        sentences.append(Sentence(list(row[hub.words]), tags, lang, f"{where}#{i}"))
    if not sentences:
        raise DataFormatError(f"{where}: no sentences")
    return sentences
