"""The task registry: each task is one YAML file under ``topro/data/task_specs/``.

Adding a task (or a language to one) is data, not code: drop a YAML file with
its label set, languages, metric and file layout into ``task_specs/``, or into
a folder named by ``TOPRO_TASKS_PATH``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from topro.config import ConfigError, from_dict, read_yaml

BUILTIN_TASKS = Path(__file__).resolve().parent / "task_specs"
"""The shipped task definitions (one YAML file per task); ``TOPRO_TASKS_PATH`` folders come first."""
LANGUAGES_FILE = Path(__file__).resolve().parent / "languages.yaml"


@dataclass(frozen=True)
class HubSource:
    """Where ``datasets.load_dataset`` finds the task when no local copy is given."""

    path: str
    """Dataset id on the hub."""
    config: str
    """Config name; ``{lang}`` and ``{lang_name}`` are filled in."""
    words: str = "tokens"
    """Column holding the words."""
    tags: str = "tags"
    """Column holding the tags (class indices or strings)."""
    splits: dict[str, str] = field(default_factory=dict)
    """Our split name -> the hub's split name."""


@dataclass(frozen=True)
class Task:
    """A sequence-labeling task: label set, languages, metric and data layout."""

    name: str
    """Short name used in YAML, on the CLI, in MLflow and at the endpoint."""
    labels: list[str]
    """The label set, in a fixed order (the model's class order)."""
    languages: list[str]
    """Every language of the task in the benchmark (XTREME), including those with only a test split."""
    metric: Literal["accuracy", "f1"]
    """Headline metric, used for model selection."""
    scheme: Literal["tags", "iob2"] = "tags"
    """``iob2``: labels form spans scored by seqeval; ``tags``: independent tags."""
    kind: Literal["tagging", "classification"] = "tagging"
    """``tagging``: a label per word (sentences of word/tag pairs); ``classification``: one label per text
    (``text<TAB>label`` files, ``topro.data.classification``): scored by accuracy and macro-F1, its
    template asks one question per text (``{mask}``, no ``{word}``), and each method uses the class the
    registry names for this kind (``method_registry.MethodEntry.classification_cls``)."""
    description: str = ""
    format: Literal["tsv", "conllu", "conll", "text_tsv"] = "tsv"
    """Reader for local files (``text_tsv``: ``text<TAB>label``, classification tasks)."""
    file_pattern: str = "{split}-{lang}.tsv"
    """File name under ``<data_dir>/<task>/``; ``{split}`` and ``{lang}`` are filled in."""
    default_template: str = "topro"
    default_verbalizer: str = "topro"
    hub: HubSource | None = None
    test_only: list[str] = field(default_factory=list)
    """Languages that have only a test split in the benchmark (no train or dev)."""
    final_split: Literal["dev", "test"] = "dev"
    """Split ``topro evaluate`` scores by default once a run is selected on English dev (``test`` where the
    benchmark's test labels are public); model selection never reads it."""


def task_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("TOPRO_TASKS_PATH", "").split(os.pathsep) if p]
    return extra + [BUILTIN_TASKS]


@functools.lru_cache(maxsize=None)
def _registry() -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    for folder in reversed(task_dirs()):  # earlier folders override later ones
        for path in sorted(folder.glob("*.yaml")):
            task = from_dict(Task, read_yaml(path), str(path))
            if task.hub is not None and not isinstance(task.hub, HubSource):
                task = Task(**{**task.__dict__, "hub": from_dict(HubSource, task.hub, str(path))})
            if len(set(task.labels)) != len(task.labels):
                raise ConfigError(f"{path}: duplicate labels in {task.labels}")
            tasks[task.name] = task
    return tasks


def list_tasks() -> list[str]:
    return sorted(_registry())


def get_task(task: str | Task) -> Task:
    if isinstance(task, Task):
        return task
    registry = _registry()
    if task not in registry:
        raise ConfigError(f"unknown task {task!r}; known tasks: {sorted(registry)} "
                          f"(task files are read from {[str(d) for d in task_dirs()]})")
    return registry[task]


@functools.lru_cache(maxsize=None)
def language_info() -> dict[str, dict[str, Any]]:
    """Language code -> {name, family, script}."""
    return read_yaml(LANGUAGES_FILE)


def language_meta(lang: str) -> dict[str, str]:
    return language_info().get(lang, {"name": lang, "family": "unknown", "script": "unknown"})
