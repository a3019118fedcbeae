"""Ray Serve application ``tagging``: the HTTP tagging endpoint over ``topro.serving.Tagger``.

    POST /tag      {"sentences": [["Das", "ist", "gut"]], "lang": "de"}  or  {"text": "Das ist gut"}
    POST /classify {"texts": ["Angela Merkel sprach ."], "lang": "de"}  or  {"text": "..."}  (a model of a
                   ``kind: classification`` task: one label per text; the other route answers 422 saying so)
    GET  /healthz  this replica is up, and what it holds
    GET  /models   the model ids a client may ask for, and what this replica has loaded

The model is chosen per request by the header ``serve_multiplexed_model_id``
(none: the ``default`` model, i.e. the ``model`` arg). Serve's model
multiplexing routes a request to a replica that already holds its model and
keeps at most ``max_models_per_replica`` per replica (least recently used
out). Requests that arrive together are tagged together: ``@serve.batch``
gathers up to ``max_batch_size`` requests, and all ToPro prompts of all their
sentences go through the model in one ``Tagger.tag`` call per model.

A model named ``models:/<name>@<alias>`` follows its alias: every
``alias_refresh_s`` the replica asks the registry which version the alias
names; when it moved, the new version is loaded beside the old one and
swapped in at once. A batch already with the old model finishes on it, and
every response names the version that tagged it (``model.version``).

Everything about the model lives in ``topro.serving``; this module is the
Serve and HTTP shell: argument checks, request checks, batching, status codes.
Bad input never reaches the batch: it is answered 4xx with a message before.

Start it with ``serve run serve/config.yaml`` (``serve/tagging.py`` names ``build_app`` here) or
``topro serve --model ...``.
"""
# No `from __future__ import annotations` here: the class is pickled by value (see below), and FastAPI must
# read the request model from real annotations, not from names it would look up in the pickled globals.
import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve import Application

from topro.endpoint.args import TaggingArgs, parse_app_args
from topro.endpoint.http import bind_app, body_limit, make_api
from topro.endpoint.schemas import (ClassifyRequest, ClassifyResponse, RequestProblem, TagRequest, TagResponse,
                                    check_lang, check_limits, check_text_limits)

log = logging.getLogger("ray.serve")

MODEL_ID_HEADER = "serve_multiplexed_model_id"
TAGGING_PAGE = Path(__file__).with_name("page.html")
# The page loads nothing from elsewhere and may only call this app; its inline script and style are its own.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; connect-src 'self'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def parse_args(args: dict[str, Any], app: str = "tagging") -> TaggingArgs:
    """Validated args, or a ``ValueError`` naming each bad key."""
    return parse_app_args(TaggingArgs, args, app)


def absolute_tracking_uri(uri: str | None) -> str:
    """The tracking URI with a relative SQLite path made absolute: replicas do not share the driver's cwd."""
    from topro.tracking import tracking_uri

    resolved = tracking_uri(uri)
    prefix = "sqlite:///"
    if resolved.startswith(prefix) and not resolved[len(prefix):].startswith("/"):
        resolved = prefix + str(Path(resolved[len(prefix):]).resolve())
    return resolved


