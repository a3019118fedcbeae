"""``topro train`` (and ``jobs/train.py``): train one model, then evaluate ``eval_langs`` on its best checkpoint."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from topro.cli.flags import add_config_arguments, add_config_flags, flag_values
from topro.config import TrainConfig, load_config

log = logging.getLogger("topro")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train one model (single process, or Ray Train with --workers/--strategy)",
                       description="Train on the task's English train split, select on English dev. "
                                   "Overrides are key=value pairs of TrainConfig fields, e.g. learning_rate=3e-5.")
    add_config_arguments(p, TrainConfig, "configs/train/*.yaml", required=True)
    add_config_flags(p, TrainConfig, ["data_dir", "output_dir", "workers", "strategy"],
                     flag_names={"output_dir": "--output"})
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--on-ray", action="store_true", help="always on Ray Train (strategy local becomes DDP), and "
                                                        "print the summary as JSON: what jobs/train.py runs")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    cfg = load_config(TrainConfig, args.config, args.overrides, **flag_values(args, TrainConfig))
    summary = train_and_evaluate(cfg, address=args.address, on_ray=True if args.on_ray else None)
    if args.on_ray:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "history")}, indent=2))
    return 0


def train_and_evaluate(cfg: TrainConfig, address: str | None = None, on_ray: bool | None = None) -> dict:
    """Train (in-process, or on Ray Train when ``on_ray`` or the config asks for workers), print the
    best score, then evaluate ``eval_langs`` on the best checkpoint. Also the body of ``jobs/train.py``.

    One writer per run: a second ``topro train`` on the same output folder is refused (``RunLocked``)."""
    from topro.atomic import RunLock
    from topro.precheck import check_train

    check_train(cfg)  # data, languages, model, names: seconds, before Ray starts or a model loads
    if on_ray is None:
        on_ray = cfg.strategy != "local" or cfg.workers > 1
    with RunLock(cfg.output_dir, "topro train"):
        return train_locked(cfg, address, on_ray)


def train_locked(cfg: TrainConfig, address: str | None, on_ray: bool) -> dict:
    if not on_ray:
        from topro.interrupts import StopRequests
        from topro.train import train

        # SIGTERM/SIGINT: the loop saves output_dir/state and raises Interrupted (exit 128 + signal).
        with StopRequests() as stops:
            summary = train(cfg)
        if stops.requested:  # the signal came during the last evaluation: the run is complete
            raise stops.interrupted(f"training finished ({cfg.output_dir}/metrics.json, {cfg.output_dir}/checkpoint); "
                                    f"eval_langs not evaluated: run topro evaluate --checkpoint "
                                    f"{cfg.output_dir}/checkpoint")
    else:
        from topro.cluster.trainer import train_on_ray  # the only path that needs Ray

        summary = train_on_ray(cfg, address=address)
    selection = summary["selection_metric"]
    best = summary[f"best_dev_{selection}"]
    print(f"best English dev {selection}: {best:.4f} (step {summary['best_step']}); "
          f"checkpoint: {summary['checkpoint']}")
    tag, baseline = majority_baseline(cfg, selection)
    if not best > baseline + 1e-9:
        from topro.data import get_task

        unit = "text labelled" if get_task(cfg.task).kind == "classification" else "word tagged"
        log.warning("the best English dev %s (%.4f) never beat the majority-class baseline (%.4f: every %s "
                    "%s): the model has not learnt the task. Try more steps (epochs, max_train_sentences), "
                    "a higher learning_rate for the random 'tiny' model (about 1e-3 to 3e-3) or a lower one for a "
                    "pretrained model (2e-5 to 1e-4), or a pretrained model", selection, best, baseline, unit, tag)
    if cfg.eval_langs:
        from topro.cli.evaluate import format_table
        from topro.evaluate import evaluate_checkpoint, write_results

        record = evaluate_checkpoint(summary["checkpoint"], cfg.eval_langs, data_dir=cfg.data_dir,
                                     max_sentences=cfg.max_sentences, viterbi=cfg.viterbi,
                                     device=cfg.device, dtype=cfg.dtype, progress=cfg.progress,
                                     max_tokens_per_batch=cfg.eval_langs_max_tokens_per_batch())
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

    from topro.unseen import expand_unseen_labels

    task = get_task(cfg.task)
    unseen = set(expand_unseen_labels(task, cfg.unseen_labels))
    train = load_split(task, cfg.train_lang, "train", cfg.data_dir, limit=cfg.max_train_sentences)
    dev = load_split(task, cfg.train_lang, "dev", cfg.data_dir, limit=cfg.max_dev_sentences)
    tag = Counter(t for s in train for t in s.tags if t not in unseen).most_common(1)[0][0]
    # Scored as the dev selection is (evaluate.seen_label_view): unseen gold words dropped, or O in spans.
    gold = [["O" if t in unseen else t for t in s.tags] if task.scheme == "iob2"
            else [t for t in s.tags if t not in unseen] for s in dev]
    scores = score_task(task, gold, [[tag] * len(g) for g in gold])
    if selection == "viterbi_f1":
        selection = "f1"  # all-majority is a valid IOB2 sequence: Viterbi leaves it as it is
    return tag, float(metric_value(scores, selection))


