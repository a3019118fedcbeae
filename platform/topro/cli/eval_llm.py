"""`topro eval-llm` (and `jobs/eval_llm.py`): evaluate a language model with ToPro prompts or the
whole-sentence baseline, per language, as parallel Ray tasks (or `--no-ray`).

  topro eval-llm --task udpos --model ~/.cache/offline-models/gemma-3-270m \\
      --langs de,ru,tr --shots 3 --format topro --mode score --max-sentences 50

`--model` is a Hugging Face id, a local folder, or the http(s) URL of an
OpenAI-compatible server. Settings are `EvalLLMConfig` fields: `--config FILE`,
`key=value` overrides, or the flags below (shorthands for the same fields).
Writes the per-language JSON (same shape as `topro evaluate`) and logs an
MLflow run (experiment `topro-llm`).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from topro.cli.flags import add_config_arguments, add_config_flags, flag_values
from topro.config import ConfigError, check_ranges, load_config
from topro.config import _at_least as at_least
from topro.llm.backend_config import BackendConfig


@dataclass
class EvalLLMConfig(BackendConfig):
    """One LLM evaluation: what is asked (``llm.evaluate.LLMEvalConfig``), of which model, where; how the
    model runs are ``BackendConfig``'s fields."""

    task: str | None = None
    """Task name (``udpos``, ``panx``). Required."""
    model: str | None = None
    """Hugging Face id, local folder, or http(s) URL of an OpenAI-compatible server. Required."""
    langs: str = "all"
    """Comma-separated languages, or ``all``."""
    shots: int = 0
    """K demonstrations from English train."""
    format: str = "topro"
    """Prompt format: a name of ``topro.prompts.formats`` or a YAML file."""
    mode: Literal["score", "generate"] = "score"
    """Rank label words by log-likelihood (``score``), or generate and match (``generate``)."""
    seed: int = 42
    """Demonstration sampling seed."""
    max_sentences: int | None = None
    """First N sentences per language (``None``: all)."""
    split: str = "dev"
    """Split scored in each language."""
    data_dir: str | None = None
    """Data folder (default ``$TOPRO_DATA_DIR``)."""
    verbalizer: str | None = None
    """Verbalizer name (default: the format's, else the task's)."""
    length_norm: bool = False
    """Score multi-token labels by the mean instead of the sum of their token log-probs."""
    calibrate: bool = False
    """Score mode: contextual calibration (divide out the label words' prior, measured on a content-free word)."""
    answer_end_scored: Literal["always", "when_needed", "per_answer"] = "always"
    """Score mode: score each label with the format's answer end after it (``always``), or only when the label
    words' tokenizations are not prefix-free (``when_needed``: checked once from the tokenizer and logged; a
    prefix-free single-token label set then costs one logit row per question), or after exactly the labels
    whose tokens start another's (``per_answer``). Use the value a causal ToPro
    checkpoint was trained with (its ``topro.json``) to score as it was trained."""
    max_new_tokens: int | None = None
    """Generation cap (default from the prompt)."""
    output: str | None = None
    """JSON file to write (default ``outputs/llm/<task>-<method>.json``), after every language: until the
    last it says ``partial: true``, and the same command run again keeps the languages it holds."""
    overwrite: bool = False
    """Start over where ``output`` holds a stopped run of other settings (instead of refusing it). One of the
    same settings is still resumed: its scores would be the same."""
    # Ray and MLflow.
    ray: bool = True
    """Languages as parallel Ray tasks (``false``: one after another in this process)."""
    address: str | None = None
    """Ray cluster address (default ``$RAY_ADDRESS``, else a local Ray)."""
    cpus_per_task: float = 1.0
    """CPUs reserved by each language's Ray task."""
    mlflow: bool = True
    """Log an MLflow run."""
    tracking_uri: str | None = None
    """MLflow tracking URI (default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``)."""
    experiment: str = "topro-llm"
    """MLflow experiment."""

    RENAMED_KEYS = {"batch_tokens": "max_tokens_per_batch"}  # not a field: old names, refused with the new one

    def problems(self) -> list[tuple[str, str]]:
        required = [(name, f"required (--{name} or {name}=...)") for name in ("task", "model")
                    if not getattr(self, name)]
        return required + self.backend_problems() + check_ranges(self, {
            "shots": at_least(0), "max_sentences": at_least(1, optional=True),
            "max_new_tokens": at_least(1, optional=True)})

    def eval_config(self):
        """What is asked, as ``topro.llm.evaluate`` takes it (and logs as the run's parameters)."""
        from topro.llm.evaluate import LLMEvalConfig

        # A YAML config's "~/..." is not expanded by a shell; a URL has no leading "~".
        return LLMEvalConfig(task=self.task, model=os.path.expanduser(self.model), format=self.format, mode=self.mode,
                             shots=self.shots, seed=self.seed, split=self.split, max_sentences=self.max_sentences,
                             data_dir=self.data_dir, verbalizer=self.verbalizer, length_norm=self.length_norm,
                             calibrate=self.calibrate, max_new_tokens=self.max_new_tokens,
                             answer_end_scored=self.answer_end_scored)