def check_model_uris(cfg: TaggingArgs) -> None:
    """Fail at build time, with the arg's name, for a checkpoint folder that does not exist or a
    ``models:/`` name, alias or version the registry does not have (a registry that cannot be reached
    now is only warned about: the replicas will try it again)."""
    from topro.serving import ModelNotRegisteredError, registered_version
    from topro.tracking import is_registry_uri

    for key, uri in {"model": cfg.model, **{f"models.{k}": v for k, v in cfg.models.items()}}.items():
        if uri.startswith("models:/"):
            try:
                registered_version(uri)
            except ModelNotRegisteredError as err:
                raise ValueError(f"serve app 'tagging': args.{key}: {err}") from None
            except Exception as err:
                log.warning("serve app 'tagging': args.%s=%r not checked: the registry did not answer (%s: %s)",
                            key, uri, type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
            continue
        if is_registry_uri(uri):
            continue  # checked against the registry when a replica loads it
        path = Path(uri).expanduser()
        if not (path / "topro.json").is_file():
            raise ValueError(f"serve app 'tagging': args.{key}={uri!r} is not a topro checkpoint folder "
                             "(no topro.json there) nor a models:/ URI")


# --- HTTP -------------------------------------------------------------------------

api = make_api("topro tagging", __doc__.split("\n\n")[0])


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return "local"


def _warn_if_batches_cannot_fill(max_batch_size: int) -> None:
    """A replica takes at most max_ongoing_requests at once; fewer than max_batch_size caps every batch."""
    try:
        ongoing = serve.get_replica_context()._deployment_config.max_ongoing_requests
    except Exception:
        return
    if ongoing < max_batch_size:
        log.warning("max_ongoing_requests=%d < max_batch_size=%d: batches never exceed %d requests; "
                    "raise max_ongoing_requests in the deployment config", ongoing, max_batch_size, ongoing)


class BatchGate:
    """Holds requests back while a batch is with the model, so the next batch forms when the model is free.

    ``@serve.batch`` (Ray 2.60) forms the next batch as soon as the current one is handed on, and that batch
    then waits for the model. Under load a batch therefore holds only the requests that arrived within
    ``batch_wait_timeout_s`` of each other, not all those that queued during the last model call: 6 to 8 of
    32 for multilingual-e5-small at 32 clients. Requests wait here instead and enter the batch queue
    together when the running batch ends.
    """

    def __init__(self):
        self._running = 0
        self._free = asyncio.Event()
        self._free.set()

    async def wait_until_free(self) -> None:
        await self._free.wait()

    @contextlib.contextmanager
    def model_busy(self):
        self._running += 1
        self._free.clear()
        try:
            yield
        finally:
            self._running -= 1
            if not self._running:
                self._free.set()


@dataclass
class TagJob:
    """One request's work (or one chunk of it) inside a batch."""

    resident: "ResidentModel"
    sentences: list
    done: dict[str, Any] = field(default_factory=dict)
    call: str = "tag"
    """The ``Tagger`` method that serves it: ``tag`` (sentences) or ``classify`` (texts as one-unit sentences)."""

    @property
    def words(self) -> int:
        """Its words (a text's: the whitespace-separated words of its one unit)."""
        if self.call == "classify":
            return sum(len(s.words[0].split()) for s in self.sentences)
        return sum(len(s.words) for s in self.sentences)


def split_by_words(items: list, max_words: int, words_of=len) -> list[list]:
    """``items`` in order, in consecutive chunks of at most ``max_words`` words (``words_of(item)`` each); an
    item larger than that is a chunk by itself."""
    chunks, current, count = [], [], 0
    for item in items:
        n = words_of(item)
        if current and count + n > max_words:
            chunks.append(current)
            current, count = [], 0
        current.append(item)
        count += n
    if current:
        chunks.append(current)
    return chunks


class ResidentModel:
    """A loaded ``Tagger`` as Serve's multiplexer holds it; Serve calls ``__del__`` when it evicts it."""

    def __init__(self, tagger, registry: dict[str, "ResidentModel"]):
        self.tagger = tagger
        self._registry = registry
        registry[tagger.info.id] = self

    def __del__(self):
        if self._registry.get(self.tagger.info.id) is self:
            del self._registry[self.tagger.info.id]


@dataclass
class Outcome:
    """What one request got from ``tag_requests``: its tagged sentences, or an HTTP status and message."""

    tagged: list | None = None
    error: str | None = None
    status: int = 200
    first_of_call: bool = False
    """The first request answered by its model call (the replica counts model calls by it)."""
    call_requests: int = 0
    call_sentences: int = 0
    call_seconds: float = 0.0


def _first_line(err: BaseException) -> str:
    text = str(err).splitlines()[0][:300] if str(err) else ""
    return f"{type(err).__name__}: {text}".rstrip(": ")


async def tag_requests(tag, request_sentences: list[list], model_id: str = "") -> list[Outcome]:
    """Tag several requests' sentences in one model call (``tag``: ``Tagger.tag``); if that call fails,
    tag each request alone, so a request the model cannot take fails by itself and the others are answered.

    A request that fails alone while others of the same batch succeed is the input's fault (422, its cause
    logged); one that fails with nothing to compare against is a server fault (500, logged), unless the
    error is a text-encoding one (422)."""

    async def call(group: list[list]) -> list[Outcome]:
        sentences = [s for sents in group for s in sents]
        start = time.perf_counter()
        # Off the event loop, so requests keep arriving (and the next batch fills) meanwhile.
        tagged = await asyncio.to_thread(tag, sentences)
        seconds = round(time.perf_counter() - start, 4)
        out, offset = [], 0
        for i, sents in enumerate(group):
            out.append(Outcome(tagged[offset:offset + len(sents)], first_of_call=i == 0, call_requests=len(group),
                               call_sentences=len(sentences), call_seconds=seconds))
            offset += len(sents)
        return out

    try:
        return await call(request_sentences)
    except Exception as err:  # a model failure fails its own requests only, never the replica
        if len(request_sentences) == 1:
            return [_failed(err, model_id, others_ok=False)]
        log.warning("tagging %d requests together with %s failed (%s); tagging each alone", len(request_sentences),
                    model_id, _first_line(err))
    outcomes: list[Outcome | BaseException] = []
    for sents in request_sentences:
        try:
            outcomes.extend(await call([sents]))
        except Exception as err:
            outcomes.append(err)
    others_ok = any(isinstance(o, Outcome) for o in outcomes)
    return [o if isinstance(o, Outcome) else _failed(o, model_id, others_ok) for o in outcomes]


def _failed(err: BaseException, model_id: str, others_ok: bool) -> Outcome:
    if others_ok or isinstance(err, UnicodeError):
        log.warning("a request's sentences could not be tagged by %s (input fault, 422): %s", model_id,
                    _first_line(err), exc_info=err)
        return Outcome(error=f"the model could not tag these sentences: {_first_line(err)}", status=422)
    log.error("tagging with %s failed (500)", model_id, exc_info=err)
    return Outcome(error=f"tagging failed: {_first_line(err)}", status=500)


# Everything the class uses is defined above it: @serve.deployment pickles the class (by value, with the
# globals it names) when the decorator runs, so a helper defined further down is missing in the replica.
@serve.deployment(name="Tagger", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class TaggerDeployment:
    async def __init__(self, args: dict[str, Any]):
        from topro.serving import DEFAULT_MODEL_ID, ModelCatalogue, ModelNotRegisteredError

        self.args = parse_args(args)
        if self.args.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.args.tracking_uri
        if self.args.torch_threads:
            import torch

            torch.set_num_threads(self.args.torch_threads)
        self.limits = self.args.limits()
        api.state.max_body_bytes = body_limit(self.args.max_sentences, self.args.max_words,
                                              self.args.max_word_chars)
        api.state.body_timeout_s = self.args.body_timeout_s
        self.catalogue = ModelCatalogue(self.args.model, dict(self.args.models),
                                        list(self.args.allow_registry_ids))
        self.loaded: dict[str, ResidentModel] = {}
        self.replica = _replica_name()
        self.started = time.time()
        # The cap is an arg, so the multiplexed loader is made here, not with a class decorator. It must
        # wrap a plain function: Serve keeps its LRU cache as an attribute of it (not settable on a method).
        async def load_model(model_id: str) -> ResidentModel:
            return await self._load_model(model_id)

        self._get_model = serve.multiplexed(max_num_models_per_replica=self.args.max_models_per_replica)(
            load_model)
        self.gate = BatchGate()
        self.model_calls = 0
        self._tag_batch.set_max_batch_size(self.args.max_batch_size)
        self._tag_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        _warn_if_batches_cannot_fill(self.args.max_batch_size)
        self.alias_switches: list[dict[str, Any]] = []
        # Load the default model now: a bad `model` arg fails the deployment at start, not each request.
        try:
            await self._get_model(DEFAULT_MODEL_ID)
        except ModelNotRegisteredError as err:
            raise ValueError(f"serve app 'tagging': args.model: {err}") from None
        self._alias_task = None
        if self.args.alias_refresh_s > 0:
            self._alias_task = asyncio.get_running_loop().create_task(self._follow_aliases())

    async def _follow_aliases(self) -> None:
        """Every ``alias_refresh_s``: switch each loaded alias model whose alias moved to its new version."""
        while True:
            await asyncio.sleep(self.args.alias_refresh_s)
            for resident in list(self.loaded.values()):
                try:
                    await self._refresh(resident)
                except Exception as err:  # registry down, alias deleted: keep serving what is loaded
                    log.warning("alias refresh of %s failed (%s: %s); still serving version %s",
                                resident.tagger.info.uri, type(err).__name__, str(err).splitlines()[0][:200]
                                if str(err) else "", resident.tagger.info.version)

    async def _refresh(self, resident: "ResidentModel") -> None:
        from topro.serving import Tagger, alias_moved

        old = resident.tagger
        if await asyncio.to_thread(alias_moved, old.info) is None:
            return
        # Loaded beside the old model, which keeps answering meanwhile.
        new = await asyncio.to_thread(Tagger.load, old.info.uri, old.info.id, device=self.args.device,
                                      max_tokens_per_batch=self.args.max_tokens_per_batch,
                                      max_examples=self.args.max_examples)
        # One assignment: the next batch uses the new model; a batch already running holds `old` and
        # finishes with it (it is freed when that batch lets go of it).
        resident.tagger = new
        switch = {"id": old.info.id, "uri": old.info.uri, "from_version": old.info.version,
                  "to_version": new.info.version, "at": time.time(), "load_seconds": new.info.load_seconds}
        self.alias_switches.append(switch)
        log.info("alias %s moved: switched %r from version %s to %s (loaded in %.1fs)", old.info.uri,
                 old.info.id, old.info.version, new.info.version, new.info.load_seconds)

    async def _load_model(self, model_id: str) -> ResidentModel:
        from topro.serving import Tagger

        uri = self.catalogue.uri_for(model_id)
        tagger = await asyncio.to_thread(Tagger.load, uri, model_id, device=self.args.device,
                                         max_tokens_per_batch=self.args.max_tokens_per_batch,
                                         max_examples=self.args.max_examples)
        return ResidentModel(tagger, self.loaded)

    async def _resident_for_request(self) -> ResidentModel:
        from topro.serving import DEFAULT_MODEL_ID, ModelNotRegisteredError, UnknownModelError

        model_id = serve.get_multiplexed_model_id() or DEFAULT_MODEL_ID
        if model_id not in self.loaded:
            # Check the id before the multiplexer sees it: loading an unknown id would first evict a good model.
            try:
                await asyncio.to_thread(self.catalogue.uri_for, model_id)
            except UnknownModelError as err:
                raise RequestProblem(404, f"{err} (header {MODEL_ID_HEADER})") from None
        try:
            return await self._get_model(model_id)
        except ModelNotRegisteredError as err:
            raise RequestProblem(404, f"unknown model id {model_id!r}: {err} (header {MODEL_ID_HEADER})") from None
        except Exception as err:
            log.exception("loading model %r failed", model_id)
            raise RequestProblem(503, f"model {model_id!r} could not be loaded: {type(err).__name__}: "
                                      f"{str(err).splitlines()[0][:300] if str(err) else ''}") from None

    @api.post("/tag", response_model=TagResponse)
    async def tag(self, body: TagRequest):
        """Tags and their probabilities for every word; the model answering is named in `model`."""
        from topro.data.readers import Sentence

        word_lists = check_limits(body, self.limits)
        resident = await self._resident_for_kind("tagging", body.lang)
        chunks = split_by_words(word_lists, self.args.max_call_words)
        sentences = [[Sentence(words, [], body.lang or "") for words in chunk] for chunk in chunks]
        return await self._answer(resident, sentences, "tag", "sentences", body.lang)

    @api.post("/classify", response_model=ClassifyResponse)
    async def classify(self, body: ClassifyRequest):
        """The class of every text, with every class's probability; the model answering is named in `model`."""
        from topro.data.readers import Sentence

        texts = check_text_limits(body, self.limits)
        resident = await self._resident_for_kind("classification", body.lang)
        # A text counts its words towards max_call_words, as a sentence does on /tag.
        chunks = split_by_words(texts, self.args.max_call_words, lambda text: len(text.split()))
        units = [[Sentence([text], [], body.lang or "") for text in chunk] for chunk in chunks]
        return await self._answer(resident, units, "classify", "texts", body.lang)

    async def _resident_for_kind(self, kind: str, lang: str | None) -> "ResidentModel":
        """The request's model, refused (422) when its task is of the other kind or ``lang`` not its language."""
        from topro.serving import WrongKindError

        resident = await self._resident_for_request()
        try:
            resident.tagger.check_kind(kind)
        except WrongKindError as err:
            raise RequestProblem(422, str(err)) from None
        check_lang(lang or "", resident.tagger.info.task)
        return resident

    async def _answer(self, resident: "ResidentModel", chunks: list[list], call: str, key: str, lang: str | None):
        """Run ``chunks`` through the batches (``call``: ``tag`` or ``classify``) and answer with the results
        under ``key``, or with the first chunk's error."""
        results = []
        for chunk in chunks:  # each chunk queues anew: other requests' work goes between a large one's chunks
            job = TagJob(resident, chunk, call=call)
            await self.gate.wait_until_free()
            await self._tag_batch(job)
            if "error" in job.done:
                return JSONResponse({"detail": job.done["error"]}, status_code=job.done["status"])
            results += job.done["tagged"]
        from topro.serving import public_model_info

        # The model that answered the last chunk (an alias may have moved since); ids and versions, no paths.
        public = public_model_info(job.done["info"])
        return JSONResponse({
            "model": {k: public[k] for k in ("id", "uri", "task", "method", "run_id", "registered_model",
                                             "version")},
            key: [{**r.as_dict(), "lang": lang} for r in results],
            "batch": {**job.done["batch"], "chunks": len(chunks)},
        })

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _tag_batch(self, jobs: list[TagJob]) -> list[None]:
        """Tag the sentences of all ``jobs``: one ``Tagger.tag`` call per model among them."""
        with self.gate.model_busy():
            await self._tag_jobs(jobs)
        return [None] * len(jobs)

    async def _tag_jobs(self, jobs: list[TagJob]) -> None:
        by_model: dict[tuple[int, str], list[TagJob]] = {}
        for job in jobs:
            by_model.setdefault((id(job.resident), job.call), []).append(job)
        calls = [call for group in by_model.values()
                 for call in split_by_words(group, self.args.max_call_words, lambda job: job.words)]
        for group in calls:
            tagger = group[0].resident.tagger  # read once: an alias switch during the call does not touch it
            outcomes = await tag_requests(getattr(tagger, group[0].call), [job.sentences for job in group],
                                          tagger.info.id)
            for job, outcome in zip(group, outcomes):
                if outcome.error:
                    job.done["error"], job.done["status"] = outcome.error, outcome.status
                    continue
                self.model_calls += 1 if outcome.first_of_call else 0
                job.done["tagged"] = outcome.tagged
                job.done["info"] = tagger.info
                job.done["batch"] = {"id": self.model_calls, "requests": outcome.call_requests,
                                     "sentences": outcome.call_sentences, "replica": self.replica,
                                     "seconds": outcome.call_seconds}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        import torch

        return {"status": "ok", "replica": self.replica, "uptime_s": round(time.time() - self.started, 1),
                "models_loaded": sorted(self.loaded), "torch_threads": torch.get_num_threads()}

    @api.get("/", include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The tagging page: one self-contained HTML file (no CDN), talking to /models and /tag."""
        return HTMLResponse(TAGGING_PAGE.read_text(encoding="utf-8"), headers=PAGE_HEADERS)

    @api.get("/models")
    async def models(self) -> dict[str, Any]:
        """The ids a client may send in the header, and what this replica holds."""
        from topro.serving import DEFAULT_MODEL_ID, is_registry_or_remote, public_model_info

        # Ids and registry URIs only: a checkpoint folder's path stays on the server.
        return {"default": DEFAULT_MODEL_ID, "header": MODEL_ID_HEADER,
                "available": [{"id": k, "uri": v if is_registry_or_remote(v) else None}
                              for k, v in self.catalogue.ids().items()],
                "registry_ids_allowed": list(self.catalogue.allow_registry_ids),
                "max_models_per_replica": self.args.max_models_per_replica,
                "replica": self.replica,
                "loaded": [public_model_info(r.tagger.info) for r in self.loaded.values()],
                "limits": {**self.limits.model_dump(), "max_body_bytes": api.state.max_body_bytes},
                "batching": {"max_batch_size": self.args.max_batch_size,
                             "batch_wait_timeout_s": self.args.batch_wait_timeout_s,
                             "max_call_words": self.args.max_call_words},
                "alias_refresh_s": self.args.alias_refresh_s, "alias_switches": self.alias_switches}


def make_app(args: dict[str, Any], deployment_options: dict[str, dict[str, Any]] | None = None) -> Application:
    """The application for ``args``; ``deployment_options`` (by deployment name) as in a Serve config's
    ``deployments:`` list, for callers that deploy without a config file (``topro serve``)."""
    cfg = parse_args(args)
    cfg.tracking_uri = absolute_tracking_uri(cfg.tracking_uri)
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(cfg.tracking_uri)  # check against the registry the replicas will ask
    try:
        check_model_uris(cfg)
    finally:
        mlflow.set_tracking_uri(previous)
    return bind_app(TaggerDeployment, cfg, deployment_options)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for ``import_path: serve.tagging:build_app`` (args from the Serve config)."""
    return make_app(args)
