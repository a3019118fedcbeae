"""LLM evaluation of one language: sentences -> prompts -> predictions -> metrics.

Four ways to get a sentence's tags, by format style and mode:
- topro + score: every word's question is answered by the label word of
  highest log-likelihood (summed over its tokens, optionally per token;
  optionally calibrated against a content-free word).
- topro + generate: greedy answer to every word's question, matched to a
  label word; unmatched answers are format failures.
- sentence + generate: the whole-sentence baseline; the answer's `word/TAG`
  pairs are parsed tolerantly and aligned to the words; words without a valid
  tag are format failures.
- sentence + score: the same prompt decoded under constraint, word by word:
  the model's own pairs so far, then the tag of highest likelihood (no format
  failure can occur).
Format failures get the task's fallback tag (O, or X), so the metric pays for
them, and are reported per language (`format_failure_rate`, over words).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from topro.data import Sentence, get_task, load_split
from topro.data.tasks import Task
from topro.llm.backends import ANSWER_END_SCORED, Backend, scored_answer_ends
from topro.prompts.formats import (PromptFormat, load_format, render_context, render_pair, task_prompt,
                               render_sentence_prompt, render_topro, select_demos)
from topro.llm.parse import label_lookup, match_label, parse_tagged_answer
from topro.evaluate import SentencePrediction, decode, load_scored_split, viterbi_scores
from topro.metrics import fallback_label, score_task
from topro.prompts.placeholders import fill

log = logging.getLogger(__name__)

MODES = ("score", "generate")


@dataclass
class LLMEvalConfig:
    """What to evaluate; everything here is logged as run parameters."""

    task: str
    model: str
    format: str = "topro"  # a format name (formats/*.yaml) or a YAML path
    mode: str = "score"  # score | generate
    shots: int = 0
    seed: int = 42  # demonstration sampling
    split: str = "dev"
    max_sentences: int | None = None  # first N sentences per language
    data_dir: str | None = None
    demo_lang: str = "en"
    demo_split: str = "train"
    verbalizer: str | None = None  # overrides the format's / task's default
    length_norm: bool = False  # score: mean instead of summed token log-prob
    calibrate: bool = False  # score: contextual calibration against a content-free word
    content_free_word: str = "N/A"
    max_new_tokens: int | None = None  # generate; default from the prompt
    generate_sentences: int = 32  # sentences whose prompts go to the backend together
    score_sentences: int = 16  # likewise for scoring (the backend packs them into forwards)
    answer_end_scored: str = "always"
    """topro-style score mode: ``always`` scores each label with the format's answer end after it (the line
    end, so a label whose tokens start another's can lose to it); ``when_needed`` drops it when the label
    words' tokenizations are prefix-free (checked once from the tokenizer and logged), so a single-token
    label costs no branch token and one logit row serves all labels; ``per_answer`` scores it after exactly
    the labels whose tokens start another label's (``llm.backends.scored_answer_ends``). ToPro training on
    causal LMs has the same setting: score with the value a checkpoint was trained with."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {MODES}")
        if self.shots < 0:
            raise ValueError(f"shots: {self.shots} is negative")
        if self.answer_end_scored not in ANSWER_END_SCORED:
            raise ValueError(f"answer_end_scored: {self.answer_end_scored!r} is not one of {ANSWER_END_SCORED}")

    @property
    def method(self) -> str:
        calibrated = "-calibrated" if self.calibrate and self.mode == "score" else ""
        return f"llm-{load_format(self.format).name}-{self.mode}-{self.shots}shot{calibrated}"


@dataclass
class RunSetup:
    """What every language of a run shares: format, labels, demonstrations."""

    task: Task
    fmt: PromptFormat
    label_words: dict[str, str]  # tag -> label word as the format shows it
    context: str  # instruction + demonstrations
    fallback: str  # tag given to a word whose answer failed
    demos: list = field(default_factory=list)
    answer_ends: list[str] | None = None  # after each label's topro answer (``answer_end_scored``), decided once


def prepare(cfg: LLMEvalConfig) -> RunSetup:
    task = get_task(cfg.task)
    demos = []
    if cfg.shots:
        fmt = load_format(cfg.format)
        train = load_split(task, cfg.demo_lang, cfg.demo_split, cfg.data_dir)
        demos = select_demos(train, cfg.shots, cfg.seed, fmt.style)
    prompt = task_prompt(task, cfg.format, cfg.verbalizer, demos)
    return RunSetup(task, prompt.fmt, prompt.label_words, prompt.context,
                    fallback_label(task.scheme, list(task.labels)), demos)


