"""Tagging unlabelled sentences (and classifying texts) with a trained checkpoint, for serving (Ray-free).

``Tagger`` loads one checkpoint (a folder, or an MLflow registry URI such as
``models:/topro-udpos-topro@champion``) and tags lists of sentences (``tag``), or, for a model of a
``kind: classification`` task, gives lists of texts their class (``classify``). All
sentences of one ``tag`` call go through ``evaluate.predict`` together: every
ToPro prompt of every sentence joins the same token-budget batches, so a
caller that gathers sentences from many requests (the Serve deployment's
``@serve.batch``) gets cross-request batching without more code here.

``ModelCatalogue`` maps the model ids a client may ask for to URIs. A request
can only name a configured id or a registry URI the configuration allows,
never a path on the server's disk.

Aliases: a ``Tagger`` loaded from ``models:/<name>@<alias>`` holds the version
the alias named at load time (``info.version``; the files come from that
pinned version, so a move during the load cannot mix versions).
``alias_moved`` says whether the alias names another version now; the
deployment then loads the new version beside the old one and swaps.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from topro.batching import MAX_EXAMPLES, default_max_tokens_per_batch
from topro.data.readers import Sentence

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "default"
MAX_MODEL_ID_CHARS = 256
# Registry URIs a client may name as a model id: a registered model by alias or version number.
_REGISTRY_ID = re.compile(r"^models:/[A-Za-z0-9][\w.\-]*(@[\w.\-]+|/\d+)$")
_ALIAS_URI = re.compile(r"^models:/([^@/]+)@([^@/]+)$")


class ModelNotRegisteredError(LookupError):
    """A ``models:/`` URI whose name, alias or version the registry does not have."""


def follows_alias(uri: str) -> bool:
    """Whether ``uri`` names a registered model by alias (``models:/<name>@<alias>``)."""
    return bool(_ALIAS_URI.match(uri))


def registered_version(uri: str) -> dict[str, str | None]:
    """``describe_model_uri`` of a registry URI, with a ``ModelNotRegisteredError`` that names what is missing."""
    from topro.tracking import describe_model_uri, tracking_uri

    try:
        return describe_model_uri(uri)
    except Exception as err:  # MlflowException: no such name, alias or version; or the registry is unreachable
        text = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        # A missing name or version is RESOURCE_DOES_NOT_EXIST; a missing alias, INVALID_PARAMETER_VALUE
        # ("Registered model alias ... not found", MLflow 3.17). Anything else (unreachable registry) is raised.
        code = str(getattr(err, "error_code", ""))
        if type(err).__name__ != "MlflowException" or not (
                code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in text)):
            raise
        match = _ALIAS_URI.match(uri)
        what = f"alias {match.group(2)!r} of registered model {match.group(1)!r}" if match else repr(uri)
        raise ModelNotRegisteredError(f"{uri}: the model registry at {tracking_uri()} has no {what} "
                                      f"({text})") from None


def alias_moved(info: "ModelInfo") -> str | None:
    """The version ``info.uri``'s alias names now, if that is not ``info.version`` (else ``None``)."""
    if not follows_alias(info.uri):
        return None
    version = registered_version(info.uri)["version"]
    return version if version != info.version else None


class UnknownModelError(LookupError):
    """A client asked for a model id that is neither configured nor registered."""


@dataclass(frozen=True)
class TaggedWord:
    word: str
    tag: str
    prob: float | None
    """The model's probability of ``tag`` for this word; ``None`` when the word got no
    prediction (cut by the model's ``max_length``; it carries the fallback tag)."""


@dataclass
class TaggedSentence:
    words: list[TaggedWord]
    lang: str = ""
    n_truncated_words: int = 0
    """Words the model never saw (vanilla: past ``max_length``); they carry the fallback tag."""
    n_trimmed_prompts: int = 0
    """ToPro prompts whose sentence context was trimmed to fit ``max_length``."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ClassifiedText:
    """One text's class (a ``kind: classification`` model)."""

    text: str
    label: str
    prob: float
    """The model's probability of ``label``."""
    scores: dict[str, float]
    """Every class's probability, in the model's label order."""
    lang: str = ""
    trimmed: bool = False
    """The text was cut at its end to fit the model's ``max_length``."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class WrongKindError(ValueError):
    """A request for the other route: a tagging model asked to classify, or a classification model to tag."""


@dataclass
class ModelInfo:
    """What is loaded: the id clients use, where it came from, and what it does."""

    id: str
    uri: str
    checkpoint: str
    task: str
    method: str
    labels: list[str]
    template: str | None = None
    verbalizer: str | None = None
    base_model: str | None = None
    registered_model: str | None = None
    version: str | None = None
    run_id: str | None = None
    """The MLflow run that produced the checkpoint (registry URIs)."""
    source: str | None = None
    device: str = "cpu"
    load_seconds: float = 0.0
    prompt_packing: str = "per_word"
    """ToPro: how the checkpoint was trained, and so is served (``sentence``: packed questions)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def words_from_text(text: str) -> list[str]:
    """Whitespace tokenisation (the endpoint's ``text`` input)."""
    return text.split()


