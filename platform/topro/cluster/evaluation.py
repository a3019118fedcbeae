"""Zero-shot evaluation of checkpoints on many languages, in parallel across a Ray cluster.

A small pool of evaluator actors each holds a loaded model; languages are
handed out one at a time to whichever actor is free, preferring an actor that
already holds the checkpoint in question. A model is therefore loaded once per
actor (and per checkpoint), never once per language. Each language is scored
by the same ``evaluate_language`` as the sequential path, so results match
``topro.evaluate.evaluate_checkpoint``.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from topro.batching import EVALUATION_MAX_TOKENS_PER_BATCH

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationJob:
    """One checkpoint to evaluate on some languages."""

    checkpoint: str
    """Checkpoint folder (reachable from the workers: shared or local storage) or ``models:/``/``runs:/`` URI."""
    languages: tuple[str, ...] | str = "all"
    task: str | None = None
    """Task (default: the checkpoint's)."""
    kept: dict[str, dict[str, Any]] | None = None
    """Languages already scored (a stopped evaluation resumed, ``topro.partial_results``): not evaluated again."""


class LanguageEvaluator:
    """Holds up to ``cache_size`` loaded checkpoints and scores one language per call."""

    def __init__(self, device: str = "auto", dtype: str = "fp32", num_threads: int | None = None,
                 cache_size: int = 1, max_tokens_per_batch: int = EVALUATION_MAX_TOKENS_PER_BATCH):
        import torch
        import transformers

        from topro.quiet import quiet_stack

        transformers.utils.logging.disable_progress_bar()  # one bar per load floods the forwarded actor logs
        quiet_stack(progress=False)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device, self.dtype, self.cache_size = device, dtype, cache_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.models: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self.loads = 0
        from topro.cluster.runtime import node_name

        self.node = node_name()

    def _model(self, checkpoint: str):
        if checkpoint in self.models:
            self.models.move_to_end(checkpoint)
            return self.models[checkpoint]
        from topro.evaluate import cast_for_evaluation
        from topro.methods import load_checkpoint
        from topro.models import pick_device
        from topro.tracking import resolve_checkpoint

        while len(self.models) >= self.cache_size:
            self.models.popitem(last=False)
        folder = resolve_checkpoint(checkpoint)
        method, model = load_checkpoint(folder, pick_device(self.device))
        self.models[checkpoint] = method, cast_for_evaluation(model, self.dtype)
        self.loads += 1
        return self.models[checkpoint]

    def holds(self) -> list[str]:
        return list(self.models)

    def evaluate(self, checkpoint: str, task: str, lang: str, options: dict[str, Any]) -> dict[str, Any]:
        from topro.evaluate import evaluate_language
        from topro.models import pick_device

        method, model = self._model(checkpoint)
        start = time.perf_counter()
        result = evaluate_language(method, model, task, lang, device=pick_device(self.device), dtype=self.dtype,
                                   max_tokens_per_batch=self.max_tokens_per_batch, progress=False, desc=lang,
                                   **options)
        return {"lang": lang, "checkpoint": checkpoint, "result": result,
                "seconds": time.perf_counter() - start, "loads": self.loads, "node": self.node}


def _checkpoint_meta(checkpoint: str) -> dict[str, Any]:
    import json

    from topro.methods import META_FILE
    from topro.tracking import resolve_checkpoint

    return json.loads((resolve_checkpoint(checkpoint) / META_FILE).read_text())


def gpus_per_actor(device: str, cluster_gpus: float) -> int:
    """GPUs each evaluation actor asks Ray for: one when ``device`` is ``cuda``,
    or ``auto`` and the cluster has a GPU (an actor without a GPU request sees
    none, so ``auto`` would silently evaluate on CPU); else none."""
    if device == "cuda":
        if cluster_gpus < 1:
            raise ValueError("device=cuda, but the Ray cluster has no GPU")
        return 1
    if device == "auto":
        return 1 if cluster_gpus >= 1 else 0
    return 0


def default_workers(n_items: int, cpus_per_worker: float) -> int:
    """As many evaluators as the cluster's CPUs allow, at most one per work item."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, min(n_items, int(cpus // cpus_per_worker)))


def evaluate_checkpoints_parallel(jobs: list[EvaluationJob], *, data_dir: str | None = None, split: str = "dev",
                                  max_sentences: int | None = None, viterbi: bool = True, device: str = "auto",
                                  dtype: str = "fp32", num_workers: int | None = None,
                                  cpus_per_worker: float = 1.0, address: str | None = None,
                                  progress: bool = True, stats: dict[str, Any] | None = None,
                                  max_tokens_per_batch: int = EVALUATION_MAX_TOKENS_PER_BATCH,
                                  save: Callable[[int, dict[str, Any]], Any] | None = None) -> list[dict[str, Any]]:
    """Evaluate every job's checkpoint on its languages with one actor pool; returns one record per job.

    ``stats``, if given, receives ``workers``, ``items`` (checkpoint-language pairs), ``model_loads`` and
    ``seconds``. Long because it is one actor pool's life (checks, pool, submit, gather with progress,
    shut down), read top to bottom.

    SIGTERM/SIGINT (a ``topro.interrupts.StopRequests`` around the call): the languages already finished are
    kept, those under way cancelled (their actors killed); a record missing languages says ``partial: true``
    and lists ``languages_not_evaluated``, as the sequential path does. ``save(job_index, record)``: called
    with a job's record so far whenever one of its languages finishes (``partial: true`` until its last).
    """
    from topro.cluster.runtime import init_ray
    from topro.evaluate import checkpoint_flags, resolve_languages, results_record
    from topro.interrupts import active
    from topro.partial_results import unfinished

    ray = init_ray(address)
    metas = [_checkpoint_meta(job.checkpoint) for job in jobs]
    pending: dict[str, list[tuple[int, str, str]]] = OrderedDict()  # checkpoint -> [(job, task, lang)]
    languages: list[list[str]] = []  # job -> its languages
    for i, (job, meta) in enumerate(zip(jobs, metas)):
        task = job.task or meta["task"]
        if task != meta["task"]:
            raise ValueError(f"checkpoint {job.checkpoint} was trained for task {meta['task']!r}, not {task!r}")
        languages.append(resolve_languages(task, job.languages, data_dir, split))
        for lang in languages[-1]:
            if lang not in (job.kept or {}):
                pending.setdefault(job.checkpoint, []).append((i, task, lang))
    results: list[dict[str, dict[str, Any]]] = [
        {lang: job.kept[lang] for lang in langs if lang in (job.kept or {})} for job, langs in zip(jobs, languages)]
    nodes: list[dict[str, str]] = [{} for _ in jobs]  # job -> language -> node that scored it

    def record(i: int) -> dict[str, Any]:
        job, meta = jobs[i], metas[i]
        extra = {"checkpoint": str(job.checkpoint), "split": split, "nodes": dict(sorted(nodes[i].items())),
                 **unfinished(languages[i], results[i])}
        return results_record(meta["task"], meta["method"], meta.get("base_model", job.checkpoint), results[i],
                              extra=checkpoint_flags(meta, extra))

    n_items = sum(len(v) for v in pending.values())
    if n_items == 0:
        return [record(i) for i in range(len(jobs))]
    workers = num_workers or default_workers(n_items, cpus_per_worker)
    threads = max(1, int(cpus_per_worker))
    cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
    num_gpus = gpus_per_actor(device, cluster_gpus)
    if num_gpus:  # actors beyond the GPUs would wait forever for one
        workers = max(1, min(workers, int(cluster_gpus)))
    # SPREAD: on a multi-node cluster the evaluators go to different nodes where they fit.
    evaluator_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=num_gpus,
                               scheduling_strategy="SPREAD")(LanguageEvaluator)
    actors = [evaluator_cls.remote(device, dtype, threads, max_tokens_per_batch=max_tokens_per_batch)
              for _ in range(workers)]
    holds: dict[int, str | None] = {i: None for i in range(workers)}
    options = {"data_dir": data_dir, "split": split, "max_sentences": max_sentences, "viterbi": viterbi}
    in_flight: dict[Any, int] = {}  # ref -> actor
    jobs_of: dict[Any, int] = {}  # ref -> job
    start, loads = time.perf_counter(), {}
    from topro.progress import LanguageProgress

    languages_done = LanguageProgress(n_items, "evaluate", enabled=progress)

    def next_item(actor: int) -> tuple[int, str, str, str] | None:
        # Stay on the checkpoint this actor holds; otherwise take the one with most work left.
        checkpoint = holds[actor] if pending.get(holds[actor] or "") else None
        if checkpoint is None:
            left = [c for c, items in pending.items() if items]
            if not left:
                return None
            checkpoint = max(left, key=lambda c: len(pending[c]))
        job, task, lang = pending[checkpoint].pop(0)
        return job, checkpoint, task, lang

    def submit(actor: int) -> None:
        item = next_item(actor)
        if item is None:
            return
        job, checkpoint, task, lang = item
        holds[actor] = checkpoint
        ref = actors[actor].evaluate.remote(checkpoint, task, lang, options)
        in_flight[ref] = actor
        jobs_of[ref] = job

    def collect(ref) -> int:
        actor, job = in_flight.pop(ref), jobs_of.pop(ref)
        out = ray.get(ref)
        results[job][out["lang"]] = out["result"]
        nodes[job][out["lang"]] = out["node"]
        loads[actor] = out["loads"]
        languages_done.done(out["lang"], out["result"].get("n_sentences", 0),
                            f": {'/'.join(Path(out['checkpoint']).parts[-2:])} in {out['seconds']:.1f}s "
                            f"on node {out['node']}")
        if save is not None:
            save(job, record(job))
        return actor

    try:
        for actor in range(workers):
            submit(actor)
        while in_flight:
            if active().requested:  # SIGTERM/SIGINT: keep what has finished; the rest dies with the actors
                for ref in ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)[0]:
                    collect(ref)
                log.warning("stopped: %d language(s) under way cancelled", len(in_flight))
                break
            # A timeout, so that a stop request is seen while every actor is busy.
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            if ready:
                submit(collect(ready[0]))
    finally:
        for actor in actors:
            ray.kill(actor)
    seconds = time.perf_counter() - start
    log.info("parallel evaluation: %d languages x checkpoints on %d workers in %.1fs, %d model loads",
             n_items, workers, seconds, sum(loads.values()))
    if stats is not None:
        stats.update(workers=workers, items=n_items, model_loads=sum(loads.values()), seconds=seconds,
                     nodes=sorted({n for per_job in nodes for n in per_job.values()}))
    return [record(i) for i in range(len(jobs))]


def evaluate_checkpoint_parallel(checkpoint: str | Path, langs: list[str] | str, address: str | None = None, *,
                                 task: str | None = None, data_dir: str | None = None, split: str = "dev",
                                 max_sentences: int | None = None, viterbi: bool = True, device: str = "auto",
                                 dtype: str = "fp32", progress: bool = True, num_workers: int | None = None,
                                 cpus_per_worker: float = 1.0, stats: dict[str, Any] | None = None,
                                 max_tokens_per_batch: int = EVALUATION_MAX_TOKENS_PER_BATCH,
                                 kept: dict[str, dict[str, Any]] | None = None,
                                 save: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Like ``topro.evaluate.evaluate_checkpoint``, one Ray actor task per language; the same record (and
    the same ``kept`` and ``save``)."""
    langs = langs if isinstance(langs, str) else tuple(langs)
    [record] = evaluate_checkpoints_parallel([EvaluationJob(str(checkpoint), langs, task, kept)], data_dir=data_dir,
                                             split=split, max_sentences=max_sentences, viterbi=viterbi,
                                             device=device, dtype=dtype, num_workers=num_workers,
                                             cpus_per_worker=cpus_per_worker, address=address, progress=progress,
                                             stats=stats, max_tokens_per_batch=max_tokens_per_batch,
                                             save=None if save is None else lambda _, job_record: save(job_record))
    return record
