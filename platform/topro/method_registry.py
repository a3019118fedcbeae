"""Every method by name, with what the rest of topro asks about it; no torch, so configs and pre-checks read it.

One line per method: the class that implements it (an import path, loaded only when a run builds the
method) and its traits. ``config`` (which methods may pack prompts), ``precheck`` (which names exist),
``train`` (which methods record a template, which score with the pretrained MLM head) and
``docs/architecture.md`` read them here. Adding a method: its file in ``methods/``, one line below, its
test. A third-party method registers at run time with ``topro.methods.register_method`` (which adds a
line here too).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class MethodEntry:
    """A method's name, implementation and traits."""

    name: str
    """What ``method:`` says in a train config and ``topro.json`` records."""
    cls: str = ""
    """``module:Class`` of the implementation, built as ``Class(spec, tokenizer)``; empty for a method
    registered with a factory (``register_method``)."""
    seq2seq_cls: str | None = None
    """The implementation for encoder-decoder models (mT5), when the method has one."""
    causal_cls: str | None = None
    """The implementation for decoder-only LMs (Llama, Gemma, Qwen, BLOOM), when the method has one."""
    classification_cls: str | None = None
    """The implementation for a ``kind: classification`` task (one label per text) on a masked LM, when the
    method has one (``methods/classification.py``)."""
    prompted: bool = False
    """Asks a templated question per word, so a run records a template and a verbalizer."""
    packable: bool = False
    """Can pack a sentence's questions into one row (``prompt_packing`` other than ``per_word``; masked LMs)."""
    head: Literal["new", "pretrained_mlm"] = "new"
    """``pretrained_mlm``: scores label words with the pretrained masked-LM head (a run warns when the
    checkpoint lacks it); ``new``: a freshly initialised classification head."""
    trains: Literal["whole_model", "part"] = "whole_model"
    """``part``: trains a few tensors over a named backbone, and its checkpoint holds only those."""
    unseen_labels: bool = False
    """A label the training data never showed is still scored as its verbalizer's word under the pretrained
    head (a new head has only an untrained row for it): takes ``unseen_labels``; the others refuse it."""
    zero_step: bool = False
    """Takes ``epochs: 0``: scored with its prompt as initialised (RoSPrompt: NPPrompt-style zero-shot)."""

    def runs_on(self, backbone: str) -> bool:
        """Whether the method has a class for a ``masked``, ``causal`` or ``seq2seq`` backbone (its own class
        serves masked and seq2seq ones; a method registered by factory builds what it can)."""
        return backbone != "causal" or bool(self.causal_cls) or not self.cls

    def implementation(self, backbone: str | bool = "masked", task_kind: str = "tagging") -> Any:
        """The class for a ``masked``, ``causal`` or ``seq2seq`` backbone (``True``: seq2seq) and a task of
        ``task_kind``, imported now (this imports torch)."""
        backbone = {True: "seq2seq", False: "masked"}.get(backbone, backbone)
        if task_kind == "classification":
            return _load(self.classification_path(backbone))
        if not self.runs_on(backbone):
            raise ValueError(f"method {self.name!r} does not run on decoder-only LMs; those take "
                             f"{', '.join(methods_for(backbone))}")
        return _load({"seq2seq": self.seq2seq_cls, "causal": self.causal_cls}.get(backbone) or self.cls)

    def classification_path(self, backbone: str) -> str:
        """``classification_cls``, refused with the reason where there is none (another method, or a
        backbone other than a masked LM)."""
        if not self.classification_cls:
            raise ValueError(f"method {self.name!r} has no classification form; classification tasks take "
                             f"{', '.join(n for n, e in METHOD_REGISTRY.items() if e.classification_cls)}")
        if backbone != "masked":
            raise ValueError(f"method {self.name!r} on a classification task runs on masked LMs only; this "
                             f"backbone is {backbone}")
        return self.classification_cls


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


METHOD_REGISTRY: dict[str, MethodEntry] = {entry.name: entry for entry in (
    MethodEntry("vanilla", "topro.methods.vanilla:Vanilla", causal_cls="topro.methods.vanilla_causal:CausalVanilla",
                classification_cls="topro.methods.classification:TextVanilla"),
    MethodEntry("topro", "topro.methods.topro_mlm:ToProMLM", seq2seq_cls="topro.methods.topro_seq2seq:ToProSeq2Seq",
                causal_cls="topro.methods.topro_causal:ToProCausal", prompted=True, packable=True, head="pretrained_mlm", unseen_labels=True,
                classification_cls="topro.methods.classification:TextCloze"),
    MethodEntry("prompt_tuning", "topro.methods.prompt_tuning:PromptTuning",
                causal_cls="topro.methods.prompt_tuning:CausalPromptTuning", trains="part"),
    MethodEntry("topro_soft", "topro.methods.topro_soft:ToProSoft",
                causal_cls="topro.methods.topro_soft_causal:CausalToProSoft", prompted=True, packable=True,
                head="pretrained_mlm", trains="part", unseen_labels=True,
                classification_cls="topro.methods.classification:TextClozeSoft"),
    MethodEntry("rosprompt", "topro.methods.rosprompt:RoSPrompt",
                causal_cls="topro.methods.topro_soft_causal:CausalRoSPrompt", prompted=True, packable=True,
                head="pretrained_mlm",
                trains="part", unseen_labels=True, zero_step=True,
                classification_cls="topro.methods.classification:TextClozeRoSPrompt"),
)}


def method_entry(name: str) -> MethodEntry:
    """The entry of ``name``; a method registered only by factory has the default traits."""
    return METHOD_REGISTRY.get(name) or MethodEntry(name)


def method_names() -> list[str]:
    return list(METHOD_REGISTRY)


def methods_for(backbone: str) -> list[str]:
    """The methods that run on a ``masked``, ``causal`` or ``seq2seq`` backbone."""
    return [name for name, entry in METHOD_REGISTRY.items() if entry.runs_on(backbone)]


def packable_methods() -> list[str]:
    return [name for name, entry in METHOD_REGISTRY.items() if entry.packable]


TRAIT_COLUMNS = ("prompted", "packable", "head", "trains", "unseen_labels", "zero_step")


def traits_table() -> str:
    """The registry as the Markdown table ``docs/architecture.md`` shows (``tests/test_method_registry.py``
    keeps the two the same)."""
    def cell(value: Any) -> str:
        return "yes" if value is True else "no" if value is False else f"`{value}`"

    rows = ["| method | class | " + " | ".join(TRAIT_COLUMNS) + " |", "| --- " * (len(TRAIT_COLUMNS) + 2) + "|"]
    for entry in METHOD_REGISTRY.values():
        classes = " / ".join(f"`{c.removeprefix('topro.methods.').replace(':', '.')}`"
                             for c in (entry.cls, entry.seq2seq_cls, entry.causal_cls, entry.classification_cls) if c)
        rows.append(f"| `{entry.name}` | {classes} | " + " | ".join(cell(getattr(entry, t)) for t in TRAIT_COLUMNS) + " |")
    return "\n".join(rows)