class Tagger:
    """One loaded checkpoint that tags batches of unlabelled sentences.

    ``tag`` may be called from a worker thread (the Serve deployment runs it off
    its event loop); it only reads the model, so calls need no lock, but one at
    a time keeps CPU threads from fighting, which the caller arranges.
    """

    def __init__(self, method, model, info: ModelInfo, *, max_tokens_per_batch: int | None = None,
                 max_examples: int = MAX_EXAMPLES, viterbi: bool = True):
        from topro.data.tasks import get_task

        self.method = method
        self.model = model
        self.info = info
        self.task = get_task(info.task)
        self.label_index = {label: i for i, label in enumerate(method.labels)}
        self.max_tokens_per_batch = max_tokens_per_batch or default_max_tokens_per_batch(info.device)
        self.max_examples = max_examples
        # Span tasks (IOB2): decode the best valid tag sequence, so no I-X follows O.
        self.viterbi = viterbi and self.task.scheme == "iob2"

    @classmethod
    def load(cls, uri: str, model_id: str | None = None, *, device: str = "auto", **options) -> "Tagger":
        """Load ``uri`` (a checkpoint folder or a ``models:/`` / ``runs:/`` URI)."""
        from topro.methods import load_checkpoint
        from topro.models import pick_device
        from topro.tracking import describe_model_uri, resolve_checkpoint

        start = time.perf_counter()
        origin = registered_version(uri) if uri.startswith("models:/") else describe_model_uri(uri)
        # An alias is read once: the files come from the version it named then, even if it moves meanwhile.
        pinned = f"models:/{origin['registered_model']}/{origin['version']}" if follows_alias(uri) else uri
        folder = resolve_checkpoint(pinned)
        dev = pick_device(device)
        method, model = load_checkpoint(folder, dev)
        meta = method.meta()
        info = ModelInfo(id=model_id or uri, uri=uri, checkpoint=str(folder), task=meta["task"],
                         method=meta["method"], labels=list(method.labels), template=meta.get("template"),
                         verbalizer=meta.get("verbalizer"), base_model=meta.get("base_model"),
                         registered_model=origin["registered_model"], version=origin["version"],
                         run_id=origin["run_id"], source=origin["source"], device=str(dev),
                         prompt_packing=meta.get("prompt_packing", "per_word"),
                         load_seconds=round(time.perf_counter() - start, 3))
        log.info("loaded %s (%s, %s %s) from %s in %.1fs", info.id, uri, info.task, info.method, folder,
                 info.load_seconds)
        return cls(method, model, info, **options)

    @property
    def kind(self) -> str:
        """The task kind the model was trained for: ``tagging`` (``tag``) or ``classification`` (``classify``)."""
        return self.task.kind

    def check_kind(self, wanted: str) -> None:
        """Raise ``WrongKindError`` (naming the route to use) unless the model's task is of kind ``wanted``."""
        if self.kind != wanted:
            route = {"tagging": "POST /tag", "classification": "POST /classify"}[self.kind]
            raise WrongKindError(f"model {self.info.id!r} is a {self.kind} model (task {self.task.name!r}): "
                                 f"send its requests to {route}")

    def tag(self, sentences: list[Sentence]) -> list[TaggedSentence]:
        """Tags and their probabilities for every word of every sentence, in one prediction pass."""
        from topro.evaluate import decode, predict

        self.check_kind("tagging")
        if not sentences:
            return []
        predictions = predict(self.method, self.model, sentences, max_tokens_per_batch=self.max_tokens_per_batch,
                              max_examples=self.max_examples)
        out = []
        for sentence, prediction in zip(sentences, predictions):
            tags = decode(self.task, self.method.labels, prediction, viterbi=self.viterbi)
            words = []
            for word, tag, row in zip(sentence.words, tags, prediction.log_probs):
                log_prob = row[self.label_index[tag]]
                prob = None if np.isnan(log_prob) else round(float(math.exp(log_prob)), 6)
                words.append(TaggedWord(word, tag, prob))
            out.append(TaggedSentence(words, sentence.lang, prediction.truncated_words,
                                      prediction.trimmed_prompts))
        return out

    def classify(self, texts: list[Sentence]) -> list[ClassifiedText]:
        """The class of every text (one-unit sentences, ``data.readers.as_sentence``), in one prediction pass."""
        from topro.evaluate import predict

        self.check_kind("classification")
        if not texts:
            return []
        predictions = predict(self.method, self.model, texts, max_tokens_per_batch=self.max_tokens_per_batch,
                              max_examples=self.max_examples)
        out = []
        for text, prediction in zip(texts, predictions):
            probs = np.exp(prediction.log_probs[0])
            best = int(probs.argmax())
            out.append(ClassifiedText(text.words[0], self.method.labels[best], round(float(probs[best]), 6),
                                      {label: round(float(p), 6) for label, p in zip(self.method.labels, probs)},
                                      text.lang, bool(prediction.trimmed_prompts)))
        return out


