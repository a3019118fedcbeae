"""Prompt formats for LLM evaluation, kept as data: one YAML file per format
under `topro/prompts/llm_formats/` (adding a format is adding a file).

Two styles:
- `topro`: one prompt per word (ToPro). The shared prefix is the instruction,
  the demonstrations and the sentence; each word adds its question; the
  answer is a label word.
- `sentence`: the whole sentence at once; the model writes `word/TAG` pairs
  for every word (the MEGA-style in-context baseline).

A format file (``topro/prompts/llm_formats/<name>.yaml``) holds, per task, the text pieces, with the
prompt registry's placeholders (``topro.prompts.placeholders``):
  instruction   placeholders {label_list}; once, before the demonstrations
  sentence      {sentence}; the sentence block (demonstrations and test)
  question      {word}; topro only
  answer        {label}; topro only: the scored / generated label word
  answer_end    topro only: closes a demonstration's answer line
  answer_prefix sentence only: opens the answer ("Tags:")
  pair          {word} {label}; sentence only: one word's answer
  answer_suffix sentence only: closes a demonstration's answer
and at the top: name, description, style, label_words (`verbalizer`: the
task's verbalizer words; `tags`: the tag names), optional `verbalizer` (a
named verbalizer variant), `separator` (after each demonstration).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from topro.prompts.placeholders import fill, placeholders

FORMATS_DIR = Path(__file__).resolve().parent / "llm_formats"
"""The shipped LLM formats, in the prompt registry's folder beside the ToPro templates."""
STYLES = ("topro", "sentence")

# Field -> placeholders it may use, per style.
_FIELDS = {
    "topro": {"instruction": {"label_list"}, "sentence": {"sentence"}, "question": {"word"},
              "answer": {"label"}, "answer_end": set()},
    "sentence": {"instruction": {"label_list"}, "sentence": {"sentence"}, "answer_prefix": set(),
                 "pair": {"word", "label"}, "answer_suffix": set()},
}
_REQUIRED = {"topro": {"sentence", "question", "answer"}, "sentence": {"sentence", "pair"}}
_TOP = {"name", "description", "style", "label_words", "verbalizer", "separator", "tasks"}


class FormatError(ValueError):
    pass


@dataclass(frozen=True)
class TaskTemplates:
    """The text pieces of one format for one task (see module doc)."""

    instruction: str = ""
    sentence: str = "{sentence}\n"
    question: str = ""
    answer: str = " {label}"
    answer_end: str = "\n"
    answer_prefix: str = ""
    pair: str = " {word}/{label}"
    answer_suffix: str = "\n"


@dataclass(frozen=True)
class PromptFormat:
    name: str
    style: str
    label_words: str  # "verbalizer" or "tags"
    tasks: dict[str, TaskTemplates]
    description: str = ""
    verbalizer: str | None = None
    separator: str = "\n"
    path: str = ""

    def for_task(self, task: str) -> TaskTemplates:
        if task not in self.tasks:
            raise FormatError(f"{self.path or self.name}: format {self.name!r} has no templates for "
                              f"task {task!r} (it has: {', '.join(sorted(self.tasks))})")
        return self.tasks[task]


def list_formats() -> list[str]:
    """Names of the formats shipped with the package (the YAML files' stems)."""
    return sorted(p.stem for p in FORMATS_DIR.glob("*.yaml"))


