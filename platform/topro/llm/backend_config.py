"""How a language model runs, as settings: one dataclass for ``topro eval-llm`` and the ``llm`` Serve app.

Torch-free, so a config is checked in a second before anything heavy loads. ``load_backend`` takes
``backend_options()``; a setting meant for the other kind of backend is ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from topro.config import _at_least as at_least
from topro.config import _positive as positive
from topro.config import check_ranges


@dataclass(kw_only=True)
class BackendConfig:
    """The backend fields a command or app takes as its own (flat keys: ``retries: 2``, ``dtype=bf16``)."""

    # A local Hugging Face model.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of a local model (``auto``: CUDA when present)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Precision of a local model."""
    scoring: Literal["shared", "naive"] = "shared"
    """Shared-prefix KV cache, or the naive per-prompt reference."""
    max_tokens_per_batch: int = 4096
    """Token budget of one forward pass of a local model."""
    threads: int | None = None
    """torch CPU threads per process."""
    # An OpenAI-compatible server.
    api_model: str | None = None
    """Model name on the server (default: its first listed model)."""
    api: Literal["auto", "completions", "chat"] = "auto"
    """Server endpoint used for generation."""
    concurrency: int = 8
    """Requests to the server in flight."""
    timeout: float = 60.0
    """Seconds per request to the server."""
    retries: int = 4
    """Retries of a failed request to the server (with doubling backoff, or the server's Retry-After)."""

    def backend_problems(self) -> list[tuple[str, str]]:
        return check_ranges(self, {"max_tokens_per_batch": at_least(1), "threads": at_least(1, optional=True),
                                   "concurrency": at_least(1), "timeout": positive, "retries": at_least(0)})

    def backend_options(self) -> dict[str, Any]:
        """Options of ``topro.llm.backends.load_backend``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(BackendConfig)}