@dataclass
class ModelCatalogue:
    """The model ids a client may name, and the URI behind each.

    ``default`` answers requests that name no model. ``named`` adds ids of the
    operator's choosing (``{"panx": "models:/topro-panx-topro@champion"}``).
    A client may also name a registry URI directly (``models:/<name>@<alias>``
    or ``models:/<name>/<version>``), but only one the operator allowed: a
    registry URI of ``default`` or ``named``, or one matching a pattern of
    ``allow_registry_ids`` (shell-style, e.g. ``models:/topro-udpos-*@champion``).
    Anything else is refused before the registry is asked or anything loaded, so
    clients cannot make a replica download arbitrary models or evict loaded ones.
    """

    default: str
    named: dict[str, str] = field(default_factory=dict)
    allow_registry_ids: list[str] = field(default_factory=list)
    _checked: set[str] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ids(self) -> dict[str, str]:
        return {DEFAULT_MODEL_ID: self.default, **self.named}

    def registry_id_allowed(self, model_id: str) -> bool:
        configured = {uri for uri in self.ids().values() if uri.startswith("models:/")}
        return model_id in configured or any(fnmatch.fnmatchcase(model_id, p) for p in self.allow_registry_ids)

    def uri_for(self, model_id: str | None) -> str:
        """The URI of ``model_id`` (empty or None: the default); raises ``UnknownModelError``."""
        if not model_id:
            return self.default
        known = self.ids()
        if model_id in known:
            return known[model_id]
        shown = model_id if len(model_id) <= 80 else model_id[:77] + "..."
        choices = f"known ids: {sorted(known)}"
        if self.allow_registry_ids:
            choices += f" or a registered model matching {self.allow_registry_ids}"
        if (len(model_id) > MAX_MODEL_ID_CHARS or not _REGISTRY_ID.match(model_id)
                or not self.registry_id_allowed(model_id)):
            raise UnknownModelError(f"unknown model id {shown!r}; {choices}")
        with self._lock:
            if model_id in self._checked:
                return model_id
        from topro.tracking import describe_model_uri

        try:
            describe_model_uri(model_id)
        except Exception as err:  # MlflowException: no such name, alias or version
            raise UnknownModelError(f"unknown model id {shown!r}: not in the model registry "
                                    f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); {choices}") from None
        with self._lock:
            self._checked.add(model_id)
        return model_id


def public_model_info(info: ModelInfo) -> dict[str, Any]:
    """What clients may see of a loaded model: ids, task, method, registry version and run, never a path on
    the server (the checkpoint folder, a path model's URI, a local base model's folder)."""
    registry = info.uri if is_registry_or_remote(info.uri) else None
    base = info.base_model
    return {"id": info.id, "uri": registry, "task": info.task, "method": info.method, "labels": info.labels,
            "template": info.template, "verbalizer": info.verbalizer, "prompt_packing": info.prompt_packing,
            "base_model": base.rstrip("/").rsplit("/", 1)[-1] if base and "/" in base else base,
            "registered_model": info.registered_model, "version": info.version, "run_id": info.run_id,
            "device": info.device, "load_seconds": info.load_seconds}


def is_registry_or_remote(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(("models:/", "runs:/"))


__all__ = ["ClassifiedText", "DEFAULT_MODEL_ID", "ModelCatalogue", "ModelInfo", "ModelNotRegisteredError", "TaggedSentence",
           "TaggedWord", "Tagger", "UnknownModelError", "alias_moved", "follows_alias",
           "public_model_info", "registered_version", "words_from_text", "WrongKindError"]
