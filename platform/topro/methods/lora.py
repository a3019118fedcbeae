"""LoRA for any method's backbone, through PEFT (``adapter: lora``).

``LoraMethod`` wraps a method: encoding, batching, loss and scores are the
method's own; the model is the method's model with low-rank adapters injected
in place into its Hugging Face backbone (``peft.inject_adapter_in_model``, so
the model keeps its class and the method's code runs on it unchanged). The
backbone's pretrained weights are frozen; what trains is the adapters plus the
parts the pretrained checkpoint did not provide (a token-classification head,
an MLM head of an encoder published without one: random, so they train whole)
and anything outside the backbone (the causal tagger's head, a soft prompt).

The checkpoint holds only those tensors (``trained.safetensors``), the
backbone's ``config.json``, the tokenizer and ``topro.json``, which names the
backbone and carries its fingerprint (``trained_only``), as the soft-prompt
checkpoints do. ``merged`` folds the adapters into the base weights for
``topro export --merge``, which writes the method's ordinary full checkpoint.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from topro.methods.base import Method, MethodSpec
from topro.methods.trained_only import (backbone_fingerprint, fresh_parameters, load_backbone, load_trained_only,
                                        read_meta, save_trained_only, trained_names, trained_only_meta)

ADAPTERS = ("none", "lora")
PROMPT_ONLY_METHODS = ("prompt_tuning",)
"""Methods that train only a prompt on a frozen backbone (and the soft-prompt ones with ``freeze_backbone``):
there is no backbone training for LoRA to make cheaper."""
SOFT_PROMPT_METHODS = ("topro_soft", "rosprompt")
FINGERPRINT = "topro_backbone_fingerprint"


def trains_only_a_prompt(method: str, freeze_backbone: bool) -> bool:
    return method in PROMPT_ONLY_METHODS or (method in SOFT_PROMPT_METHODS and freeze_backbone)


def backbone_of(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the outermost Hugging Face model in ``model`` (``""``: ``model`` itself)."""
    from transformers import PreTrainedModel

    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return name, module
    raise ValueError(f"adapter: lora: {type(model).__name__} holds no Hugging Face model to adapt")


def default_targets(model_type: str) -> list[str] | str:
    """PEFT's default LoRA targets for the architecture (attention query and value), else every linear layer."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) or []) or "all-linear"


def lora_targets(spec: MethodSpec, model_type: str) -> list[str] | str:
    targets = spec.lora_targets
    if not targets:
        return default_targets(model_type)
    return "all-linear" if list(targets) == ["all-linear"] else list(targets)


def add_lora(model: nn.Module, spec: MethodSpec) -> nn.Module:
    """Inject LoRA adapters into ``model``'s backbone in place; freeze all but the adapters, the parts the
    pretrained checkpoint lacked and the parameters outside the backbone that were training."""
    from peft import LoraConfig, inject_adapter_in_model

    prefix, hf = backbone_of(model)
    inside = f"{prefix}." if prefix else ""
    fresh = fresh_parameters(hf)
    keep = {inside + name for name in fresh}
    keep |= {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(inside)} if prefix else set()
    fresh_modules = sorted({name.rsplit(".", 1)[0] for name in fresh if "." in name})
    config = LoraConfig(r=int(spec.lora_r), lora_alpha=float(spec.lora_alpha), lora_dropout=float(spec.lora_dropout),
                        target_modules=lora_targets(spec, hf.config.model_type),
                        exclude_modules=fresh_modules or None, bias="none")
    inject_adapter_in_model(config, hf)  # freezes every non-adapter parameter of hf
    adapters = {inside + n for n, p in hf.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        param.requires_grad_(name in adapters or name in keep)
    return model


def merged(model: nn.Module) -> nn.Module:
    """``model`` with every LoRA layer folded into its base layer and replaced by it (in place)."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, layer in layers:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    return model


class LoraMethod:
    """``inner`` (any method, built with ``inner_spec(spec)``) with LoRA adapters on its backbone; everything
    but the model is ``inner``'s."""

    def __init__(self, inner: Method, spec: MethodSpec):
        self.inner = inner
        self.spec = spec
        self.name = inner.name
        self.labels = inner.labels
        self.tokenizer = inner.tokenizer

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def encode(self, sentences):
        return self.inner.encode(sentences)

    def collate(self, examples):
        return self.inner.collate(examples)

    def loss(self, model, batch) -> torch.Tensor:
        return self.inner.loss(model, batch)

    def label_log_probs(self, model, batch) -> torch.Tensor:
        return self.inner.label_log_probs(model, batch)

    def build_model(self, model_path: str) -> nn.Module:
        model = self.inner.build_model(model_path)
        fingerprint = backbone_fingerprint(backbone_of(model)[1])  # of the pretrained weights, before LoRA
        model = add_lora(model, self.spec)
        setattr(model, FINGERPRINT, fingerprint)
        return model

    def load_model(self, checkpoint: str | Path) -> nn.Module:
        meta = read_meta(checkpoint)
        model = load_backbone(self.spec, checkpoint, self.inner.build_model, meta.get("backbone_fingerprint"),
                              fingerprint_of=lambda built: backbone_fingerprint(backbone_of(built)[1]))
        model = add_lora(model, self.spec)
        setattr(model, FINGERPRINT, meta.get("backbone_fingerprint"))
        return load_trained_only(model, checkpoint, names=meta["trained_tensors"])

    def meta(self) -> dict[str, Any]:
        return {**self.inner.meta(), **{k: v for k, v in self.spec.meta().items() if k.startswith(("adapter", "lora_"))}}

    def save(self, model: nn.Module, folder: str | Path) -> None:
        names = trained_names(model)
        meta = {**trained_only_meta(self.meta(), model), "backbone_fingerprint": getattr(model, FINGERPRINT),
                "trained_tensors": names}
        backbone_of(model)[1].config.save_pretrained(folder)  # model_kind and the method's dispatch read it
        save_trained_only(model, folder, self.tokenizer, meta, names=names)

    def save_merged(self, model: nn.Module, folder: str | Path) -> None:
        """The wrapped method's ordinary full checkpoint (``adapter: none``) of ``model``, adapters merged."""
        self.inner.save(merged(model), folder)


def with_adapter(method: Method, spec: MethodSpec) -> Method:
    """``method`` as ``spec.adapter`` asks: itself, or wrapped in ``LoraMethod``."""
    if spec.adapter == "none":
        return method
    if spec.adapter != "lora":
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {spec.adapter!r}")
    if trains_only_a_prompt(spec.method, spec.freeze_backbone):
        raise ValueError(f"adapter: lora: method {spec.method!r} trains only a prompt on a frozen backbone"
                         + (" (freeze_backbone: true)" if spec.method in SOFT_PROMPT_METHODS else "")
                         + "; LoRA adapts a backbone that trains")
    return LoraMethod(method, spec)


def inner_spec(spec: MethodSpec) -> MethodSpec:
    """The wrapped method's spec: the same settings without the adapter (what its own checkpoint records)."""
    return dataclasses.replace(spec, adapter="none")
