"""LLM evaluation fanned out over languages: one Ray task per language.

The only Ray-aware part of LLM evaluation. Each worker process loads the
model once and keeps it in `_BACKENDS` (keyed by model and backend options),
so a worker that runs several languages loads it once. With no address Ray
starts locally on 127.0.0.1 (`topro.cluster.runtime.init_ray`).
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Callable

from topro.llm.backends import Backend, load_backend
from topro.llm.evaluate import LLMEvalConfig, RunSetup, evaluate_llm_language, finish_record, prepare

log = logging.getLogger(__name__)

_BACKENDS: dict[tuple, Backend] = {}


def cached_backend(model: str, options: dict[str, Any]) -> Backend:
    """The process's backend for `model` and `options`, loaded on first use."""
    key = (model, tuple(sorted((k, repr(v)) for k, v in options.items())))
    if key not in _BACKENDS:
        _BACKENDS[key] = load_backend(model, **options)
    return _BACKENDS[key]


def _evaluate_one(cfg_fields: dict[str, Any], lang: str, options: dict[str, Any],
                  setup: RunSetup) -> tuple[str, dict, str]:
    # Not the language in the format: a worker process runs many languages, and basicConfig sets it once.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = LLMEvalConfig(**cfg_fields)
    backend = cached_backend(cfg.model, options)
    return lang, evaluate_llm_language(backend, cfg, lang, setup), backend.name


def evaluate_llm_parallel(cfg: LLMEvalConfig, langs: list[str], options: dict[str, Any], *,
                          address: str | None = None, cpus_per_task: float = 1.0,
                          kept: dict[str, dict] | None = None,
                          save: Callable[[dict], Any] | None = None) -> dict[str, Any]:
    """One Ray task per language; the same record as the sequential path, with its ``kept`` and ``save``.

    A stop request (``topro.interrupts``) cancels the tasks under way and returns the record of the
    languages finished (``partial: true``)."""
    from topro.cluster.runtime import init_ray
    from topro.interrupts import active

    ray = init_ray(address, include_dashboard=False)
    setup = prepare(cfg)  # once: fails early (bad format, task, demos), shipped to every task
    languages = {lang: kept[lang] for lang in langs if lang in (kept or {})}
    todo = [lang for lang in langs if lang not in languages]
    if not todo:
        return finish_record(cfg, setup, languages, cfg.model, langs)
    setup_ref = ray.put(setup)
    threads = options.get("threads") or max(1, int(cpus_per_task))
    from topro.cluster.evaluation import gpus_per_actor

    # One GPU per language task when the model runs locally and the cluster has one.
    num_gpus = 0 if str(cfg.model).startswith(("http://", "https://")) else \
        gpus_per_actor(options.get("device") or "auto", ray.cluster_resources().get("GPU", 0.0))
    task = ray.remote(num_cpus=cpus_per_task, num_gpus=num_gpus)(_evaluate_one)
    refs = [task.remote(asdict(cfg), lang, {**options, "threads": threads}, setup_ref) for lang in todo]
    from topro.progress import LanguageProgress

    languages_done = LanguageProgress(len(refs), "eval-llm")
    names, pending = set(), list(refs)
    while pending:  # as they finish, for the progress line; the record keeps the languages' order
        if active().requested:  # SIGTERM/SIGINT: keep what has finished, cancel the rest
            for ref in pending:
                ray.cancel(ref, force=True)
            log.warning("stopped: %d language(s) under way cancelled", len(pending))
            break
        # A timeout, so that a stop request is seen while every task is busy.
        ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        if not ready:
            continue
        lang, record, name = ray.get(ready[0])
        languages[lang] = record
        names.add(name)
        languages_done.done(lang, record.get("n_sentences", 0))
        if save is not None:
            save(finish_record(cfg, setup, languages, _model_name(names, cfg), langs))
    return finish_record(cfg, setup, languages, _model_name(names, cfg), langs)


def _model_name(names: set[str], cfg: LLMEvalConfig) -> str:
    return next(iter(names)) if len(names) == 1 else cfg.model