@dataclass
class SentenceResult:
    tags: list[str]
    failed: list[bool]
    reasons: dict[str, int] = field(default_factory=dict)
    log_probs: np.ndarray | None = None  # [n_words, n_labels] in score mode (label-normalised)


def _score_topro(backend: Backend, setup: RunSetup, cfg: LLMEvalConfig,
                 sentences: list[Sentence]) -> list[SentenceResult]:
    labels = setup.task.labels
    rendered = [render_topro(setup.fmt, setup.task.name, setup.label_words, setup.context, s.words)
                for s in sentences]
    # Each answer is scored with the format's answer end after it (the line
    # end): without it a label whose tokens start another label's could never
    # lose to it (p("noun") >= p("nouns")); ``when_needed`` drops it where none does, ``per_answer`` keeps
    # it after those answers only.
    if setup.answer_ends is None:
        setup.answer_ends = scored_answer_ends(cfg.answer_end_scored, setup,
                                               getattr(backend, "prompt_tokens", None),
                                               [rendered[0].answers[t] for t in labels])
    answers = [rendered[0].answers[t] + end for t, end in zip(labels, setup.answer_ends)]
    extra = []
    if cfg.calibrate:
        # Contextual calibration (Zhao et al., 2021): one more question per
        # sentence about a content-free word measures the label words' prior
        # in this context; dividing it out removes the bias toward some words.
        extra = [fill(setup.fmt.for_task(setup.task.name).question, word=cfg.content_free_word)]
    scored = backend.score_many(setup.context, [(p.sentence, p.questions + extra) for p in rendered], answers)
    out = []
    for sentence, result in zip(sentences, scored):
        scores = result.logprobs
        if cfg.length_norm:
            scores = scores / torch.tensor(result.continuation_tokens, dtype=scores.dtype)
        if cfg.calibrate:
            prior = torch.log_softmax(scores[-1].double(), dim=0).to(scores.dtype)
            scores = scores[:-1] - prior
        best = scores.argmax(dim=1).tolist()
        log_probs = torch.log_softmax(scores.double(), dim=1).numpy()
        out.append(SentenceResult([labels[i] for i in best], [False] * len(sentence), {}, log_probs))
    return out


def _score_sentence(backend: Backend, setup: RunSetup, cfg: LLMEvalConfig, sentence: Sentence) -> SentenceResult:
    """Constrained greedy decoding of the whole-sentence format."""
    labels = setup.task.labels
    task_name = setup.task.name
    answer = render_sentence_prompt(setup.fmt, task_name, sentence.words)
    tags, rows = [], []
    heads = [render_pair(setup.fmt, task_name, word) for word in sentence.words]
    suffix = setup.fmt.for_task(task_name).answer_suffix
    for k, (head, label_template) in enumerate(heads):
        continuations = [fill(label_template, label=setup.label_words[t]) for t in labels]
        # Scored with what follows a label (the next pair's word, or the answer's
        # end), so a tag that is a prefix of another does not win by being short.
        after = heads[k + 1][0] if k + 1 < len(heads) else suffix
        result = backend.score(setup.context, answer, [head], [c + after for c in continuations])
        scores = result.logprobs[0]
        if cfg.length_norm:
            scores = scores / torch.tensor(result.continuation_tokens, dtype=scores.dtype)
        best = int(scores.argmax())
        tags.append(labels[best])
        rows.append(torch.log_softmax(scores.double(), dim=0).numpy())
        answer += head + continuations[best]
    return SentenceResult(tags, [False] * len(sentence), {}, np.stack(rows) if rows else None)


def _generate_topro(backend: Backend, setup: RunSetup, cfg: LLMEvalConfig,
                    sentences: list[Sentence]) -> list[SentenceResult]:
    lookup = label_lookup(setup.label_words)
    prompts, owner = [], []
    for s_index, sentence in enumerate(sentences):
        p = render_topro(setup.fmt, setup.task.name, setup.label_words, setup.context, sentence.words)
        prompts.extend(p.sentence + q for q in p.questions)
        owner.extend([s_index] * len(sentence))
    longest = max(len(w) for w in setup.label_words.values())
    outputs = backend.generate(prompts, cfg.max_new_tokens or min(16, longest + 4), stop="\n",
                               context=setup.context)
    results = [SentenceResult([], [], {}) for _ in sentences]
    for s_index, text in zip(owner, outputs):
        tag = match_label(text, lookup)
        r = results[s_index]
        r.tags.append(tag if tag is not None else setup.fallback)
        r.failed.append(tag is None)
        if tag is None:
            r.reasons["unmatched"] = r.reasons.get("unmatched", 0) + 1
    return results


