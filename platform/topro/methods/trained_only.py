"""Checkpoints that hold only what a method trains, plus a reference to its frozen backbone.

Prompt-Tuning and soft ToPro train a few hundred thousand parameters on top of
a backbone of tens or hundreds of millions. Their checkpoints store the trained
tensors (``trained.safetensors``), the tokenizer and ``topro.json``, which names
the backbone (``base_model``, ``base_model_path``) and carries a fingerprint of
its weights, so loading onto a different backbone fails loudly instead of
predicting garbage.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from topro.methods.base import META_FILE, MethodSpec, count_parameters

TRAINED_FILE = "trained.safetensors"


def trained_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def from_pretrained_noting_fresh(model_class, path: str, **kwargs) -> torch.nn.Module:
    """``model_class.from_pretrained(path)`` with ``fresh_parameters(model)`` naming the parameters the
    checkpoint did not provide (randomly initialised, e.g. the MLM head of an encoder saved without one)."""
    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = set(info.get("missing_keys", ()))
    model.topro_fresh_parameters = [name for name, _ in model.named_parameters() if name in missing]
    return model


def fresh_parameters(model: torch.nn.Module) -> list[str]:
    return list(getattr(model, "topro_fresh_parameters", []))


def backbone_fingerprint(backbone: torch.nn.Module) -> str:
    """A cheap digest of a backbone's architecture and a sample of its pretrained weights (first, middle
    and last tensor that the checkpoint provided; freshly initialised ones differ on every load)."""
    cfg = backbone.config
    digest = hashlib.sha1(json.dumps([cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers]).encode())
    fresh = set(fresh_parameters(backbone))
    named = [(n, p) for n, p in backbone.named_parameters() if n not in fresh]
    for name, p in (named[0], named[len(named) // 2], named[-1]):
        digest.update(name.encode())
        digest.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def trained_only_meta(meta: dict[str, Any], model: torch.nn.Module,
                      backbone: torch.nn.Module | None = None) -> dict[str, Any]:
    """``meta`` plus the parameter counts of ``model`` and, when the backbone stays out of the checkpoint,
    its fingerprint."""
    trainable, total = count_parameters(model)
    out = {**meta, "n_trainable_params": trainable, "n_total_params": total}
    if backbone is not None:
        out["backbone_fingerprint"] = backbone_fingerprint(backbone)
    return out


def save_trained_only(model: torch.nn.Module, folder: str | Path, tokenizer, meta: dict[str, Any],
                      names: list[str] | None = None) -> None:
    """``trained.safetensors`` with ``names`` (default: every parameter that requires grad), tokenizer, meta."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    names = trained_names(model) if names is None else names
    save_file({n: params[n].detach().contiguous().cpu() for n in names}, folder / TRAINED_FILE,
              metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def load_trained_only(model: torch.nn.Module, folder: str | Path, names: list[str] | None = None) -> torch.nn.Module:
    """Load ``trained.safetensors`` into ``model``; the file must hold exactly ``names`` (default: trainable ones)."""
    from safetensors.torch import load_file

    path = Path(folder) / TRAINED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {TRAINED_FILE} (not a checkpoint of a prompt-tuned method)")
    state = load_file(path)
    expected = set(trained_names(model) if names is None else names)
    if set(state) != expected:
        raise ValueError(f"{path}: tensors do not match the method's trained parameters: "
                         f"missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}")
    model.load_state_dict(state, strict=False)
    return model


def backbone_candidates(spec: MethodSpec) -> list[str]:
    """Where a checkpoint's backbone may be: the folder trained on, then ``base_model`` (folder, hub id or ``tiny``)."""
    out = []
    path = spec.base_model_path
    if path:
        out.append(str(path))
    if spec.base_model and spec.base_model not in out:
        out.append(spec.base_model)
    return out


def load_backbone(spec: MethodSpec, checkpoint: str | Path, loader: Callable[[str], torch.nn.Module],
                  fingerprint: str | None = None,
                  fingerprint_of: Callable[[torch.nn.Module], str] = backbone_fingerprint) -> torch.nn.Module:
    """The backbone a trained-only checkpoint refers to, checked against its fingerprint (``fingerprint_of``
    what ``loader`` returns; a model that wraps its backbone gives the backbone's)."""
    from topro.models import TINY, resolve_model_path

    tried = []
    for candidate in backbone_candidates(spec):
        if candidate == TINY:
            candidate = resolve_model_path(TINY, spec.task)  # deterministic, rebuilt from the task's data
        folder = Path(candidate).expanduser()
        if not folder.is_dir() and not _looks_like_hub_id(candidate):
            tried.append(f"{candidate} (no such folder)")
            continue
        try:
            backbone = loader(str(folder) if folder.is_dir() else candidate)
        except OSError as err:
            tried.append(f"{candidate} ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
            continue
        found = fingerprint_of(backbone)
        if fingerprint and found != fingerprint:
            tried.append(f"{candidate} (a different backbone: fingerprint {found}, checkpoint expects {fingerprint})")
            continue
        return backbone
    raise FileNotFoundError(
        f"checkpoint {checkpoint} stores only its trained weights; its backbone could not be loaded. Tried: "
        + "; ".join(tried or ["nothing (no base_model_path or base_model in topro.json)"])
        + f". Make the backbone available there or point base_model_path in {Path(checkpoint) / META_FILE} at it.")


def load_soft_prompt_checkpoint(spec: MethodSpec, checkpoint: str | Path, loader: Callable[[str], torch.nn.Module],
                                build: Callable[[torch.nn.Module, torch.Tensor], torch.nn.Module], n_slots: int,
                                default_names: list[str]) -> torch.nn.Module:
    """A soft-prompt checkpoint's model (masked and decoder-only alike): its backbone (saved whole beside the
    prompt when it was fine-tuned, else found by fingerprint), ``build(backbone, zero prompt)`` around it,
    then the trained tensors (``default_names`` for checkpoints that predate ``trained_tensors``)."""
    meta = read_meta(checkpoint)
    if meta.get("backbone_in_checkpoint"):
        backbone = loader(str(checkpoint))
    else:
        backbone = load_backbone(spec, checkpoint, loader, meta.get("backbone_fingerprint"))
    model = build(backbone, torch.zeros(n_slots, backbone.config.hidden_size))
    return load_trained_only(model, checkpoint, names=meta.get("trained_tensors", default_names))


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def read_meta(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / META_FILE).read_text())
