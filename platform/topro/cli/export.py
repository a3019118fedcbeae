"""``topro export --merge CHECKPOINT --output DIR``: a LoRA checkpoint as a full checkpoint for serving.

A LoRA checkpoint (``adapter: lora``) holds only its adapters and trained head parts and loads its backbone
by fingerprint. Merging folds each adapter into its base weight (``W + lora_alpha / lora_r x B A``) and writes
the method's ordinary full checkpoint (``adapter: none``), which ``topro evaluate``, ``topro serve`` and the
registry load with no backbone to find and no adapter arithmetic per request.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from topro.cli.flags import add_config_arguments, add_config_flags, flag_values
from topro.config import ConfigError, load_config


@dataclass
class ExportConfig:
    """One export: which checkpoint, where the merged one goes."""

    merge: str | None = None
    """A LoRA checkpoint folder (``RUN/checkpoint`` of a run with ``adapter: lora``) whose adapters are merged
    into its backbone. Required."""
    output: str | None = None
    """Folder the merged full checkpoint is written to (must be empty or absent unless ``overwrite``). Required."""
    overwrite: bool = False
    """Write into ``output`` even if it holds files."""

    def problems(self) -> list[tuple[str, str]]:
        return [(name, f"required (--{name} or {name}=...)") for name in ("merge", "output")
                if not getattr(self, name)]


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="merge a LoRA checkpoint's adapters into a full checkpoint for serving",
                       description="Write a full checkpoint from a LoRA one (adapters merged into the base "
                                   "weights). Settings are ExportConfig fields: from --config FILE, key=value "
                                   "overrides, or the flags below.")
    add_config_arguments(p, ExportConfig, "an export")
    add_config_flags(p, ExportConfig)
    p.set_defaults(func=cmd_export)


def config_from_args(args) -> ExportConfig:
    return load_config(ExportConfig, args.config, args.overrides, **flag_values(args, ExportConfig))


def cmd_export(args) -> int:
    cfg = config_from_args(args)
    folder = export_merged(cfg)
    print(f"merged checkpoint: {folder}")
    return 0


def export_merged(cfg: ExportConfig) -> Path:
    """Check, load, merge and write; returns the output folder."""
    from topro.precheck import checkpoint_meta

    meta = checkpoint_meta(cfg.merge)
    if meta.get("adapter", "none") != "lora":
        raise ConfigError(f"merge: checkpoint {cfg.merge!r} has no LoRA adapters (adapter: "
                          f"{meta.get('adapter', 'none')!r}); it is a full checkpoint already")
    out = Path(cfg.output).expanduser()
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not cfg.overwrite):
        raise ConfigError(f"output {cfg.output!r}: exists and is not an empty folder (choose another, or "
                          f"pass --overwrite)")
    if out.resolve() == Path(cfg.merge).expanduser().resolve():
        raise ConfigError(f"output {cfg.output!r}: is the checkpoint being merged")
    from topro.methods import load_checkpoint

    method, model = load_checkpoint(cfg.merge)
    out.mkdir(parents=True, exist_ok=True)
    method.save_merged(model, out)
    return out
