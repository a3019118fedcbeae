"""Known-harmless output of the stack, silenced where topro causes it (Ray-free).

- transformers' LOAD REPORT when a method loads the built-in ``tiny`` model: it is a masked LM, so a
  token-classification head is always "MISSING" and the MLM head "UNEXPECTED", by design. Reports
  for any other model are kept (a missing head of a pretrained checkpoint is worth knowing).
- DeepSpeed's "Setting accelerator to CPU ... unable to detect it" on a machine without a GPU
  (``DS_ACCELERATOR=cpu`` is what it would pick anyway).
- transformers 5's notice that ``past_key_values`` is now called ``cache`` (a FutureWarning per model class
  and a log line): topro's LLM scoring passes and reads ``past_key_values``, the name every transformers
  it supports (4.45 on) takes.
- Ray Train's ``PreemptionWatcher`` actor (Ray 2.60 starts one per worker group, ``max_restarts=-1``, its
  worker handles as constructor arguments): Ray's core worker logs an error-level ``core_worker.cc ... E ...
  Actor with class name: 'PreemptionWatcher' ... has constructor arguments in the object store and
  max_restarts > 0`` for every trial, a warning that reads as a failure. It watches for nodes being drained
  (spot preemption); a Ray that topro starts on one machine (``cluster/runtime.local_ray_env``) has no node
  to lose, so there the watcher is not started (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``, Ray's own
  switch): the cause is removed, not the line filtered. Joining a real cluster keeps it.
- With ``progress=False``: every bar of transformers and huggingface_hub (loading weights, writing
  model shards), besides topro's own.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

_TINY_MARK = "/tiny-"


class _TinyLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not ("LOAD REPORT" in text and _TINY_MARK in text)


class _CacheRename(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "`past_key_values`/`cache_params` are deprecated" not in str(record.msg)


_FILTER = _TinyLoadReport()
_CACHE_FILTER = _CacheRename()


def no_gpu_device() -> bool:
    return not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))


def quiet_stack(progress: bool = True) -> None:
    """Apply the silencing above (idempotent); call before loading models."""
    if "DS_ACCELERATOR" not in os.environ and no_gpu_device():  # also done by `import topro`
        os.environ["DS_ACCELERATOR"] = "cpu"
    logger = logging.getLogger("transformers.modeling_utils")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    logger = logging.getLogger("transformers.utils.generic")
    if _CACHE_FILTER not in logger.filters:
        logger.addFilter(_CACHE_FILTER)
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
    if not progress:
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
