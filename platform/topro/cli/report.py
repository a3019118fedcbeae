"""``topro report --sweep NAME|RUN_ID``: print a sweep's paper-style table and log it to its parent run.

The report itself is ``topro.sweep_report``: settings x languages (mean ± std over seeds) per task, the
combined per-language CSV, a heatmap and a bar chart by language family, logged under ``report/``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from topro.cli.flags import add_config_arguments, add_config_flags, flag_values
from topro import atomic
from topro.config import load_config


@dataclass
class ReportConfig:
    """One sweep's report: which sweep, where its runs are, where the report goes."""

    sweep: str | None = None
    """Sweep name (its latest parent run) or a parent run id. Required."""
    tracking_uri: str | None = None
    """MLflow tracking URI (default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``)."""
    output: str | None = None
    """Also write the Markdown to this file."""
    out_dir: str | None = None
    """Folder for report.md, per_language.csv and the plots (default ``outputs/reports/<sweep>``)."""
    log: bool = True
    """Log the report (Markdown, CSV, plots) to the sweep's parent run under ``report/``."""

    def problems(self) -> list[tuple[str, str]]:
        return [] if self.sweep else [("sweep", "required (--sweep or sweep=...)")]


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="paper-style table of a sweep (methods x languages, mean ± std over seeds)",
                       description="Build the report of a sweep from its MLflow runs: print it as Markdown and "
                                   "log it (with CSV, heatmap and bar chart) to the sweep's parent run.")
    add_config_arguments(p, ReportConfig, "the flags below, in a file")
    add_config_flags(p, ReportConfig)
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    return report(load_config(ReportConfig, args.config, args.overrides, **flag_values(args, ReportConfig)))


def report(cfg: ReportConfig) -> int:
    from topro import tracking
    from topro.sweep_report import slug, sweep_report

    uri = tracking.configure(cfg.tracking_uri)
    out_dir = Path(cfg.out_dir or Path("outputs") / "reports" / slug(cfg.sweep).replace("/", "_"))
    table = sweep_report(cfg.sweep, log_artifacts=cfg.log, out_dir=out_dir)
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(cfg.output, table, "report_text")
    sys.stdout.write(table)
    written = sorted(out_dir.glob("*")) if out_dir.is_dir() else []
    if written:
        print(f"\nwrote {len(written)} files to {out_dir}/: " + ", ".join(p.name for p in written))
    if cfg.output:
        print(f"wrote the Markdown to {cfg.output}")
    if cfg.log and written:
        print(f"logged them to the sweep's parent run (artifacts report/) at {uri}")
    return 0
