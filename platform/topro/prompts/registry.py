"""Templates and verbalizers, read from ``topro/prompts/<task>.yaml`` (placeholders: ``prompts.placeholders``;
the LLM formats live beside them in ``llm_formats/``, rendered by ``topro.prompts.formats``).

Extra prompt files can live in folders named by ``TOPRO_PROMPTS_PATH``; a file
there for the same task adds templates and verbalizers (and may override).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from topro.config import ConfigError, read_yaml
from topro.data.tasks import get_task
from topro.prompts.placeholders import placeholders

BUILTIN_PROMPTS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Template:
    """A ToPro question asked about one word; the sentence is the other segment."""

    name: str
    task: str
    question: str
    """Holds ``{word}`` and ``{mask}`` (a classification task's: ``{mask}`` only, one question per text)."""


@dataclass(frozen=True)
class Verbalizer:
    """One label word per tag, and for tags given a list in the YAML, more seed words (other languages,
    synonyms) that ``rosprompt`` scores or expands from."""

    name: str
    task: str
    words: dict[str, str]
    """tag -> label word (the first of a list): what ToPro, soft ToPro and the LLM formats use."""
    seeds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """tag -> every seed word of the tag, the label word first (a plain string: just it)."""

    def word_list(self, labels: list[str]) -> list[str]:
        return [self.words[label] for label in labels]

    def seed_words(self, label: str) -> tuple[str, ...]:
        return self.seeds.get(label) or (self.words[label],)

    def all_words(self) -> set[str]:
        """Every word the verbalizer names (label words and seeds)."""
        return {w for label in self.words for w in self.seed_words(label)}


QUESTION_PLACEHOLDERS = {"tagging": {"word", "mask"}, "classification": {"mask"}}
"""What a template's question holds, per task kind: a tagging question asks about one word, a classification
question about the whole text (the pair's other segment)."""


def prompt_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("TOPRO_PROMPTS_PATH", "").split(os.pathsep) if p]
    return extra + [BUILTIN_PROMPTS]


@functools.lru_cache(maxsize=None)
def _prompts(task_name: str) -> tuple[dict[str, Template], dict[str, Verbalizer]]:
    task = get_task(task_name)
    templates: dict[str, Template] = {}
    verbalizers: dict[str, Verbalizer] = {}
    for folder in reversed(prompt_dirs()):
        path = folder / f"{task_name}.yaml"
        if not path.is_file():
            continue
        data = read_yaml(path)
        for key in data:
            if key not in ("task", "templates", "verbalizers"):
                raise ConfigError(f"{path}: unknown key {key!r} (expected task, templates, verbalizers)")
        needed = QUESTION_PLACEHOLDERS[task.kind]
        for name, spec in (data.get("templates") or {}).items():
            question = spec.get("question") if isinstance(spec, dict) else None
            if not isinstance(question, str) or placeholders(question) & {"word", "mask"} != needed:
                raise ConfigError(f"{path}: template {name!r} needs a 'question' holding "
                                  f"{' and '.join('{' + p + '}' for p in sorted(needed, reverse=True))}"
                                  + (" and no {word} (one question per text)" if "word" not in needed else ""))
            templates[name] = Template(name, task_name, question)
        for name, words in (data.get("verbalizers") or {}).items():
            if not isinstance(words, dict):
                raise ConfigError(f"{path}: verbalizer {name!r} must map tags to label words")
            missing = [label for label in task.labels if label not in words]
            unknown = [tag for tag in words if tag not in task.labels]
            if missing or unknown:
                raise ConfigError(f"{path}: verbalizer {name!r}: missing tags {missing}, unknown tags {unknown}")
            seeds = {tag: _seed_words(path, name, tag, value) for tag, value in words.items()}
            values = [w for ws in seeds.values() for w in ws]
            if len(set(values)) != len(values):
                raise ConfigError(f"{path}: verbalizer {name!r} uses a label word twice: {values}")
            verbalizers[name] = Verbalizer(name, task_name, {k: ws[0] for k, ws in seeds.items()}, seeds)
    return templates, verbalizers


def _seed_words(path: Path, verbalizer: str, tag: str, value) -> tuple[str, ...]:
    """A tag's words: a plain string (one label word) or a non-empty list of them (the first is the label word)."""
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(w, (str, int, float)) and str(w).strip() for w in value):
            raise ConfigError(f"{path}: verbalizer {verbalizer!r}: tag {tag!r} needs a word or a non-empty list of "
                              f"words, got {value!r}")
        return tuple(str(w) for w in value)
    if value is None or isinstance(value, dict) or not str(value).strip():
        raise ConfigError(f"{path}: verbalizer {verbalizer!r}: tag {tag!r} needs a word or a list of words, "
                          f"got {value!r}")
    return (str(value),)


def list_templates(task: str) -> list[str]:
    return sorted(_prompts(task)[0])


def list_verbalizers(task: str) -> list[str]:
    return sorted(_prompts(task)[1])


def get_template(task: str, name: str | None = None) -> Template:
    templates = _prompts(task)[0]
    name = name or get_task(task).default_template
    if name not in templates:
        raise ConfigError(f"unknown template {name!r} for task {task!r}; known: {sorted(templates)}")
    return templates[name]


def get_verbalizer(task: str, name: str | None = None) -> Verbalizer:
    verbalizers = _prompts(task)[1]
    name = name or get_task(task).default_verbalizer
    if name not in verbalizers:
        raise ConfigError(f"unknown verbalizer {name!r} for task {task!r}; known: {sorted(verbalizers)}")
    return verbalizers[name]