def load_format(name_or_path: str | Path) -> PromptFormat:
    """A shipped format by name (`topro`, `sentence`, ...) or a YAML file path."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = FORMATS_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise FormatError(f"unknown prompt format {str(name_or_path)!r}; known: "
                              f"{', '.join(list_formats())} (or a path to a .yaml file)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return parse_format(raw, source=str(path))


def parse_format(raw: dict, source: str = "<format>") -> PromptFormat:
    """Validate a format mapping; errors name the file and the field."""
    if not isinstance(raw, dict):
        raise FormatError(f"{source}: a format file must hold a mapping")
    unknown = set(raw) - _TOP
    if unknown:
        raise FormatError(f"{source}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_TOP)}")
    for key in ("name", "style", "tasks"):
        if key not in raw:
            raise FormatError(f"{source}: missing field {key!r}")
    style = raw["style"]
    if style not in STYLES:
        raise FormatError(f"{source}: style: {style!r} is not one of {STYLES}")
    label_words = raw.get("label_words", "verbalizer")
    if label_words not in ("verbalizer", "tags"):
        raise FormatError(f"{source}: label_words: {label_words!r} is not 'verbalizer' or 'tags'")
    if not isinstance(raw["tasks"], dict) or not raw["tasks"]:
        raise FormatError(f"{source}: tasks: expected a mapping task -> templates")
    tasks = {}
    allowed = _FIELDS[style]
    for task, pieces in raw["tasks"].items():
        where = f"{source}: tasks.{task}"
        if not isinstance(pieces, dict):
            raise FormatError(f"{where}: expected a mapping of template fields")
        bad = set(pieces) - set(allowed)
        if bad:
            raise FormatError(f"{where}: field(s) {sorted(bad)} not used by style {style!r}; "
                              f"allowed: {sorted(allowed)}")
        missing = _REQUIRED[style] - set(pieces)
        if missing:
            raise FormatError(f"{where}: missing field(s) {sorted(missing)}")
        for key, text in pieces.items():
            if not isinstance(text, str):
                raise FormatError(f"{where}.{key}: expected a string")
            extra = placeholders(text) - allowed[key]
            if extra:
                raise FormatError(f"{where}.{key}: placeholder(s) {sorted(extra)} not allowed; "
                                  f"allowed: {sorted(allowed[key]) or 'none'}")
        tasks[task] = TaskTemplates(**pieces)
    return PromptFormat(name=str(raw["name"]), style=style, label_words=label_words, tasks=tasks,
                        description=str(raw.get("description", "")), verbalizer=raw.get("verbalizer"),
                        separator=str(raw.get("separator", "\n")), path=source)


# --- demonstrations ------------------------------------------------------------

@dataclass(frozen=True)
class Demo:
    """One K-shot demonstration: a training sentence and, for the topro style,
    the index of the word whose question is shown with its answer."""

    words: list[str]
    tags: list[str]
    word_index: int = -1


def select_demos(sentences: list, k: int, seed: int, style: str,
                 min_words: int = 3, max_words: int = 25) -> list[Demo]:
    """K demonstrations drawn with `seed` from training sentences (objects
    with .words and .tags). Short-to-medium sentences only, to keep prompts
    small. For the topro style each demonstration asks about one word, chosen
    so the demonstrations' labels differ where possible (else every PAN-X
    demonstration would answer "other")."""
    if k <= 0:
        return []
    rng = random.Random(seed)
    pool = [s for s in sentences if min_words <= len(s.words) <= max_words] or list(sentences)
    if len(pool) < k:
        raise ValueError(f"need {k} demonstration sentences, have {len(pool)}")
    chosen = rng.sample(pool, k)
    demos, seen = [], {}
    for s in chosen:
        if style == "sentence":
            demos.append(Demo(list(s.words), list(s.tags)))
            continue
        order = list(range(len(s.words)))
        rng.shuffle(order)
        index = min(order, key=lambda i: seen.get(s.tags[i], 0))
        seen[s.tags[index]] = seen.get(s.tags[index], 0) + 1
        demos.append(Demo(list(s.words), list(s.tags), index))
    return demos


# --- rendering -------------------------------------------------------------------

def label_list(words: dict[str, str]) -> str:
    """The tag set as the prompt lists it: label words in tag-name order, which
    is the paper's ("location organisation person place body name other")."""
    return " ".join(words[tag] for tag in sorted(words))


