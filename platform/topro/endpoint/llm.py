"""Ray Serve application ``llm``: tag sentences with ToPro prompts against a large language model.

    POST /llm/tag      {"sentences": [["Das", "ist", "gut"]]}  or  {"text": "Das ist gut"}, optional "lang"
    GET  /llm/healthz  this replica is up; whether the LLM is reachable
    GET  /llm/models   the LLM, task, prompt format, mode and shots

Everything about prompts, scoring and backends is the LLM-evaluation library
(``topro.llm``): ``load_backend`` picks a local Hugging Face model (folder or
hub id; shared-prefix KV-cache scoring) or an OpenAI-compatible server
(``http(s)://...``: vLLM, Ray Serve LLM, llama.cpp, ...), and
``evaluate.predict_sentences`` tags with the configured format and mode, as
``topro eval-llm`` does. This module adds the HTTP shell, request checks and
batching: requests that arrive together go to the backend in one call (one at a
time, so a local model is never used by two threads).

The LLM is ``args.model``, else ``$TOPRO_LLM_MODEL``. A local model loads at
start (a wrong path fails the deployment); a server is reached lazily, so the
app deploys while its upstream is still starting, and answers 503 until it is up.
"""
# No `from __future__ import annotations`: FastAPI reads the request model from real annotations.
import asyncio
import logging
import math
import threading
import time
from typing import Any

from ray import serve
from ray.serve import Application

from topro.endpoint.args import MODEL_ENV, LLMArgs, parse_app_args
from topro.endpoint.http import bind_app, body_limit, make_api
from topro.endpoint.schemas import LLMTagResponse, RequestProblem, TagRequest, check_lang, check_limits

log = logging.getLogger("ray.serve")


def parse_args(args: dict[str, Any]) -> LLMArgs:
    """Validated args (task and format checked too), or a ``ValueError`` naming the bad key."""
    cfg = parse_app_args(LLMArgs, args, "llm")
    from topro.data.tasks import get_task
    from topro.prompts.formats import FormatError, load_format

    try:
        get_task(cfg.task)
        load_format(cfg.format).for_task(cfg.task)
    except (FormatError, KeyError, ValueError) as err:
        raise ValueError(f"serve app 'llm': bad args: {err}") from None
    return cfg


api = make_api("topro LLM tagging", __doc__.split("\n\n")[0])


class LLMJob:
    def __init__(self, sentences: list):
        self.sentences = sentences
        self.done: dict[str, Any] = {}


