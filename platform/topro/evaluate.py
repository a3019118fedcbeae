"""Predict, reassemble per-word predictions into sentences, score per language (Ray-free)."""
from __future__ import annotations

import hashlib
import json
import dataclasses
import statistics
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from topro.batching import EVALUATION_MAX_TOKENS_PER_BATCH, MAX_EXAMPLES, token_budget_batches
from topro.config import EVAL_DTYPES
from topro.data.readers import Sentence
from topro.data.tasks import Task, get_task
from topro.methods import Method
from topro.metrics import accuracy, fallback_label, generalized_scores, score_task, span_scores, viterbi_iob2


@dataclass
class SentencePrediction:
    log_probs: np.ndarray
    """[n_words, n_labels]; rows of words without a prediction are NaN."""
    truncated_words: int
    trimmed_prompts: int


def cast_for_evaluation(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """The loaded model in the evaluation precision: cast once to float64 for ``fp64``; ``bf16`` runs
    under autocast (``autocast_for``), ``fp32`` as stored."""
    if dtype not in EVAL_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(EVAL_DTYPES)}")
    return model.double() if dtype == "fp64" else model


def autocast_for(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def predict(method: Method, model: torch.nn.Module, sentences: list[Sentence], *,
            max_tokens_per_batch: int = EVALUATION_MAX_TOKENS_PER_BATCH, max_examples: int = MAX_EXAMPLES,
            device: torch.device | None = None, dtype: str = "fp32", progress: bool = False,
            desc: str = "predict") -> list[SentencePrediction]:
    """Per-word label log-probabilities for every sentence, in forwards of at most ``max_tokens_per_batch``
    padded tokens and ``max_examples`` examples."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    examples = method.encode(sentences)
    precision = torch.float64 if dtype == "fp64" else torch.float32
    out = [SentencePrediction(torch.full((len(s), len(method.labels)), torch.nan, dtype=precision).numpy(), 0, 0)
           for s in sentences]
    for e in examples:
        out[e.sentence].truncated_words += e.truncated_words
        out[e.sentence].trimmed_prompts += len(e.words) * int(e.trimmed_context)  # packed rows hold several
    batches = token_budget_batches([e.length for e in examples], max_tokens_per_batch, max_examples)
    for batch_ids in tqdm(batches, desc=desc, disable=not progress, leave=False):
        chunk = [examples[i] for i in batch_ids]
        batch = {k: v.to(device) for k, v in method.collate(chunk).items()}
        with autocast_for(device, dtype):
            log_probs = method.label_log_probs(model, batch).to(precision).cpu().numpy()
        row = 0
        for e in chunk:
            for w in e.words:
                out[e.sentence].log_probs[w] = log_probs[row]
                row += 1
    model.train(was_training)
    return out


def decode(task: Task, labels: list[str], prediction: SentencePrediction, viterbi: bool = False) -> list[str]:
    lp = prediction.log_probs
    missing = np.isnan(lp).any(axis=1)
    fallback = fallback_label(task.scheme, labels)
    if viterbi and task.scheme == "iob2":
        filled = np.where(missing[:, None], np.log(1.0 / len(labels)), lp)
        if missing.any():  # a missing word is the fallback label for certain
            filled[missing] = np.where(np.array(labels) == fallback, 0.0, -1e9)
        return [labels[i] for i in viterbi_iob2(filled, labels)]
    return [fallback if miss else labels[int(row.argmax())] for row, miss in zip(lp, missing)]


def sentence_digest(sentence: Sentence) -> str:
    """A short fingerprint of a sentence's words: comparisons check both runs scored the same sentences."""
    return hashlib.sha1("\u241f".join(sentence.words).encode()).hexdigest()[:12]


def seen_word_scores(task: Task, gold: list[list[str]], pred: list[list[str]],
                     predictions: list[SentencePrediction]) -> dict[str, Any]:
    """Scores over the words the model saw (had a prediction for), named as such.

    The headline scores count every word, a word cut off by ``max_length`` as
    its fallback label; these drop such words from gold and prediction alike.
    """
    seen = [~np.isnan(p.log_probs).any(axis=1) for p in predictions]
    gold_seen = [[t for t, keep in zip(g, mask) if keep] for g, mask in zip(gold, seen)]
    pred_seen = [[t for t, keep in zip(q, mask) if keep] for q, mask in zip(pred, seen)]
    out: dict[str, Any] = {"n_seen_words": int(sum(m.sum() for m in seen)),
                           "accuracy_seen_words": accuracy(gold_seen, pred_seen)}
    if task.scheme == "iob2":
        out["f1_seen_words"] = span_scores(gold_seen, pred_seen)["f1"]
    return out


def viterbi_scores(task: Task, gold: list[list[str]], viterbi_pred: list[list[str]]) -> dict[str, float]:
    """The scores reported under ``viterbi``: the same label scores decoded as valid IOB2."""
    scores = score_task(task, gold, viterbi_pred)
    return {k: scores[k] for k in ("f1", "precision", "recall", "f1_strict", "accuracy") if k in scores}


def score_language(task: Task, labels: list[str], sentences: list[Sentence],
                   predictions: list[SentencePrediction], viterbi: bool = True,
                   keep_predictions: bool = True, unseen_labels: list[str] | None = None) -> dict[str, Any]:
    """Every score of one language; with ``keep_predictions`` also the per-sentence predictions
    (``predictions``: sentence digests, gold and predicted tags, what ``topro compare`` resamples).
    ``unseen_labels`` (held out of training) adds the seen / unseen / harmonic-mean scores
    (``metrics.generalized_scores``)."""
    gold = [s.tags for s in sentences]
    pred = [decode(task, labels, p) for p in predictions]
    result = score_task(task, gold, pred)
    if viterbi and task.scheme == "iob2":
        vit_pred = [decode(task, labels, p, viterbi=True) for p in predictions]
        result["viterbi"] = viterbi_scores(task, gold, vit_pred)
    result.update(n_sentences=len(sentences), n_words=sum(len(s) for s in sentences),
                  n_truncated_words=sum(p.truncated_words for p in predictions),
                  n_trimmed_prompts=sum(p.trimmed_prompts for p in predictions))
    result.update(seen_word_scores(task, gold, pred, predictions))
    if unseen_labels:
        result.update(generalized_scores(task, gold, pred, unseen_labels))
    if keep_predictions:
        result["predictions"] = {"digests": [sentence_digest(s) for s in sentences], "gold": gold, "pred": pred}
        if viterbi and task.scheme == "iob2":
            result["predictions"]["viterbi"] = vit_pred
    return result


def evaluate_sentences(method: Method, model, task: Task | str, sentences: list[Sentence], *,
                       viterbi: bool = True, max_tokens_per_batch: int = EVALUATION_MAX_TOKENS_PER_BATCH,
                       max_examples: int = MAX_EXAMPLES, device: torch.device | None = None, dtype: str = "fp32",
                       progress: bool = False, desc: str = "predict") -> dict[str, Any]:
    """Predict ``sentences`` (as ``predict`` does) and score them."""
    task = get_task(task)
    predictions = predict(method, model, sentences, max_tokens_per_batch=max_tokens_per_batch,
                          max_examples=max_examples, device=device, dtype=dtype, progress=progress, desc=desc)
    return score_language(task, method.labels, sentences, predictions, viterbi=viterbi,
                          unseen_labels=unseen_labels_of(method))


def unseen_labels_of(method: Method) -> list[str]:
    """The labels ``method`` was trained without (its spec's ``unseen_labels``; none for older checkpoints)."""
    return list(getattr(getattr(method, "spec", None), "unseen_labels", None) or [])


def seen_label_view(task: Task, labels: list[str], unseen: list[str], sentences: list[Sentence],
                    predictions: list[SentencePrediction]) -> tuple[list[Sentence], list[SentencePrediction]]:
    """The sentences and predictions as a run that never saw ``unseen`` is selected on: the unseen labels'
    scores at -inf (predictions are among the seen labels), and gold words of unseen labels out of the score
    (tag tasks: those words are dropped; IOB2 tasks: their tags read ``O``, so no span of an unseen type is
    counted)."""
    drop = np.array([label in set(unseen) for label in labels])
    out_sentences, out_predictions = [], []
    for sentence, p in zip(sentences, predictions):
        lp = p.log_probs.copy()
        lp[:, drop] = -np.inf
        if task.scheme == "iob2":
            tags = ["O" if t in set(unseen) else t for t in sentence.tags]
            out_sentences.append(dataclasses.replace(sentence, tags=tags))
            out_predictions.append(dataclasses.replace(p, log_probs=lp))
            continue
        keep = [i for i, t in enumerate(sentence.tags) if t not in set(unseen)]
        if not keep:
            continue
        out_sentences.append(dataclasses.replace(sentence, words=[sentence.words[i] for i in keep],
                                                 tags=[sentence.tags[i] for i in keep]))
        out_predictions.append(dataclasses.replace(p, log_probs=lp[keep]))
    return out_sentences, out_predictions


def evaluate_seen_labels(method: Method, model, task: Task | str, sentences: list[Sentence], *,
                         viterbi: bool = True, max_tokens_per_batch: int = EVALUATION_MAX_TOKENS_PER_BATCH,
                         max_examples: int = MAX_EXAMPLES, device: torch.device | None = None,
                         dtype: str = "fp32") -> dict[str, Any]:
    """English-dev scores for checkpoint selection: with ``unseen_labels`` only the seen labels are predicted
    and scored (``seen_label_view``), as in training; without, ``evaluate_sentences``."""
    budget = dict(max_tokens_per_batch=max_tokens_per_batch, max_examples=max_examples, device=device, dtype=dtype)
    unseen = unseen_labels_of(method)
    if not unseen:
        return evaluate_sentences(method, model, task, sentences, viterbi=viterbi, **budget)
    task = get_task(task)
    predictions = predict(method, model, sentences, **budget)
    seen_sentences, seen_predictions = seen_label_view(task, method.labels, unseen, sentences, predictions)
    return score_language(task, method.labels, seen_sentences, seen_predictions, viterbi=viterbi,
                          keep_predictions=False)


GENERALIZED = ("accuracy_seen_labels", "accuracy_unseen_labels", "accuracy_hmean_labels",
               "f1_seen_labels", "f1_unseen_labels", "f1_hmean_labels", "n_unseen_label_words",
               "precision_unseen_labels", "n_unseen_label_predictions")
"""Generalized zero-shot scores (``unseen_labels``), averaged over the languages where they are defined."""
AVERAGED = ("accuracy", "f1", "f1_strict", "xtreme_seqeval_f1", "macro_f1", "accuracy_seen_words", "f1_seen_words",
            *GENERALIZED)
PREDICTIONS = "predictions"
"""Key of the per-sentence predictions in a language's result (kept out of ``eval.json``, see ``split_predictions``)."""


def results_record(task: Task | str, method: str, model: str, languages: dict[str, dict[str, Any]],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The per-language results document (also what ``topro evaluate`` writes).

    ``metric`` is the task's headline score; per-sentence predictions, if the
    language results carry them, stay in the record (``split_predictions`` takes them out).
    """
    task = get_task(task)
    average: dict[str, Any] = {}
    for key in AVERAGED:
        values = [r[key] for r in languages.values() if r.get(key) is not None]
        if values:
            average[key] = statistics.fmean(values)
    vit = [r["viterbi"]["f1"] for r in languages.values() if "viterbi" in r]
    if vit:
        average["viterbi_f1"] = statistics.fmean(vit)
    zero_shot = {lang: r for lang, r in languages.items() if lang != "en"}
    if zero_shot and len(zero_shot) != len(languages):
        average[f"{task.metric}_without_en"] = statistics.fmean(r[task.metric] for r in zero_shot.values())
    average["n_languages"] = len(languages)
    record = {"task": task.name, "method": method, "model": model, "metric": task.metric,
              "languages": dict(sorted(languages.items())), "average": average}
    if extra:
        record.update(extra)
    return record


def split_predictions(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the record without per-sentence predictions, {lang: predictions}): they are stored side by side."""
    languages, predictions = {}, {}
    for lang, result in record["languages"].items():
        result = dict(result)
        if PREDICTIONS in result:
            predictions[lang] = result.pop(PREDICTIONS)
        languages[lang] = result
    return {**record, "languages": languages}, predictions


def predictions_path(results_path: str | Path) -> Path:
    """Where the per-sentence predictions of ``results_path`` (``X.json``) live: ``X.predictions.json``."""
    path = Path(results_path)
    return path.with_name(path.stem + ".predictions.json")


def write_results(path: str | Path, record: dict[str, Any]) -> Path:
    """The results JSON at ``path`` and, if the record has them, its per-sentence predictions beside it."""
    summary, predictions = split_predictions(record)
    if predictions:
        summary["predictions_file"] = predictions_path(path).name
        write_json(predictions_path(path), {"task": record["task"], "method": record["method"],
                                            "split": record.get("split"), "languages": predictions},
                   site="eval_predictions")
    return write_json(path, summary)


def write_json(path: str | Path, data: dict[str, Any], site: str = "eval_results") -> Path:
    """``data`` as JSON at ``path``, atomically (``site``: see ``topro.atomic.SITES``)."""
    from topro import atomic

    return atomic.write_json(path, data, site, ensure_ascii=False)


def evaluate_language(method: Method, model, task: Task | str, lang: str, *, data_dir: str | None = None,
                      split: str = "dev", max_sentences: int | None = None, viterbi: bool = True,
                      max_tokens_per_batch: int = EVALUATION_MAX_TOKENS_PER_BATCH, max_examples: int = MAX_EXAMPLES,
                      device: torch.device | None = None, dtype: str = "fp32", progress: bool = False,
                      desc: str = "predict") -> dict[str, Any]:
    """Load ``lang``'s split of ``task`` and score the model on it."""
    sentences = load_scored_split(task, lang, split, data_dir, max_sentences)
    return evaluate_sentences(method, model, task, sentences, viterbi=viterbi,
                              max_tokens_per_batch=max_tokens_per_batch, max_examples=max_examples, device=device,
                              dtype=dtype, progress=progress, desc=desc)


def load_scored_split(task: Task | str, lang: str, split: str, data_dir: str | None,
                      max_sentences: int | None = None) -> list[Sentence]:
    """The first ``max_sentences`` of ``lang``'s split, once its gold labels are known to be there: what
    every evaluation (a fine-tuned method's or an LLM's) scores."""
    from topro.data import load_split

    sentences = load_split(task, lang, split, data_dir, limit=max_sentences)
    check_gold_labels(task, lang, split, data_dir, sentences)
    return sentences


def check_gold_labels(task: Task | str, lang: str, split: str, data_dir: str | None,
                      sentences: list[Sentence]) -> None:
    """Refuse to score a span task's split whose gold labels are all ``O`` (hidden test labels): it would
    score 0 and look like a result."""
    from topro.data import load_split
    from topro.data.readers import DataFormatError

    task = get_task(task)
    if task.scheme != "iob2" or any(t != "O" for s in sentences for t in s.tags):
        return
    everything = load_split(task, lang, split, data_dir)  # a short prefix may hold no entity by chance
    if any(t != "O" for s in everything for t in s.tags):
        return
    source = sentences[0].source.rsplit(":", 1)[0] if sentences else f"{task.name} {split}-{lang}"
    raise DataFormatError(f"{source}: every gold label of the {task.name} {split} split of {lang!r} is 'O' "
                          f"({sum(len(s) for s in everything)} words): its labels are hidden (XTREME withholds "
                          f"them for some test sets), so it cannot be scored; use a copy with labels or "
                          f"--split dev")


def resolve_languages(task: Task | str, langs: list[str] | str, data_dir: str | None, split: str = "dev") -> list[str]:
    """``all`` -> every language of the task that has ``split`` data; otherwise as given."""
    from topro.data import available_languages

    if isinstance(langs, str):
        langs = [x for x in langs.split(",") if x]
    if langs == ["all"]:
        return available_languages(task, split, data_dir)
    return list(langs)


def evaluate_checkpoint(checkpoint: str | Path, langs: list[str] | str, *, task: str | None = None,
                        data_dir: str | None = None, split: str = "dev", max_sentences: int | None = None,
                        viterbi: bool = True, device: str = "auto", dtype: str = "fp32", progress: bool = True,
                        max_tokens_per_batch: int = EVALUATION_MAX_TOKENS_PER_BATCH,
                        kept: dict[str, dict[str, Any]] | None = None,
                        save: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Zero-shot evaluation of a checkpoint on each language, one after another.

    ``kept``: languages already scored (a stopped run resumed, ``topro.partial_results``), not evaluated
    again. ``save(record)``: called with the record so far after every language (``partial: true`` until the
    last), so a kill costs at most the language under way. A stop request (``topro.interrupts``) lets the
    language under way finish and returns the record of those done."""
    from topro.methods import load_checkpoint
    from topro.models import pick_device
    from topro.quiet import quiet_stack

    quiet_stack(progress)
    dev = pick_device(device)
    method, model = load_checkpoint(checkpoint, dev)
    model = cast_for_evaluation(model, dtype)
    meta = method.meta()
    task_name = task or meta["task"]
    if task_name != meta["task"]:
        raise ValueError(f"checkpoint {checkpoint} was trained for task {meta['task']!r}, not {task_name!r}")
    from topro.interrupts import active
    from topro.partial_results import unfinished

    languages = resolve_languages(task_name, langs, data_dir, split)
    results = {lang: kept[lang] for lang in languages if lang in (kept or {})}

    def record() -> dict[str, Any]:
        extra = {"checkpoint": str(checkpoint), "split": split, **unfinished(languages, results)}
        return results_record(task_name, meta["method"], meta.get("base_model", str(checkpoint)), results,
                              extra=checkpoint_flags(meta, extra))

    from topro.progress import LanguageProgress

    languages_done = LanguageProgress(len(languages) - len(results), "evaluate", enabled=progress)
    for lang in languages:
        if lang in results:
            continue
        if active().requested:  # SIGTERM/SIGINT: keep the languages done (the caller writes them, marked partial)
            break
        results[lang] = evaluate_language(method, model, task_name, lang, data_dir=data_dir, split=split,
                                          max_sentences=max_sentences, viterbi=viterbi, device=dev,
                                          dtype=dtype, progress=progress, desc=lang,
                                          max_tokens_per_batch=max_tokens_per_batch)
        languages_done.done(lang, results[lang].get("n_sentences", 0))
        if save is not None:
            save(record())
    return record()


def checkpoint_flags(meta: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` plus what a checkpoint's ``topro.json`` says every score of it needs a footnote for."""
    if meta.get("mlm_head_untrained") or (meta.get("extra") or {}).get("mlm_head_untrained"):  # old: under extra
        extra = {**extra, "mlm_head_untrained": True}
    if meta.get("label_word_sets"):  # rosprompt: the words each label is scored by, for a person to read
        extra = {**extra, "label_words": meta["label_word_sets"]}
    if meta.get("unseen_labels"):
        extra = {**extra, "unseen_labels": meta["unseen_labels"]}
    return extra


def score_files(task: Task | str, gold_path: str | Path, pred_path: str | Path) -> dict[str, Any]:
    """Score a prediction file against a gold file of the same words (both in the task's file format)."""
    from topro.data.readers import READERS, DataFormatError

    task = get_task(task)
    gold = READERS[task.format](gold_path, labels=task.labels)
    pred = READERS[task.format](pred_path, labels=task.labels)
    if len(gold) != len(pred):
        raise DataFormatError(f"{pred_path}: {len(pred)} sentences, but {gold_path} has {len(gold)}")
    for i, (g, p) in enumerate(zip(gold, pred)):
        if g.words != p.words:
            raise DataFormatError(f"{p.source}: sentence {i} has other words than {g.source}")
    return score_task(task, [s.tags for s in gold], [s.tags for s in pred])
