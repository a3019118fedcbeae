"""``topro report --sweep NAME|RUN_ID``: print a sweep's paper-style table and log it to its parent run.

The report itself is ``topro.sweep_report``: settings x languages (mean ± std over seeds) per task, the
combined per-language CSV, a heatmap and a bar chart by language family, logged under ``report/``.
"""
from __future__ import annotations

import sys
from pathlib import Path

from topro import atomic


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="paper-style table of a sweep (methods x languages, mean ± std over seeds)",
                       description="Build the report of a sweep from its MLflow runs: print it as Markdown and "
                                   "log it (with CSV, heatmap and bar chart) to the sweep's parent run.")
    p.add_argument("--sweep", required=True, help="sweep name (its latest parent run) or a parent run id")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--output", help="also write the Markdown to this file")
    p.add_argument("--out-dir", help="folder for report.md, per_language.csv and the plots "
                                     "(default outputs/reports/<sweep>)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from topro import tracking
    from topro.sweep_report import slug, sweep_report

    uri = tracking.configure(args.tracking_uri)
    out_dir = Path(args.out_dir or Path("outputs") / "reports" / slug(args.sweep).replace("/", "_"))
    table = sweep_report(args.sweep, log_artifacts=not args.no_log, out_dir=out_dir)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(args.output, table, "report_text")
    sys.stdout.write(table)
    written = sorted(out_dir.glob("*")) if out_dir.is_dir() else []
    if written:
        print(f"\nwrote {len(written)} files to {out_dir}/: " + ", ".join(p.name for p in written))
    if args.output:
        print(f"wrote the Markdown to {args.output}")
    if not args.no_log and written:
        print(f"logged them to the sweep's parent run (artifacts report/) at {uri}")
    return 0
