"""What the methods that save a whole Hugging Face model share: the label set, the tokenizer and its pair
layout, loading with a ``transformers`` Auto class, and a checkpoint of safetensors weights beside the
tokenizer and ``topro.json`` (vanilla, ToPro for masked LMs and for seq2seq LMs).

Methods that save only a few trained tensors over a named backbone (``prompt_tuning``, ``topro_soft``)
write their checkpoints through ``trained_only`` instead.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from topro.methods.base import META_FILE, MethodSpec, pair_layout


class WholeModelMethod:
    """Base of a method whose checkpoint is the whole model; subclasses set ``name`` and ``auto_class``."""

    name: str
    auto_class: str
    """The ``transformers`` Auto class the model is built and loaded with."""

    def __init__(self, spec: MethodSpec, tokenizer):
        self.spec = spec
        self.labels = list(spec.labels)
        self.label_index = {label: i for i, label in enumerate(self.labels)}
        self.tokenizer = tokenizer
        self.layout = pair_layout(tokenizer)

    def auto_model(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def build_model(self, model_path: str) -> torch.nn.Module:
        """A trainable model initialised from a pretrained folder or id (noting the parts it lacked, which
        LoRA trains whole)."""
        from topro.methods.trained_only import from_pretrained_noting_fresh

        return from_pretrained_noting_fresh(self.auto_model(), model_path)

    def load_model(self, checkpoint: str | Path) -> torch.nn.Module:
        """The model ``save`` wrote (safetensors only: no pickle is ever loaded)."""
        return self.auto_model().from_pretrained(checkpoint, use_safetensors=True)

    def meta(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this method (written to ``topro.json``)."""
        return self.spec.meta()

    def save(self, model: torch.nn.Module, folder: str | Path) -> None:
        folder = Path(folder)
        model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        (folder / META_FILE).write_text(json.dumps(self.meta(), indent=2))
