"""The ``topro`` command: train, evaluate (and the Ray-backed commands as they land)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from topro.config import EVAL_DTYPES, ConfigError, TrainConfig, load_config

log = logging.getLogger("topro")


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
    selection = summary["selection_metric"]
    best = summary[f"best_dev_{selection}"]
    print(f"best English dev {selection}: {best:.4f} (step {summary['best_step']}); "
          f"checkpoint: {summary['checkpoint']}")
    tag, baseline = majority_baseline(cfg, selection)
    if not best > baseline + 1e-9:
        log.warning("the best English dev %s (%.4f) never beat the majority-class baseline (%.4f: every word "
                    "tagged %s): the model has not learnt the task. Try more steps (epochs, max_train_sentences), "
                    "a higher learning_rate for the random 'tiny' model (about 1e-3 to 3e-3) or a lower one for a "
                    "pretrained model (2e-5 to 1e-4), or a pretrained model", selection, best, baseline, tag)
    if cfg.eval_langs:
        from topro.evaluate import evaluate_checkpoint, write_results

        record = evaluate_checkpoint(summary["checkpoint"], cfg.eval_langs, data_dir=cfg.data_dir,
                                     max_sentences=cfg.max_eval_sentences, viterbi=cfg.viterbi,
                                     device=cfg.device, dtype=cfg.dtype, progress=cfg.progress)
        record["selection_metric"] = summary["selection_metric"]
        record["selection"] = summary.get("selection", "best")
        if summary.get("averaged_steps"):
            record["averaged_steps"] = summary["averaged_steps"]
        path = write_results(Path(cfg.output_dir) / "eval.json", record)
        print(format_table(record))
        print(f"per-language results: {path}")
    return summary


def majority_baseline(cfg: TrainConfig, selection: str) -> tuple[str, float]:
    """The English dev score of tagging every word with the most frequent training tag (what a model that
    learnt nothing reaches: ``O`` and F1 0 for PAN-X, ``NOUN`` and its share of words for UDPOS)."""
    from collections import Counter

    from topro.data import get_task, load_split
    from topro.metrics import metric_value, score_task

    task = get_task(cfg.task)
    train = load_split(task, cfg.train_lang, "train", cfg.data_dir, limit=cfg.max_train_sentences)
    dev = load_split(task, cfg.train_lang, "dev", cfg.data_dir, limit=cfg.max_dev_sentences)
    tag = Counter(t for s in train for t in s.tags).most_common(1)[0][0]
    scores = score_task(task, [s.tags for s in dev], [[tag] * len(s) for s in dev])
    if selection == "viterbi_f1":
        selection = "f1"  # all-majority is a valid IOB2 sequence: Viterbi leaves it as it is
    return tag, float(metric_value(scores, selection))


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="zero-shot evaluation of a checkpoint on many languages")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (RUN/checkpoint), or a registered model models:/<name>@<alias> "
                        "(or models:/<name>/<version>) as `topro serve` takes")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default $MLFLOW_TRACKING_URI, else "
                                          "sqlite:///mlflow.db in the working directory)")
    p.add_argument("--task", help="task name (default: the checkpoint's)")
    p.add_argument("--langs", default="all", help="comma-separated languages, or 'all' (default)")
    p.add_argument("--data-dir", help="data folder (default $TOPRO_DATA_DIR)")
    p.add_argument("--split", choices=["dev", "test"],
                   help="split scored in each language (default: the task's final split where it is at hand, "
                        "test for UDPOS, dev for PAN-X; dev otherwise)")
    p.add_argument("--max-sentences", type=int, help="first N sentences per language")
    p.add_argument("--no-viterbi", action="store_true", help="skip valid-IOB2 decoding for span tasks")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=EVAL_DTYPES,
                   help="evaluation precision; fp64 is a reference precision whose results agree across "
                        "processes, CPUs and thread counts (slow)")
    p.add_argument("--parallel", action="store_true", help="one Ray task per language")
    p.add_argument("--address", help="Ray cluster address for --parallel")
    p.add_argument("--output", required=True, help="JSON file to write (an existing file that an earlier "
                                                   "`topro evaluate` of the same checkpoint did not write, e.g. "
                                                   "the eval.json of `topro train`, is kept unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --output whoever wrote it")
    p.set_defaults(func=cmd_evaluate)


EVALUATE_WRITER = "topro evaluate"


def check_output_is_ours(output: str, source: str, overwrite: bool) -> None:
    """Refuse to replace a results file that this command did not write for this checkpoint."""
    path = Path(output)
    if overwrite or not path.exists():
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = None
    if isinstance(previous, dict) and previous.get("written_by") == EVALUATE_WRITER \
            and previous.get("source") == source:
        return  # the same evaluation run again
    raise ConfigError(f"--output {output}: exists and was not written by `topro evaluate` of {source} "
                      f"(e.g. `topro train` wrote it); choose another --output, or pass --overwrite")


def resolve_evaluate_checkpoint(checkpoint: str, tracking_uri: str | None) -> str:
    """A local folder for a checkpoint folder or a ``models:/`` / ``runs:/`` URI (downloaded once, cached)."""
    from topro.tracking import is_registry_uri

    if not is_registry_uri(checkpoint):
        return checkpoint
    from topro import tracking

    uri = tracking.configure(tracking_uri)
    try:
        return str(tracking.resolve_checkpoint(checkpoint))
    except Exception as err:  # MlflowException: unknown name, alias or version
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--checkpoint {checkpoint}: not found in the MLflow registry at {uri} ({message})") \
            from None


def cmd_evaluate(args) -> int:
    from topro.precheck import check_evaluate, checkpoint_meta

    check_output_is_ours(args.output, args.checkpoint, args.overwrite)
    source = args.checkpoint
    args.checkpoint = resolve_evaluate_checkpoint(args.checkpoint, args.tracking_uri)
    if args.split is None:
        from topro.data.loading import default_split

        task_name = args.task or checkpoint_meta(args.checkpoint).get("task") or "udpos"
        args.split = default_split(task_name, args.data_dir, [x for x in args.langs.split(",") if x])
    args.langs = ",".join(check_evaluate(args.checkpoint, args.langs, task=args.task, split=args.split,
                                         data_dir=args.data_dir, max_sentences=args.max_sentences))
    from topro.evaluate import evaluate_checkpoint, write_results  # imports torch: after the checks

    kwargs = dict(task=args.task, data_dir=args.data_dir, split=args.split, max_sentences=args.max_sentences,
                  viterbi=not args.no_viterbi, device=args.device, dtype=args.dtype)
    if args.parallel:
        from topro.cluster.evaluation import evaluate_checkpoint_parallel

        record = evaluate_checkpoint_parallel(args.checkpoint, args.langs, address=args.address, **kwargs)
    else:
        record = evaluate_checkpoint(args.checkpoint, args.langs, **kwargs)
    record.update(written_by=EVALUATE_WRITER, source=source)
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
    if record.get("averaged_steps"):
        rows.append(f"\nExported weights: {record['selection']}, the mean of the English-dev checkpoints of steps "
                    f"{record['averaged_steps']} (ranked by {record.get('selection_metric')}).")
    elif record.get("selection_metric"):
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
