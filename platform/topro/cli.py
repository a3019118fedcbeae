"""The ``topro`` command: train, evaluate (and the Ray-backed commands as they land)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from topro.config import ConfigError, TrainConfig, load_config


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one model (single process, or Ray Train with --workers/--strategy)",
                       description="Train on the task's English train split, select on English dev. "
                                   "Overrides are key=value pairs of TrainConfig fields, e.g. learning_rate=3e-5.")
    p.add_argument("--config", required=True, help="YAML training config (configs/train/*.yaml)")
    p.add_argument("--data-dir", help="data folder (default $TOPRO_DATA_DIR)")
    p.add_argument("--output", help="run folder (writes checkpoint/ and metrics.json)")
    p.add_argument("--workers", type=int, help="Ray Train workers (same as workers=N)")
    p.add_argument("--strategy", choices=["local", "ddp", "deepspeed"], help="same as strategy=...")
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    cfg = load_config(TrainConfig, args.config, args.overrides, data_dir=args.data_dir, output_dir=args.output,
                      workers=args.workers, strategy=args.strategy)
    train_and_evaluate(cfg, address=args.address)
    return 0


def train_and_evaluate(cfg: TrainConfig, address: str | None = None, on_ray: bool | None = None) -> dict:
    """Train (in-process, or on Ray Train when ``on_ray`` or the config asks for workers), print the
    best score, then evaluate ``eval_langs`` on the best checkpoint. Also the body of ``jobs/train.py``."""
    from topro.precheck import check_train

    check_train(cfg)  # data, languages, model, names: seconds, before Ray starts or a model loads
    if on_ray is None:
        on_ray = cfg.strategy != "local" or cfg.workers > 1
    if not on_ray:
        from topro.train import train

        summary = train(cfg)
    else:
        from topro.cluster.trainer import train_on_ray  # the only path that needs Ray

        summary = train_on_ray(cfg, address=address)
    metric = f"best_dev_{summary['selection_metric']}"
    print(f"best {metric}: {summary[metric]:.4f} (step {summary['best_step']}); "
          f"checkpoint: {summary['checkpoint']}")
    if cfg.eval_langs:
        from topro.evaluate import evaluate_checkpoint, write_results

        record = evaluate_checkpoint(summary["checkpoint"], cfg.eval_langs, data_dir=cfg.data_dir,
                                     max_sentences=cfg.max_eval_sentences, viterbi=cfg.viterbi,
                                     device=cfg.device, dtype=cfg.dtype, progress=cfg.progress)
        record["selection_metric"] = summary["selection_metric"]
        path = write_results(Path(cfg.output_dir) / "eval.json", record)
        print(format_table(record))
        print(f"per-language results: {path}")
    return summary


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="zero-shot evaluation of a checkpoint on many languages")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (RUN/checkpoint)")
    p.add_argument("--task", help="task name (default: the checkpoint's)")
    p.add_argument("--langs", default="all", help="comma-separated languages, or 'all' (default)")
    p.add_argument("--data-dir", help="data folder (default $TOPRO_DATA_DIR)")
    p.add_argument("--split", choices=["dev", "test"],
                   help="split scored in each language (default: the task's final split where it is at hand, "
                        "test for UDPOS, dev for PAN-X; dev otherwise)")
    p.add_argument("--max-sentences", type=int, help="first N sentences per language")
    p.add_argument("--no-viterbi", action="store_true", help="skip valid-IOB2 decoding for span tasks")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--parallel", action="store_true", help="one Ray task per language")
    p.add_argument("--address", help="Ray cluster address for --parallel")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from topro.precheck import check_evaluate, checkpoint_meta

    if args.split is None:
        from topro.data.loading import default_split

        task_name = args.task or checkpoint_meta(args.checkpoint).get("task") or "udpos"
        args.split = default_split(task_name, args.data_dir, [x for x in args.langs.split(",") if x])
    args.langs = ",".join(check_evaluate(args.checkpoint, args.langs, task=args.task, split=args.split,
                                         data_dir=args.data_dir, max_sentences=args.max_sentences))
    from topro.evaluate import evaluate_checkpoint, write_results  # imports torch: after the checks

    kwargs = dict(task=args.task, data_dir=args.data_dir, split=args.split, max_sentences=args.max_sentences,
                  viterbi=not args.no_viterbi, device=args.device)
    if args.parallel:
        from topro.cluster.evaluation import evaluate_checkpoint_parallel

        record = evaluate_checkpoint_parallel(args.checkpoint, args.langs, address=args.address, **kwargs)
    else:
        record = evaluate_checkpoint(args.checkpoint, args.langs, **kwargs)
    write_results(args.output, record)
    print(format_table(record))
    print(f"per-language results: {args.output}")
    return 0


def format_table(record: dict) -> str:
    """A Markdown table of one results record: language, headline metric (and the other F1 mode for
    span tasks), sizes, truncation and the headline over the words the model saw."""
    metric = record["metric"]
    first = next(iter(record["languages"].values()), {})
    extra = [k for k in ("f1_strict",) if k in first]
    seen = f"{metric}_seen_words" if f"{metric}_seen_words" in first else None
    head = [metric, *extra, "accuracy"] if metric != "accuracy" else [metric, *extra]
    cols = head + ["sentences", "words", "truncated words"] + ([seen] if seen else [])
    rows = ["| lang | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for lang, r in record["languages"].items():
        cells = [f"{r[k]:.4f}" for k in head] + [str(r["n_sentences"]), str(r["n_words"]),
                                                 str(r["n_truncated_words"])]
        if seen:
            cells.append(f"{r[seen]:.4f}")
        rows.append(f"| {lang} | " + " | ".join(cells) + " |")
    avg = record["average"]
    cells = [f"{avg.get(k, float('nan')):.4f}" for k in head] + ["", "", ""] + (
        [f"{avg.get(seen, float('nan')):.4f}"] if seen else [])
    rows.append("| average | " + " | ".join(cells) + " |")
    if record.get("selection_metric"):
        rows.append(f"\nCheckpoint selected on English dev {record['selection_metric']}.")
    return "\n".join(rows)


COMMANDS = [_add_train, _add_evaluate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="topro", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    for name, module in (("sweep", "topro.cluster.sweep_cli"), ("report", "topro.reports_cli"),
                         ("compare", "topro.compare_cli"),
                         ("serve", "topro.serving_cli"), ("eval-llm", "topro.llm.cli")):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ModuleNotFoundError as err:
            if err.name and err.name.split(".")[0] == "topro":
                raise  # our own module is broken or missing: fail loudly, never drop the command
            _add_unavailable(sub, name, err)  # a third-party dependency is not installed
            continue
        mod.add_parser(sub)
    return parser


def _add_unavailable(sub, name: str, err: ModuleNotFoundError) -> None:
    """A command whose optional dependency is missing: listed in --help with the
    reason, and running it says what to install."""
    reason = f"needs the Python package {err.name!r}, which is not installed"
    p = sub.add_parser(name, help=f"(unavailable: {reason})", add_help=False)
    p.add_argument("rest", nargs="*")

    def unavailable(args) -> int:
        print(f"topro {name}: error: this command {reason} ({err})", file=sys.stderr)
        return 2

    p.set_defaults(func=unavailable)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"topro {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
