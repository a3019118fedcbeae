"""``topro verify``: check a checkpoint's weight files against the sizes and sha256 that ``topro.json`` records."""
from __future__ import annotations

from dataclasses import dataclass

from topro.cli.flags import add_config_arguments, add_config_flags, flag_values
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
    add_config_arguments(p, VerifyConfig, "a verification")
    add_config_flags(p, VerifyConfig, ["hashes", "tracking_uri"], flag_names={"hashes": "--sizes-only"})
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    # A bare key=value in the checkpoint position is an override.
    overrides = list(args.overrides)
    checkpoint = args.checkpoint
    if checkpoint and "=" in checkpoint and not checkpoint.startswith("models:/"):
        overrides.insert(0, checkpoint)
        checkpoint = None
    flags = {**flag_values(args, VerifyConfig), "checkpoint": checkpoint}
    cfg = load_config(VerifyConfig, args.config, overrides, **flags)
    return verify(cfg)


def verify(cfg: VerifyConfig) -> int:
    from topro.checkpoint_files import verify_checkpoint
    from topro.cli.evaluate import resolve_evaluate_checkpoint

    folder = resolve_evaluate_checkpoint(cfg.checkpoint, cfg.tracking_uri)
    print(verify_checkpoint(folder, hashes=cfg.hashes))
    return 0