def _sentence_budget(setup: RunSetup, sentence: Sentence) -> int:
    """Generation cap for a whole-sentence answer: a generous estimate of its
    tokens (about two characters per token), the stop string ends it sooner."""
    longest = max(len(w) for w in setup.label_words.values())
    chars = sum(len(w) + longest + 2 for w in sentence.words)
    return min(2048, chars // 2 + 16)


def _generate_sentence(backend: Backend, setup: RunSetup, cfg: LLMEvalConfig,
                       sentences: list[Sentence]) -> list[SentenceResult]:
    lookup = label_lookup(setup.label_words)
    prompts = [render_sentence_prompt(setup.fmt, setup.task.name, s.words) for s in sentences]
    budget = cfg.max_new_tokens or max(_sentence_budget(setup, s) for s in sentences)
    outputs = backend.generate(prompts, budget, stop="\n", context=setup.context)
    results = []
    for sentence, text in zip(sentences, outputs):
        parsed = parse_tagged_answer(text, sentence.words, lookup, setup.fallback)
        results.append(SentenceResult(parsed.tags, parsed.failed, parsed.reasons))
    return results


def predict_sentences(backend: Backend, setup: RunSetup, cfg: LLMEvalConfig,
                      sentences: list[Sentence]) -> list[SentenceResult]:
    """Every sentence's prediction, a batch of sentences at a time. Between batches a stop request
    (``topro.interrupts``) raises ``StopNow``: a language can take an hour on a CPU, longer than a
    scheduler's grace period, so it is dropped rather than finished."""
    from topro.interrupts import stop_point

    style, mode = setup.fmt.style, cfg.mode
    results: list[SentenceResult] = []
    if mode == "score" and style == "sentence":
        for sentence in sentences:
            stop_point()
            results.append(_score_sentence(backend, setup, cfg, sentence))
            _progress(len(results), len(sentences))
        return results
    if mode == "score":
        step = max(1, cfg.score_sentences)
        for start in range(0, len(sentences), step):
            stop_point()
            results.extend(_score_topro(backend, setup, cfg, sentences[start:start + step]))
            _progress(len(results), len(sentences), step)
        return results
    many = _generate_topro if style == "topro" else _generate_sentence
    step = max(1, cfg.generate_sentences)
    for start in range(0, len(sentences), step):
        stop_point()
        results.extend(many(backend, setup, cfg, sentences[start:start + step]))
        _progress(len(results), len(sentences), step)
    return results


def _progress(done: int, total: int, every: int = 10) -> None:
    if done % every == 0 or done == total:
        log.info("%d/%d sentences", done, total)


def language_record(setup: RunSetup, sentences: list[Sentence], results: list[SentenceResult]) -> dict[str, Any]:
    task = setup.task
    gold = [s.tags for s in sentences]
    pred = [r.tags for r in results]
    record = score_task(task, gold, pred)
    if task.scheme == "iob2" and all(r.log_probs is not None for r in results):
        # Valid-IOB2 decoding of the same label scores, by the core's decoder (as fine-tuned evaluation).
        labels = list(task.labels)
        vit = [decode(task, labels, SentencePrediction(r.log_probs, 0, 0), viterbi=True) for r in results]
        record["viterbi"] = viterbi_scores(task, gold, vit)
    n_words = sum(len(s) for s in sentences)
    failed = sum(sum(r.failed) for r in results)
    predicted: dict[str, int] = {}
    for r in results:  # shows a model stuck on one label at a glance
        for tag in r.tags:
            predicted[tag] = predicted.get(tag, 0) + 1
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r.reasons.items():
            reasons[k] = reasons.get(k, 0) + v
    record.update(
        n_sentences=len(sentences), n_words=n_words, n_truncated_words=0,
        format_failure_rate=failed / n_words if n_words else 0.0,
        format_failed_words=failed,
        sentence_format_failure_rate=(sum(any(r.failed) for r in results) / len(results)) if results else 0.0,
        format_failure_reasons=reasons,
        predicted_label_counts=dict(sorted(predicted.items(), key=lambda kv: -kv[1])),
    )
    return record


def evaluate_llm_language(backend: Backend, cfg: LLMEvalConfig, lang: str,
                          setup: RunSetup | None = None) -> dict[str, Any]:
    """The per-language record of an LLM: the task's metrics, sizes, format failures, work and time.

    The LLM counterpart of ``topro.evaluate.evaluate_language``: prompting differs, what is scored
    (``evaluate.load_scored_split``: hidden gold labels refused) and the decoding do not (fallback tag
    ``metrics.fallback_label``, Viterbi ``evaluate.decode``, scores ``metrics.score_task``)."""
    setup = setup or prepare(cfg)
    sentences = load_scored_split(setup.task, lang, cfg.split, cfg.data_dir, cfg.max_sentences)
    before = (backend.counts.tokens, backend.counts.padded, backend.counts.forwards)
    start = time.perf_counter()
    results = predict_sentences(backend, setup, cfg, sentences)
    seconds = time.perf_counter() - start
    record = language_record(setup, sentences, results)
    record.update(seconds=round(seconds, 3), model_tokens=backend.counts.tokens - before[0],
                  model_padded_tokens=backend.counts.padded - before[1],
                  model_calls=backend.counts.forwards - before[2])
    counts = record["predicted_label_counts"]
    if record["n_words"] >= 50 and counts and next(iter(counts.values())) >= 0.9 * record["n_words"]:
        # What a near-zero score with no format failures usually is (gemma-3-270m, 0 shots, sentence format).
        tag, n = next(iter(counts.items()))
        log.warning("%s %s: the model gave %r to %d of %d words: stuck on one label (try demonstrations: "
                    "--shots)", cfg.task, lang, tag, n, record["n_words"])
    log.info("%s %s: %s=%.4f, format failures %.3f, %d sentences in %.1fs", cfg.task, lang,
             setup.task.metric, record[setup.task.metric], record["format_failure_rate"], len(sentences), seconds)
    return record


def run_params(cfg: LLMEvalConfig, setup: RunSetup) -> dict[str, Any]:
    params = asdict(cfg)
    params.update(method=cfg.method, style=setup.fmt.style, label_words=setup.fmt.label_words,
                  demos=[f"{' '.join(d.words)} | {d.words[d.word_index] if d.word_index >= 0 else '*'}"
                         for d in setup.demos])
    return params


def evaluate_llm(cfg: LLMEvalConfig, langs: list[str], backend: Backend, *,
                 kept: dict[str, dict] | None = None, save: Callable[[dict], Any] | None = None) -> dict[str, Any]:
    """Every language one after another with one backend (the sequential path).

    ``kept``: languages already scored (a stopped run resumed), not evaluated again. ``save(record)``: called
    with the record so far after every language (``partial: true`` until the last), so a kill costs at most
    the language under way. A stop request (``topro.interrupts``) drops the language under way and returns
    the record of those done."""
    from topro.interrupts import StopNow, active

    setup = prepare(cfg)
    from topro.progress import LanguageProgress

    languages = {lang: kept[lang] for lang in langs if lang in (kept or {})}
    languages_done = LanguageProgress(len(langs) - len(languages), "eval-llm")
    for lang in langs:
        if lang in languages:
            continue
        if active().requested:
            break
        try:
            languages[lang] = evaluate_llm_language(backend, cfg, lang, setup)
        except StopNow:
            log.warning("stopped: %s dropped (it was under way)", lang)
            break
        languages_done.done(lang, languages[lang].get("n_sentences", 0))
        if save is not None:
            save(finish_record(cfg, setup, languages, backend.name, langs))
    return finish_record(cfg, setup, languages, backend.name, langs)


def finish_record(cfg: LLMEvalConfig, setup: RunSetup, languages: dict[str, dict], model_name: str,
                  langs: list[str] | None = None) -> dict:
    """The results record of ``languages`` in the order of ``langs``; ``partial`` where some of ``langs``
    are missing (``topro.partial_results``)."""
    from statistics import fmean

    from topro.evaluate import results_record
    from topro.partial_results import unfinished

    langs = list(languages) if langs is None else langs
    record = results_record(setup.task, cfg.method, model_name,
                            {lang: languages[lang] for lang in langs if lang in languages},
                            extra={"split": cfg.split, "params": run_params(cfg, setup),
                                   **unfinished(langs, languages)})
    if languages:
        record["average"]["format_failure_rate"] = fmean(r["format_failure_rate"] for r in languages.values())
    return record
