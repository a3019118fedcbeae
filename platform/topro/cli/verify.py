"""``topro verify``: check a checkpoint's weight files against the sizes and sha256 that ``topro.json`` records."""
from __future__ import annotations

from dataclasses import dataclass

from topro.config import load_config


@dataclass
class VerifyConfig:
    """Which checkpoint to check, and how thoroughly."""

    checkpoint: str | None = None
    """Checkpoint folder (``RUN/checkpoint``) or a registered model ``models:/<name>@<alias>``. Required."""
    hashes: bool = True
    """Also compare each file's sha256 (reads every byte); ``false``: sizes only (instant)."""
    tracking_uri: str | None = None
    """MLflow tracking URI for ``models:/`` (default ``$MLFLOW_TRACKING_URI``)."""

    def problems(self) -> list[tuple[str, str]]:
        return [] if self.checkpoint else [("checkpoint", "required (CHECKPOINT or checkpoint=...)")]


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check a checkpoint's weight files against their recorded sizes and hashes",
                       description="Check every weight file of a checkpoint against the size and sha256 recorded "
                                   "in its topro.json. Settings are VerifyConfig fields: --config FILE, "
                                   "key=value overrides, or the flags below. Exit status 0: intact; 2: damaged.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder or models:/<name>@<alias>")
    p.add_argument("--config", help="YAML file of VerifyConfig fields")
    p.add_argument("--sizes-only", action="store_true", help="same as hashes=false")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/")
    p.add_argument("overrides", nargs="*", help="key=value overrides of VerifyConfig fields")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    # A bare key=value in the checkpoint position is an override.
    overrides = list(args.overrides)
    checkpoint = args.checkpoint
    if checkpoint and "=" in checkpoint and not checkpoint.startswith("models:/"):
        overrides.insert(0, checkpoint)
        checkpoint = None
    cfg = load_config(VerifyConfig, args.config, overrides, checkpoint=checkpoint,
                      hashes=False if args.sizes_only else None, tracking_uri=args.tracking_uri)
    return verify(cfg)


def verify(cfg: VerifyConfig) -> int:
    from topro.checkpoint_files import verify_checkpoint
    from topro.cli.evaluate import resolve_evaluate_checkpoint

    folder = resolve_evaluate_checkpoint(cfg.checkpoint, cfg.tracking_uri)
    print(verify_checkpoint(folder, hashes=cfg.hashes))
    return 0