@dataclass
class ToProPrompts:
    """Text of one sentence's ToPro prompts, split where the model may share work:
    `context` (instruction + demonstrations, the same for every sentence of a
    run), `sentence` (this sentence's block), `questions` (one per word) and
    `answers` (continuation text per tag). Prompt i with label t is
    context + sentence + questions[i] + answers[t]."""

    context: str
    sentence: str
    questions: list[str]
    answers: dict[str, str]


def render_context(fmt: PromptFormat, task: str, label_words: dict[str, str],
                   demos: list[Demo]) -> str:
    t = fmt.for_task(task)
    parts = [fill(t.instruction, label_list=label_list(label_words))]
    for demo in demos:
        parts.append(fill(t.sentence, sentence=" ".join(demo.words)))
        if fmt.style == "topro":
            parts.append(fill(t.question, word=demo.words[demo.word_index]))
            parts.append(fill(t.answer, label=label_words[demo.tags[demo.word_index]]))
            parts.append(t.answer_end)
        else:
            parts.append(t.answer_prefix)
            parts.extend(fill(t.pair, word=w, label=label_words[tag])
                         for w, tag in zip(demo.words, demo.tags))
            parts.append(t.answer_suffix)
        parts.append(fmt.separator)
    return "".join(parts)


def format_label_words(fmt: PromptFormat, task: str, labels: list[str], verbalizer: str | None = None) -> dict[str, str]:
    """Tag -> the label word ``fmt`` shows: the tag itself (``label_words: tags``) or the ToPro verbalizer's
    word (``verbalizer``, else the format's own)."""
    if fmt.label_words == "tags":
        return {tag: tag for tag in labels}
    from topro.prompts import get_verbalizer

    words = dict(get_verbalizer(task, verbalizer or fmt.verbalizer).words)
    return {tag: words[tag] for tag in labels}


@dataclass
class TaskPrompt:
    """A format made concrete for one task: its label words and its context (instruction + demonstrations);
    what LLM evaluation (``llm.evaluate.prepare``) and ToPro training on causal LMs share."""

    task: object  # topro.data.tasks.Task
    fmt: PromptFormat
    label_words: dict[str, str]
    context: str


def task_prompt(task, format_name: str, verbalizer: str | None = None, demos: list[Demo] = ()) -> TaskPrompt:
    """``format_name`` for ``task`` (a ``Task``), with ``demos`` rendered into the context."""
    fmt = load_format(format_name)
    fmt.for_task(task.name)
    words = format_label_words(fmt, task.name, list(task.labels), verbalizer)
    return TaskPrompt(task, fmt, words, render_context(fmt, task.name, words, list(demos)))


def render_topro(fmt: PromptFormat, task: str, label_words: dict[str, str], context: str,
                 words: list[str]) -> ToProPrompts:
    t = fmt.for_task(task)
    return ToProPrompts(
        context=context,
        sentence=fill(t.sentence, sentence=" ".join(words)),
        questions=[fill(t.question, word=w) for w in words],
        answers={tag: fill(t.answer, label=word) for tag, word in label_words.items()},
    )


def render_sentence_prompt(fmt: PromptFormat, task: str, words: list[str]) -> str:
    """The sentence block and the answer opening, after which the model writes pairs."""
    t = fmt.for_task(task)
    return fill(t.sentence, sentence=" ".join(words)) + t.answer_prefix


def render_pair(fmt: PromptFormat, task: str, word: str) -> tuple[str, str]:
    """The text of one pair before the label and the label's own template
    (e.g. " Berlin/" and "{label}"), for constrained scoring of the sentence style."""
    pair = fmt.for_task(task).pair
    head, sep, tail = pair.partition("{label}")
    if not sep or "{word}" in tail:
        raise FormatError(f"{fmt.path}: tasks.{task}.pair: constrained scoring needs "
                          "{word} before {label}")
    return fill(head, word=word), "{label}" + tail
