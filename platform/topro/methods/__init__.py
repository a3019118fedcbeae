"""Methods behind one protocol; ``build_method`` picks the implementation.

``topro.method_registry`` names every method's class and traits (torch-free);
``register_method`` adds one built by a factory. ToPro picks its masked-LM, causal-LM or
seq2seq class from the model's config, so ``method: topro`` works for mBERT, XLM-R
and mT5 alike. ``prompt_tuning``, ``topro_soft`` and ``rosprompt`` train a
few tensors on a frozen backbone; their checkpoints hold only those tensors
and name the backbone, which ``load_model`` fetches (see ``trained_only``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from topro.config import TrainConfig
from topro.data.tasks import get_task
from topro.method_registry import METHOD_REGISTRY, MethodEntry, method_entry, packable_methods
from topro.methods.base import META_FILE, Encoded, Method, MethodSpec

Factory = Callable[[MethodSpec, object, str], Method]


def backbone_kind(model_path: str) -> str:
    """``masked``, ``causal`` or ``seq2seq`` (``models.model_kind``); a trained-only checkpoint folder without
    the backbone's ``config.json`` predates decoder-only backbones, and so is an encoder's."""
    folder = Path(model_path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        return "masked"
    from topro.models import model_kind

    return model_kind(model_path)


def _from_registry(spec: MethodSpec, tokenizer, model_path: str) -> Method:
    """The registry's class for ``spec.method`` on this backbone: its encoder-decoder class on an
    encoder-decoder model, its decoder-only class on a causal LM, else its own."""
    entry = METHOD_REGISTRY[spec.method]
    kind = backbone_kind(model_path)
    encoder_decoder = entry.seq2seq_cls is not None and kind == "seq2seq"
    if encoder_decoder and spec.prompt_packing != "per_word":
        raise ValueError(f"prompt_packing={spec.prompt_packing!r}: method {spec.method!r} on the "
                         f"encoder-decoder {model_path} cannot pack prompts; packing is for masked and causal LMs")
    if encoder_decoder and spec.unseen_labels:
        raise ValueError(f"unseen_labels={spec.unseen_labels}: method {spec.method!r} on the encoder-decoder "
                         f"{model_path} generates label words over the whole vocabulary, so an unseen label's "
                         "word cannot leave its training softmax; use a masked LM")
    return entry.implementation(kind, get_task(spec.task).kind)(spec, tokenizer)


METHODS: dict[str, Factory] = {}
"""Methods registered at run time with a factory (``register_method``); the registry's own are built from
their classes."""


def register_method(name: str, factory: Factory, entry: MethodEntry | None = None) -> None:
    """Add a method built by ``factory(spec, tokenizer, model_path)``; ``entry`` gives its traits
    (default: none of them)."""
    METHODS[name] = factory
    METHOD_REGISTRY[name] = entry or MethodEntry(name)


def method_spec(cfg: TrainConfig, model_path: str) -> MethodSpec:
    """The method's settings from the training config: every field the two share by name, then what is
    derived (the task's labels, the backbone, the template only for methods that ask a question)."""
    from topro.models import mlm_head_untrained
    from topro.unseen import expand_unseen_labels

    task = get_task(cfg.task)
    entry = method_entry(cfg.method)
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(MethodSpec) if hasattr(cfg, f.name)}
    return MethodSpec(**{**shared, "task": task.name, "labels": list(task.labels), "base_model": cfg.model,
                         "unseen_labels": expand_unseen_labels(task, cfg.unseen_labels),
                         "base_model_path": model_path,
                         "template": (cfg.template or task.default_template) if entry.prompted else None,
                         "verbalizer": (cfg.verbalizer or task.default_verbalizer) if entry.prompted else None,
                         "mlm_head_untrained": entry.head == "pretrained_mlm" and bool(mlm_head_untrained(model_path))})


def build_method(spec: MethodSpec, model_path: str, tokenizer=None) -> Method:
    """The method of ``spec`` for the model at ``model_path`` (tokenizer loaded from there if not given)."""
    if spec.method not in METHOD_REGISTRY:
        raise ValueError(f"unknown method {spec.method!r}; known methods: {sorted(METHOD_REGISTRY)}")
    packing = spec.prompt_packing
    if packing != "per_word" and not method_entry(spec.method).packable:
        raise ValueError(f"prompt_packing={packing!r}: method {spec.method!r} cannot pack prompts; "
                         f"only {packable_methods()} can")
    if tokenizer is None:
        from topro.models import load_tokenizer

        tokenizer = load_tokenizer(model_path)
    method = METHODS.get(spec.method, _from_registry)
    if spec.adapter == "none":
        return method(spec, tokenizer, model_path)
    from topro.methods.lora import inner_spec, with_adapter

    return with_adapter(method(inner_spec(spec), tokenizer, model_path), spec)


def load_checkpoint(folder: str | Path, device=None):
    """(method, model) from a checkpoint folder written by ``Method.save``."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not a topro checkpoint (no {META_FILE})")
    from topro.checkpoint_files import verify_checkpoint

    verify_checkpoint(folder)  # a damaged weight file stops here with one line, not in the deserializer
    meta = json.loads(meta_path.read_text())
    spec = MethodSpec.from_meta(meta)
    method = build_method(spec, str(folder))
    model = method.load_model(folder)
    if device is not None:
        model.to(device)
    model.eval()
    return method, model


__all__ = ["Encoded", "META_FILE", "METHODS", "Method", "MethodSpec", "build_method", "load_checkpoint",
           "method_spec", "register_method"]
