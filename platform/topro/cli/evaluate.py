"""``topro evaluate``: zero-shot evaluation of a checkpoint (or a registered model) on many languages."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from topro.batching import EVALUATION_MAX_TOKENS_PER_BATCH
from topro.cli.flags import add_config_arguments, add_config_flags, flag_values
from topro.config import EVAL_DTYPES, ConfigError, check_ranges, load_config
from topro.config import _at_least as at_least

EvalDtype = Literal[EVAL_DTYPES]  # type: ignore[valid-type]


@dataclass
class EvaluateConfig:
    """One evaluation: which checkpoint, which languages and split, where the results go."""

    checkpoint: str | None = None
    """Checkpoint folder (``RUN/checkpoint``), or a registered model ``models:/<name>@<alias>`` (or
    ``models:/<name>/<version>``) as ``topro serve`` takes. Required."""
    output: str | None = None
    """JSON file to write, after every language: until the last it says ``partial: true``, and the same
    command run again keeps the languages it holds. An existing file that an earlier ``topro evaluate`` of
    the same checkpoint did not write (e.g. the ``eval.json`` of ``topro train``) is kept unless
    ``overwrite``. Required."""
    overwrite: bool = False
    """Replace ``output`` whoever wrote it; a stopped evaluation there of other settings is started over (one
    of the same settings is still resumed: its scores would be the same)."""
    tracking_uri: str | None = None
    """MLflow tracking URI for ``models:/`` (default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in
    the working directory)."""
    task: str | None = None
    """Task name (default: the checkpoint's)."""
    langs: str = "all"
    """Comma-separated languages, or ``all``."""
    data_dir: str | None = None
    """Data folder (default ``$TOPRO_DATA_DIR``)."""
    split: Literal["dev", "test"] | None = None
    """Split scored in each language (default: the task's final split where it is at hand, test for UDPOS,
    dev for PAN-X; dev otherwise)."""
    max_sentences: int | None = None
    """First N sentences per language (``None``: all)."""
    viterbi: bool = True
    """For span tasks, also score the best valid IOB2 sequence."""
    max_tokens_per_batch: int = EVALUATION_MAX_TOKENS_PER_BATCH
    """Padded tokens in one forward pass (the same in every language and with ``parallel``)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device (``auto``: CUDA when present)."""
    dtype: EvalDtype = "fp32"
    """Evaluation precision; ``fp64`` is a reference precision whose results agree across processes, CPUs and
    thread counts (slow)."""
    parallel: bool = False
    """One Ray task per language."""
    address: str | None = None
    """Ray cluster address for ``parallel`` (default ``$RAY_ADDRESS``, else a local Ray)."""

    def problems(self) -> list[tuple[str, str]]:
        required = [(name, f"required (--{name} or {name}=...)") for name in ("checkpoint", "output")
                    if not getattr(self, name)]
        return required + check_ranges(self, {"max_sentences": at_least(1, optional=True),
                                        "max_tokens_per_batch": at_least(1)})


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="zero-shot evaluation of a checkpoint on many languages",
                       description="Evaluate a checkpoint zero-shot per language. Settings are EvaluateConfig "
                                   "fields: from --config FILE, key=value overrides, or the flags below.")
    add_config_arguments(p, EvaluateConfig, "configs/evaluate/*.yaml")
    add_config_flags(p, EvaluateConfig)
    p.set_defaults(func=cmd_evaluate)


def config_from_args(args) -> EvaluateConfig:
    """The flags are shorthands for the fields of the same name (``--no-viterbi``: ``viterbi=false``)."""
    return load_config(EvaluateConfig, args.config, args.overrides, **flag_values(args, EvaluateConfig))


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
    return evaluate(config_from_args(args))