FLAG_GROUPS = {
    None: ("task", "model", "langs", "shots", "format", "mode", "seed", "max_sentences", "split", "data_dir",
           "verbalizer", "length_norm", "calibrate", "answer_end_scored", "max_new_tokens", "output", "overwrite"),
    "local Hugging Face model": ("device", "dtype", "scoring", "max_tokens_per_batch", "threads"),
    "OpenAI-compatible server": ("api_model", "api", "concurrency", "timeout", "retries"),
    "Ray": ("ray", "address", "cpus_per_task"),
    "MLflow": ("mlflow", "tracking_uri", "experiment"),
}
"""Every field's flag, in the groups ``--help`` shows."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, EvalLLMConfig, "configs/llm/*.yaml")
    for group, fields in FLAG_GROUPS.items():
        add_config_flags(p.add_argument_group(group) if group else p, EvalLLMConfig, fields)
    p.add_argument("--batch-tokens", type=int, help=argparse.SUPPRESS)  # the old name: refused, naming the new


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval-llm` on the `topro` command."""
    p = subparsers.add_parser("eval-llm", help="evaluate an LLM with ToPro prompts or the whole-sentence baseline",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_eval_llm)
    return p


def config_from_args(args) -> EvalLLMConfig:
    if args.batch_tokens is not None:
        raise ConfigError("--batch-tokens is now --max-tokens-per-batch (max_tokens_per_batch=N)")
    return load_config(EvalLLMConfig, args.config, args.overrides, **flag_values(args, EvalLLMConfig))


def cmd_eval_llm(args) -> int:
    return eval_llm(config_from_args(args))


EVAL_LLM_WRITER = "topro eval-llm"

RESUME_BACKEND_FIELDS = ("dtype", "scoring", "api_model", "api")
"""The backend settings a language's scores depend on (besides every ``LLMEvalConfig`` field)."""


def resume_settings(run: EvalLLMConfig) -> dict:
    """What a kept language's scores depend on: a stopped run is resumed only where these are equal."""
    from dataclasses import asdict

    return {**asdict(run.eval_config()), **{key: getattr(run, key) for key in RESUME_BACKEND_FIELDS}}


def eval_llm(run: EvalLLMConfig) -> int:
    """Check in seconds, evaluate every language (Ray tasks or in turn), write the JSON after each language,
    log to MLflow. SIGTERM/SIGINT drops the languages under way and keeps those done; rerunning resumes."""
    from topro.precheck import check_llm

    langs = check_llm(task=run.task, model=run.model, format=run.format, langs=run.langs, split=run.split,
                      data_dir=run.data_dir, verbalizer=run.verbalizer, shots=run.shots,
                      max_sentences=run.max_sentences)  # seconds, before torch, Ray or the model load
    from topro.partial_results import kept_languages

    cfg = run.eval_config()
    if not langs:
        raise ValueError(f"no languages with a {cfg.split} split for task {cfg.task!r}")
    output = Path(run.output or Path("outputs") / "llm" / f"{cfg.task}-{cfg.method}.json")
    settings = resume_settings(run)
    kept = kept_languages(output, writer=EVAL_LLM_WRITER, settings=settings, overwrite=run.overwrite)
    kept = {lang: result for lang, result in kept.items() if lang in langs}
    if kept:
        print(f"eval-llm: resuming {output}: {len(kept)} of {len(langs)} languages kept "
              f"({', '.join(kept)}), {len(langs) - len(kept)} to evaluate", file=sys.stderr, flush=True)
    from topro.cli.evaluate import format_table, stopped_evaluation
    from topro.evaluate import write_json
    from topro.interrupts import StopRequests

    def save(record: dict) -> None:
        record.update(written_by=EVAL_LLM_WRITER, resume_settings=settings)
        write_json(output, record)

    options = run.backend_options()
    if not run.ray:
        from topro.llm.backends import load_backend
        from topro.llm.evaluate import evaluate_llm

        backend = load_backend(cfg.model, **options)
        with StopRequests() as stops:  # the language under way is dropped, those done are in ``output``
            record = evaluate_llm(cfg, langs, backend, kept=kept, save=save)
    else:
        import ray

        from topro.cluster.llm_eval import evaluate_llm_parallel
        from topro.cluster.runtime import init_ray, stop_ray_started_here

        was_running = ray.is_initialized()
        init_ray(run.address, include_dashboard=False)  # before StopRequests: ray.init has its own SIGTERM handler
        with StopRequests() as stops:  # the tasks under way are cancelled, the languages done are in ``output``
            record = evaluate_llm_parallel(cfg, langs, options, address=run.address,
                                           cpus_per_task=run.cpus_per_task, kept=kept, save=save)
        stop_ray_started_here(was_running)
    if stops.requested:
        raise stopped_evaluation(stops, record, save, output)
    save(record)
    print(format_table(record))
    print("format failure rate per language: " + ", ".join(
        f"{lang} {r['format_failure_rate']:.3f}" for lang, r in record["languages"].items()))
    print(f"per-language results: {output}")
    if run.mlflow:
        from topro.tracking.llm_runs import log_llm_run

        run_id = log_llm_run(record, record["params"], tracking_uri=run.tracking_uri,
                             experiment=run.experiment, json_path=output)
        print(f"mlflow run: {run_id}")
    return 0
