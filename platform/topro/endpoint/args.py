"""The ``args`` of the Serve applications (``serve/config.yaml``) as typed dataclasses; Ray-free.

Loaded by the one config loader (``topro.config.from_dict``): unknown keys are refused with the nearest
name, and every value is checked before a replica starts.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from topro.batching import MAX_EXAMPLES
from topro.config import ConfigError, check_ranges, from_dict
from topro.config import _at_least as at_least
from topro.llm.backend_config import BackendConfig

MODEL_ENV = "TOPRO_LLM_MODEL"
"""Where the ``llm`` app finds its model when ``args.model`` is not set."""


def _between(lo: float, hi: float, low_open: bool = False):
    def check(value):
        if value is None or not (lo < value if low_open else lo <= value) or not value <= hi:
            return f"must be in {'(' if low_open else '['}{lo:g}, {hi:g}], got {value!r}"
        return None
    return check


def _limits(cfg) -> dict:
    from topro.endpoint.schemas import Limits

    return Limits(max_sentences=cfg.max_sentences, max_words=cfg.max_words, max_word_chars=cfg.max_word_chars)


@dataclass
class TaggingArgs:
    """The ``tagging`` application's args."""

    model: str | None = None
    """Default model: a checkpoint folder or ``models:/<name>@<alias>`` | ``/<version>``. Required."""
    models: dict[str, str] = field(default_factory=dict)
    """More model ids clients may name in the ``serve_multiplexed_model_id`` header, id -> URI."""
    allow_registry_ids: list[str] = field(default_factory=list)
    """Registry URIs clients may name in the header besides the configured ids: shell-style patterns such as
    ``models:/topro-udpos-*@champion``. Default: none beyond the ``models:/`` URIs of model and models."""
    max_batch_size: int = 32
    """Requests tagged together at most (1 to 1024)."""
    batch_wait_timeout_s: float = 0.0
    """Longest wait to fill a batch once the model is free (0 to 5 s). Requests that arrive while it runs are
    held and go together anyway (BatchGate), so waiting more only delays an idle model."""
    max_sentences: int = 64
    """Sentences per request."""
    max_words: int = 200
    """Words per sentence."""
    max_word_chars: int = 100
    """Characters per word."""
    max_models_per_replica: int = 3
    """Models one replica keeps loaded (least recently used out)."""
    max_call_words: int = 2048
    """Words in one model call at most (ToPro: one prompt per word). A request with more is split into chunks
    of whole sentences that each wait their turn with the other requests, so one large request holds the model
    for one chunk at a time; a batch is split the same way."""
    body_timeout_s: float = 30.0
    """A request body that stops arriving for this long (at most 600 s) is answered 408 and dropped."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    torch_threads: int | None = None
    """torch threads per replica (default: Ray's OMP_NUM_THREADS, i.e. the replica's num_cpus)."""
    max_tokens_per_batch: int | None = None
    """Padded tokens in one forward pass, at least 128 (default: 2048 on CPU, 8192 on an accelerator)."""
    max_examples: int = MAX_EXAMPLES
    """Prompts in one forward pass at most."""
    tracking_uri: str | None = None
    """MLflow tracking URI (default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``, made absolute)."""
    alias_refresh_s: float = 30.0
    """How often a replica asks the registry where the aliases of its ``models:/<name>@<alias>`` models point,
    and switches to a moved alias's new version (0: never; the version loaded first stays)."""

    RENAMED_KEYS = {"max_tokens": "max_tokens_per_batch"}  # not a field: old names, refused with the new one

    def problems(self) -> list[tuple[str, str]]:
        from topro.serving import DEFAULT_MODEL_ID

        out = [] if self.model else [("model", "required: a checkpoint folder or models:/<name>@<alias>")]
        if DEFAULT_MODEL_ID in self.models:
            out.append(("models", f"{DEFAULT_MODEL_ID!r} is the id of 'model'; name the others differently"))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            out.append(("device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}"))
        return out + check_ranges(self, {
            "max_batch_size": _between(1, 1024), "batch_wait_timeout_s": _between(0, 5),
            "max_sentences": at_least(1), "max_words": at_least(1), "max_word_chars": at_least(1),
            "max_models_per_replica": at_least(1), "max_call_words": at_least(1),
            "body_timeout_s": _between(0, 600, low_open=True), "torch_threads": at_least(1, optional=True),
            "max_tokens_per_batch": at_least(128, optional=True), "max_examples": at_least(1),
            "alias_refresh_s": at_least(0)})

    def limits(self):
        return _limits(self)


@dataclass
class LLMArgs(BackendConfig):
    """The ``llm`` application's args (with the backend's: ``BackendConfig``)."""

    model: str | None = None
    """Local HF model folder or hub id, or the base URL of an OpenAI-compatible server; default
    ``$TOPRO_LLM_MODEL``."""
    task: str = "udpos"
    """Task name."""
    format: str = "topro"
    """Prompt format of ``topro.llm`` (a name or a YAML path)."""
    mode: Literal["score", "generate"] = "score"
    """Rank label words by log-likelihood, or generate and match."""
    shots: int = 0
    """Demonstrations from ``demo_lang``'s train split (0 to 32; needs data)."""
    seed: int = 42
    """Demonstration sampling seed."""
    demo_lang: str = "en"
    """Language of the demonstrations."""
    data_dir: str | None = None
    """Data folder (default ``$TOPRO_DATA_DIR``)."""
    verbalizer: str | None = None
    """Verbalizer name (default: the format's, else the task's)."""
    length_norm: bool = False
    """Score multi-token labels by the mean of their token log-probs."""
    viterbi: bool = True
    """Span tasks, score mode: the best valid IOB2 sequence."""
    # Batching and request limits.
    max_batch_size: int = 8
    """Requests tagged together at most (1 to 256)."""
    batch_wait_timeout_s: float = 0.02
    """Longest wait to fill a batch (0 to 5 s)."""
    max_sentences: int = 8
    """Sentences per request."""
    max_words: int = 64
    """Words per sentence."""
    max_word_chars: int = 100
    """Characters per word."""

    def problems(self) -> list[tuple[str, str]]:
        return self.backend_problems() + check_ranges(self, {
            "shots": _between(0, 32), "max_batch_size": _between(1, 256),
            "batch_wait_timeout_s": _between(0, 5), "max_sentences": at_least(1), "max_words": at_least(1),
            "max_word_chars": at_least(1)})

    def limits(self):
        return _limits(self)

    def resolved_model(self) -> str | None:
        return self.model or os.environ.get(MODEL_ENV) or None

    def eval_config(self):
        from topro.llm.evaluate import LLMEvalConfig

        return LLMEvalConfig(task=self.task, model=self.resolved_model() or "", format=self.format, mode=self.mode,
                             shots=self.shots, seed=self.seed, data_dir=self.data_dir, demo_lang=self.demo_lang,
                             verbalizer=self.verbalizer, length_norm=self.length_norm)


APP_ARGS = {"tagging": TaggingArgs, "llm": LLMArgs}
"""The args dataclass of each application of ``serve/config.yaml``, by name."""


def parse_app_args(cls, args: dict[str, Any] | None, app: str):
    """Validated args of application ``app``, or a ``ValueError`` naming the bad key."""
    try:
        return from_dict(cls, dict(args or {}), "args")
    except ConfigError as err:  # "args: field 'shots': must be ..." -> "serve app 'llm': bad args: field ..."
        raise ValueError(f"serve app {app!r}: bad {err}") from None
