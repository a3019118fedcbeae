"""Methods behind one protocol; ``build_method`` picks the implementation.

The registry maps a method name to a factory. ToPro picks its masked-LM, causal-LM or
seq2seq implementation from the model's config, so ``method: topro`` works
for mBERT, XLM-R and mT5 alike. ``prompt_tuning`` and ``topro_soft`` train a
few tensors on a frozen backbone; their checkpoints hold only those tensors
and name the backbone, which ``load_model`` fetches (see ``trained_only``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from topro.config import PACKABLE_METHODS
from topro.methods.base import META_FILE, Encoded, Method, MethodSpec


def _topro(spec: MethodSpec, tokenizer, model_path: str) -> Method:
    from topro.models import model_kind

    kind = model_kind(model_path)
    if kind == "causal":
        from topro.methods.topro_causal import ToProCausal

        return ToProCausal(spec, tokenizer)
    if kind == "seq2seq":
        if spec.prompt_packing != "per_word":
            raise ValueError(f"prompt_packing={spec.prompt_packing!r}: method 'topro' on the encoder-decoder "
                             f"{model_path} cannot pack prompts; packing is for masked and causal LMs")
        from topro.methods.topro_seq2seq import ToProSeq2Seq

        return ToProSeq2Seq(spec, tokenizer)
    from topro.methods.topro_mlm import ToProMLM

    return ToProMLM(spec, tokenizer)


def _vanilla(spec: MethodSpec, tokenizer, model_path: str) -> Method:
    from topro.methods.vanilla import Vanilla

    return Vanilla(spec, tokenizer)


def _prompt_tuning(spec: MethodSpec, tokenizer, model_path: str) -> Method:
    from topro.methods.prompt_tuning import PromptTuning

    return PromptTuning(spec, tokenizer)


def _topro_soft(spec: MethodSpec, tokenizer, model_path: str) -> Method:
    from topro.methods.topro_soft import ToProSoft

    return ToProSoft(spec, tokenizer)


METHODS: dict[str, Callable[[MethodSpec, object, str], Method]] = {
    "vanilla": _vanilla, "topro": _topro, "prompt_tuning": _prompt_tuning, "topro_soft": _topro_soft}


def register_method(name: str, factory: Callable[[MethodSpec, object, str], Method]) -> None:
    METHODS[name] = factory


def build_method(spec: MethodSpec, model_path: str, tokenizer=None) -> Method:
    """The method of ``spec`` for the model at ``model_path`` (tokenizer loaded from there if not given)."""
    if spec.method not in METHODS:
        raise ValueError(f"unknown method {spec.method!r}; known methods: {sorted(METHODS)}")
    packing = spec.prompt_packing
    if packing != "per_word" and spec.method not in PACKABLE_METHODS:
        raise ValueError(f"prompt_packing={packing!r}: method {spec.method!r} cannot pack prompts; "
                         f"only {list(PACKABLE_METHODS)} can")
    if tokenizer is None:
        from topro.models import load_tokenizer

        tokenizer = load_tokenizer(model_path)
    return METHODS[spec.method](spec, tokenizer, model_path)


def load_checkpoint(folder: str | Path, device=None):
    """(method, model) from a checkpoint folder written by ``Method.save``."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not a topro checkpoint (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    spec = MethodSpec.from_meta(meta)
    method = build_method(spec, str(folder))
    model = method.load_model(folder)
    if device is not None:
        model.to(device)
    model.eval()
    return method, model


__all__ = ["Encoded", "META_FILE", "METHODS", "Method", "MethodSpec", "build_method", "load_checkpoint",
           "register_method"]