@serve.deployment(name="LLMTagger", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class LLMTaggerDeployment:
    async def __init__(self, args: dict[str, Any]):
        self.args = parse_args(args)
        self.cfg = self.args.eval_config()
        self.model = self.args.resolved_model()
        self.backend = None
        self.setup = None
        self.backend_error: str | None = None
        self._connect_lock = threading.Lock()
        api.state.max_body_bytes = body_limit(self.args.max_sentences, self.args.max_words,
                                              self.args.max_word_chars)
        self.limits = self.args.limits()
        self._tag_batch.set_max_batch_size(self.args.max_batch_size)
        self._tag_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        from topro.llm.backends import is_http

        if self.model and not is_http(self.model):
            await asyncio.to_thread(self._connect)  # a local model: fail the deployment now if it cannot load
            if self.backend is None:
                raise RuntimeError(f"LLM {self.model!r} could not be loaded: {self.backend_error}")

    def _connect(self) -> None:
        """Build the backend and the run's prompts (instruction, demonstrations) once; remember a failure."""
        from topro.llm.backends import load_backend
        from topro.llm.evaluate import prepare

        with self._connect_lock:
            if self.backend is not None:
                return
            if not self.model:
                self.backend_error = (f"no LLM configured: start with `topro serve --llm-model PATH_OR_URL`, set "
                                      f"args.model of the llm app (serve/config.yaml), or set ${MODEL_ENV}")
                return
            try:
                setup = prepare(self.cfg)
                self.backend = load_backend(self.model, **self.args.backend_options())
                self.setup = setup
                self.backend_error = None
                log.info("LLM ready: %s (%s, %s format, %s mode, %d shots)", self.backend.name, self.cfg.task,
                         self.cfg.format, self.cfg.mode, self.cfg.shots)
            except Exception as err:
                self.backend_error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                log.warning("LLM %s not available: %s", self.model, self.backend_error)

    @api.post("/tag", response_model=LLMTagResponse)
    async def tag(self, body: TagRequest):
        """Tags of every word by ToPro prompts to the LLM; in score mode with their probabilities."""
        from topro.data.readers import Sentence

        word_lists = check_limits(body, self.limits)
        check_lang(body.lang, self.cfg.task)
        if self.backend is None:
            await asyncio.to_thread(self._connect)
            if self.backend is None:
                raise RequestProblem(503, f"LLM {self.model or '(none)'} is not available: {self.backend_error}")
        job = LLMJob([Sentence(words, [], body.lang or "") for words in word_lists])
        await self._tag_batch(job)
        if "error" in job.done:
            raise RequestProblem(502, job.done["error"])
        return {"model": self._model_ref(), "sentences": [{**s, "lang": body.lang} for s in job.done["tagged"]],
                "batch": job.done["batch"]}

    def _model_ref(self) -> dict[str, Any]:
        return {"backend": getattr(self.backend, "name", self.model), "task": self.cfg.task,
                "format": self.cfg.format, "mode": self.cfg.mode, "shots": self.cfg.shots}

    def _tag_sentences(self, sentences: list) -> list[dict[str, Any]]:
        from topro.llm.evaluate import predict_sentences
        from topro.metrics import viterbi_iob2

        labels = self.setup.task.labels
        index = {label: i for i, label in enumerate(labels)}
        results = predict_sentences(self.backend, self.setup, self.cfg, sentences)
        out = []
        for sentence, result in zip(sentences, results):
            tags = result.tags
            if self.args.viterbi and result.log_probs is not None and self.setup.task.scheme == "iob2":
                tags = [labels[i] for i in viterbi_iob2(result.log_probs, labels)]
            words = []
            for k, (word, tag) in enumerate(zip(sentence.words, tags)):
                prob = None
                if result.log_probs is not None:
                    prob = round(math.exp(float(result.log_probs[k][index[tag]])), 6)
                words.append({"word": word, "tag": tag, "prob": prob, "format_failed": bool(result.failed[k])})
            out.append({"words": words, "n_format_failed": int(sum(result.failed))})
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _tag_batch(self, jobs: list[LLMJob]) -> list[None]:
        sentences = [s for job in jobs for s in job.sentences]
        start = time.perf_counter()
        try:
            tagged = await asyncio.to_thread(self._tag_sentences, sentences)
        except Exception as err:  # the upstream failed (after its retries): answer 502, keep the replica
            log.exception("LLM tagging of %d sentences failed", len(sentences))
            for job in jobs:
                job.done["error"] = f"LLM {self.model} failed: {type(err).__name__}: {str(err)[:300]}"
            return [None] * len(jobs)
        batch = {"requests": len(jobs), "sentences": len(sentences), "seconds": round(time.perf_counter() - start, 4)}
        offset = 0
        for job in jobs:
            job.done["tagged"] = tagged[offset:offset + len(job.sentences)]
            job.done["batch"] = batch
            offset += len(job.sentences)
        return [None] * len(jobs)

    @api.get("/healthz")
    async def healthz(self):
        """200 while the replica lives; ``llm`` says whether the model is usable now."""
        return {"status": "ok", "llm": "ready" if self.backend is not None else "unavailable",
                "detail": self.backend_error}

    @api.get("/models")
    async def models(self):
        return {**self._model_ref(), "model": self.model, "ready": self.backend is not None,
                "method": self.cfg.method if self.model else None,
                "labels": list(self.setup.task.labels) if self.setup else None,
                "limits": {**self.limits.model_dump(), "max_body_bytes": api.state.max_body_bytes}}


def make_app(args: dict[str, Any], deployment_options: dict[str, dict[str, Any]] | None = None) -> Application:
    return bind_app(LLMTaggerDeployment, parse_args(args), deployment_options)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for ``import_path: serve.llm:build_app``."""
    return make_app(args)