def evaluate(cfg: EvaluateConfig) -> int:
    """Check everything that can be checked in seconds, evaluate, write ``cfg.output`` and print the table."""
    from topro.precheck import check_evaluate, checkpoint_meta

    check_output_is_ours(cfg.output, cfg.checkpoint, cfg.overwrite)
    source = cfg.checkpoint
    checkpoint = resolve_evaluate_checkpoint(cfg.checkpoint, cfg.tracking_uri)
    split = cfg.split
    if split is None:
        from topro.data.loading import default_split

        task_name = cfg.task or checkpoint_meta(checkpoint).get("task") or "udpos"
        split = default_split(task_name, cfg.data_dir, [x for x in cfg.langs.split(",") if x])
    langs = ",".join(check_evaluate(checkpoint, cfg.langs, task=cfg.task, split=split,
                                    data_dir=cfg.data_dir, max_sentences=cfg.max_sentences))
    settings = {"source": source, "task": cfg.task, "split": split, "max_sentences": cfg.max_sentences,
                "viterbi": cfg.viterbi, "dtype": cfg.dtype}  # what a kept language's scores depend on
    from topro.partial_results import kept_languages

    kept = kept_languages(cfg.output, writer=EVALUATE_WRITER, settings=settings, overwrite=cfg.overwrite,
                          predictions_file=True)
    kept = {lang: result for lang, result in kept.items() if lang in langs.split(",")}
    if kept:
        print(f"evaluate: resuming {cfg.output}: {len(kept)} of {len(langs.split(','))} languages kept "
              f"({', '.join(kept)})", file=sys.stderr, flush=True)
    from topro.evaluate import evaluate_checkpoint, write_results  # imports torch: after the checks

    def save(record: dict) -> None:
        record.update(written_by=EVALUATE_WRITER, source=source, resume_settings=settings)
        write_results(cfg.output, record)

    kwargs = dict(task=cfg.task, data_dir=cfg.data_dir, split=split, max_sentences=cfg.max_sentences,
                  viterbi=cfg.viterbi, device=cfg.device, dtype=cfg.dtype,
                  max_tokens_per_batch=cfg.max_tokens_per_batch, kept=kept, save=save)
    from topro.interrupts import StopRequests

    if cfg.parallel:
        import ray

        from topro.cluster.evaluation import evaluate_checkpoint_parallel
        from topro.cluster.runtime import init_ray, stop_ray_started_here

        was_running = ray.is_initialized()
        init_ray(cfg.address)  # before StopRequests: ray.init installs its own SIGTERM handler (sys.exit)
        # SIGTERM/SIGINT: the languages finished are kept, those under way cancelled (their actors killed).
        with StopRequests() as stops:
            record = evaluate_checkpoint_parallel(checkpoint, langs, address=cfg.address, **kwargs)
        stop_ray_started_here(was_running)  # before the one line or the table: no forwarded log lines after it
    else:
        # SIGTERM/SIGINT: the language under way finishes; those done are in ``output`` (atomically, partial).
        with StopRequests() as stops:
            record = evaluate_checkpoint(checkpoint, langs, **kwargs)
    if stops.requested:
        raise stopped_evaluation(stops, record, save, cfg.output,
                                 cancelled=" (those under way were cancelled)" if cfg.parallel else "")
    save(record)
    print(format_table(record))
    print(f"per-language results: {cfg.output}")
    return 0


def _score(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def stopped_evaluation(stops, record: dict, save, output: str, cancelled: str = ""):
    """After SIGTERM/SIGINT: write the languages done (marked ``partial``); the ``Interrupted`` to raise."""
    from topro.interrupts import resume_command

    done = len(record["languages"])
    total = done + len(record.get("languages_not_evaluated", []))
    kept = "nothing written"
    if done:
        save(record)
        kept = f"kept them in {output} (partial: true)"
    return stops.interrupted(f"evaluated {done} of {total} languages{cancelled}; {kept}; rerun the same command "
                             f"to resume ({resume_command()})")


def format_table(record: dict) -> str:
    """A Markdown table of one results record: language, headline metric (and the other F1 mode for
    span tasks), sizes, truncation and the headline over the words the model saw."""
    metric = record["metric"]
    first = next(iter(record["languages"].values()), {})
    texts = "macro_f1" in first  # a classification task: one label per text
    extra = [k for k in ("f1_strict", "macro_f1") if k in first]
    seen = f"{metric}_seen_words" if f"{metric}_seen_words" in first and not texts else None
    head = [metric, *extra, "accuracy"] if metric != "accuracy" else [metric, *extra]
    gzs = [f"{metric}_{part}_labels" for part in ("seen", "unseen", "hmean")] \
        if f"{metric}_seen_labels" in first else []
    sizes = [("texts", "n_sentences"), ("trimmed texts", "n_trimmed_prompts")] if texts else \
        [("sentences", "n_sentences"), ("words", "n_words"), ("truncated words", "n_truncated_words")]
    unit = "text" if texts else "word"
    cols = head + [name for name, _ in sizes] + ([seen] if seen else []) + gzs + (
        [f"unseen-label {unit}s"] if gzs else [])
    rows = ["| lang | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for lang, r in record["languages"].items():
        cells = [f"{r[k]:.4f}" for k in head] + [str(r.get(key, "")) for _, key in sizes]
        if seen:
            cells.append(f"{r[seen]:.4f}")
        cells += [_score(r.get(k)) for k in gzs] + ([str(r["n_unseen_label_words"])] if gzs else [])
        rows.append(f"| {lang} | " + " | ".join(cells) + " |")
    avg = record["average"]
    cells = [f"{avg.get(k, float('nan')):.4f}" for k in head] + [""] * len(sizes) + (
        [f"{avg.get(seen, float('nan')):.4f}"] if seen else []) + [_score(avg.get(k)) for k in gzs] + (
        [""] if gzs else [])
    rows.append("| average | " + " | ".join(cells) + " |")
    if gzs:
        rows.append(f"\nUnseen labels (held out of training): {', '.join(first.get('unseen_labels', []))}; "
                    f"{metric} on {unit}s whose gold label is seen / unseen and their harmonic mean "
                    f"(n/a: no gold {unit} of an unseen label).")
    words = record.get("label_words")
    if words:
        rows.append("\nLabel words: " + "; ".join(f"{label}: {' '.join(ws)}" for label, ws in words.items()))
    if record.get("averaged_steps"):
        rows.append(f"\nExported weights: {record['selection']}, the mean of the English-dev checkpoints of steps "
                    f"{record['averaged_steps']} (ranked by {record.get('selection_metric')}).")
    elif record.get("selection_metric"):
        rows.append(f"\nCheckpoint selected on English dev {record['selection_metric']}.")
    return "\n".join(rows)
