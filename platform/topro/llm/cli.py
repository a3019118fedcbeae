"""`topro eval-llm`: evaluate a language model with ToPro prompts or the
whole-sentence baseline, per language, as parallel Ray tasks (or `--no-ray`).

  topro eval-llm --task udpos --model ~/.cache/offline-models/gemma-3-270m \\
      --langs de,ru,tr --shots 3 --format topro --mode score --max-sentences 50

`--model` is a Hugging Face id, a local folder, or the http(s) URL of an
OpenAI-compatible server. Writes the per-language JSON (same shape as
`topro evaluate`) and logs an MLflow run (experiment `topro-llm`).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from topro.llm.formats import list_formats


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name (udpos, panx)")
    p.add_argument("--model", required=True,
                   help="Hugging Face id, local folder, or http(s) URL of an OpenAI-compatible server")
    p.add_argument("--langs", default="all", help="comma-separated languages, or 'all' (default)")
    p.add_argument("--shots", type=int, default=0, help="K demonstrations from English train (default 0)")
    p.add_argument("--format", default="topro",
                   help=f"prompt format: {', '.join(list_formats())}, or a YAML file (default topro)")
    p.add_argument("--mode", choices=["score", "generate"], default="score",
                   help="rank label words by log-likelihood, or generate and match (default score)")
    p.add_argument("--seed", type=int, default=42, help="demonstration sampling seed")
    p.add_argument("--max-sentences", type=int, help="first N sentences per language")
    p.add_argument("--split", default="dev")
    p.add_argument("--data-dir", help="data folder (default $TOPRO_DATA_DIR)")
    p.add_argument("--verbalizer", help="verbalizer name (default: the format's, else the task's)")
    p.add_argument("--length-norm", action="store_true",
                   help="score multi-token labels by mean instead of summed token log-prob")
    p.add_argument("--calibrate", action="store_true",
                   help="score mode: contextual calibration (divide out the label words' prior, "
                        "measured on a content-free word)")
    p.add_argument("--max-new-tokens", type=int, help="generation cap (default from the prompt)")
    p.add_argument("--output", help="JSON file to write (default outputs/llm/<task>-<method>.json)")
    local = p.add_argument_group("local Hugging Face model")
    local.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    local.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    local.add_argument("--scoring", default="shared", choices=["shared", "naive"],
                       help="shared-prefix KV cache (default) or naive per-prompt reference")
    local.add_argument("--batch-tokens", type=int, default=4096, help="token budget per forward")
    local.add_argument("--threads", type=int, help="torch CPU threads per process")
    http = p.add_argument_group("OpenAI-compatible server")
    http.add_argument("--api-model", help="model name on the server (default: its first listed model)")
    http.add_argument("--api", default="auto", choices=["auto", "completions", "chat"])
    http.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    http.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    http.add_argument("--retries", type=int, default=4)
    ray_group = p.add_argument_group("Ray")
    ray_group.add_argument("--no-ray", action="store_true", help="languages one after another in this process")
    ray_group.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    ray_group.add_argument("--cpus-per-task", type=float, default=1.0)
    track = p.add_argument_group("MLflow")
    track.add_argument("--no-mlflow", action="store_true")
    track.add_argument("--tracking-uri", help="default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    track.add_argument("--experiment", default="topro-llm")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval-llm` on the `topro` command."""
    p = subparsers.add_parser("eval-llm", help="evaluate an LLM with ToPro prompts or the whole-sentence baseline",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def backend_options(args) -> dict:
    return {"device": args.device, "dtype": args.dtype, "scoring": args.scoring,
            "batch_tokens": args.batch_tokens, "threads": args.threads, "api_model": args.api_model,
            "api": args.api, "concurrency": args.concurrency, "timeout": args.timeout, "retries": args.retries}


def main(args) -> int:
    from topro.precheck import check_llm

    langs = check_llm(task=args.task, model=args.model, format=args.format, langs=args.langs, split=args.split,
                      data_dir=args.data_dir, verbalizer=args.verbalizer, shots=args.shots,
                      max_sentences=args.max_sentences)  # seconds, before torch, Ray or the model load
    from topro.cli import format_table
    from topro.evaluate import write_json
    from topro.llm.evaluate import LLMEvalConfig

    cfg = LLMEvalConfig(task=args.task, model=args.model, format=args.format, mode=args.mode, shots=args.shots,
                        seed=args.seed, split=args.split, max_sentences=args.max_sentences,
                        data_dir=args.data_dir, verbalizer=args.verbalizer, length_norm=args.length_norm,
                        calibrate=args.calibrate,
                        max_new_tokens=args.max_new_tokens)
    if not langs:
        raise ValueError(f"no languages with a {cfg.split} split for task {cfg.task!r}")
    options = backend_options(args)
    if args.no_ray:
        from topro.llm.backends import load_backend
        from topro.llm.evaluate import evaluate_llm

        record = evaluate_llm(cfg, langs, load_backend(cfg.model, **options))
    else:
        from topro.cluster.llm_eval import evaluate_llm_parallel

        record = evaluate_llm_parallel(cfg, langs, options, address=args.address,
                                       cpus_per_task=args.cpus_per_task)
    output = Path(args.output or Path("outputs") / "llm" / f"{cfg.task}-{record['method']}.json")
    write_json(output, record)
    print(format_table(record))
    print("format failure rate per language: " + ", ".join(
        f"{lang} {r['format_failure_rate']:.3f}" for lang, r in record["languages"].items()))
    print(f"per-language results: {output}")
    if not args.no_mlflow:
        from topro.llm.tracking import log_llm_run

        run_id = log_llm_run(record, record["params"], tracking_uri=args.tracking_uri,
                             experiment=args.experiment, json_path=output)
        print(f"mlflow run: {run_id}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m topro.llm.cli`, `jobs/eval_llm.py`)."""
    parser = argparse.ArgumentParser(prog="topro eval-llm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return main(args)
    except ValueError as err:
        print(f"topro eval-llm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
