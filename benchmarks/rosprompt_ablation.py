"""RoSPrompt ablation under generalized zero-shot labels: seen / unseen / harmonic mean per language.

Variants (each trained with ``topro train`` from ``configs/train/<task>-rosprompt.yaml`` on the same
few-shot English sample, ``shots_per_label``, and evaluated with ``topro evaluate`` on the same first
``--eval-sentences`` dev sentences of each language):

- ``rosprompt``: full (kNN label words, contrastive smoothing, prompt-drift penalty)
- ``no_knn``: ``verbalizer_expansion=none`` (the seed words only)
- ``no_contrastive``: ``label_smoothing_kind=uniform``
- ``no_penalty``: ``prompt_drift_penalty=0``
- ``topro_soft``: soft ToPro, the same prompt vectors and frozen backbone, one label word per label, no
  smoothing, no penalty
- ``topro``: fine-tuned ToPro (hand-written template, whole model trained)

for every unseen-label set (``--unseen``, sets separated by ``;``) and seed (``--seeds``). Prints per
variant the mean over seeds and unseen sets of each language's seen / unseen / harmonic-mean score
(UDPOS: accuracy; PAN-X: span F1 by type group), their averages over languages, the number of
unseen-label words per language and set, trainable parameters and training seconds; and the paired
bootstrap over sentences (seeds pooled per sentence) of the harmonic mean, ``rosprompt`` vs ``topro_soft``,
per unseen set and language. A finished run (its ``eval.json``) is reused, so an interrupted ablation resumes.

    python benchmarks/rosprompt_ablation.py --task udpos --model tiny --langs en,de --seeds 1 \\
        --unseen "NUM,PROPN,SCONJ" --eval-sentences 20 --epochs 2 --out runs/ablation-tiny
    python benchmarks/rosprompt_ablation.py --task udpos --model ~/.cache/offline-models/multilingual-e5-small \\
        --seeds 1,2,3 --unseen "NUM,PROPN,SCONJ;ADJ,ADV,INTJ" --out runs/ablation-e5
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


OFF = ["verbalizer_expansion=none", "label_smoothing=0", "prompt_drift_penalty=0"]
VARIANTS = {
    "rosprompt": [],
    "no_knn": ["verbalizer_expansion=none"],
    "no_contrastive": ["label_smoothing_kind=uniform"],
    "no_penalty": ["prompt_drift_penalty=0"],
    "topro_soft": ["method=topro_soft", *OFF],
    # fine-tuned ToPro: the whole model trains, so a fine-tuning learning rate (``rate``)
    "topro": ["method=topro", *OFF],
}
# The same 11 languages per task and the same subprocess runner as benchmarks/methods_e5.py (beside this
# script, so on its path when run as `python benchmarks/rosprompt_ablation.py`).
from methods_e5 import LANGS, PANX_LANGS, is_complete, run  # noqa: E402


def rate(variant: str, model: str) -> list[str]:
    """Fine-tuned ToPro's ``learning_rate`` override for this backbone's kind, taken from
    ``backbone_study.py``'s SETTINGS (one place for it; the built-in ``tiny`` is masked)."""
    if variant != "topro":
        return []
    from backbone_study import SETTINGS
    from topro.models import model_kind

    kind = model_kind(model) if Path(model).is_dir() else "masked"
    return [s for s in SETTINGS[(kind, "topro")] if s.startswith("learning_rate=")]


def run_one(variant: str, unseen: str, seed: int, args) -> Path:
    """Train and evaluate one (variant, unseen set, seed); returns its folder (``eval.json`` inside)."""
    out = Path(args.out) / f"{variant}__{unseen.replace(',', '-')}__seed{seed}"
    if is_complete(out / "eval.json"):
        return out
    out.mkdir(parents=True, exist_ok=True)
    topro = [sys.executable, "-m", "topro.cli"]
    wall_file = out / "wall.json"
    wall = json.loads(wall_file.read_text())["wall_s"] if wall_file.is_file() else 0.0
    if not (out / "checkpoint" / "topro.json").is_file():  # a stopped evaluation resumes without training again
        train = topro + ["train", "--config", f"configs/train/{args.task}-rosprompt.yaml", "--output", str(out),
                         f"model={args.model}", f"unseen_labels=[{unseen}]", f"seed={seed}", f"epochs={args.epochs}",
                         f"shots_per_label={args.shots}", f"max_dev_sentences={args.dev_sentences}", "eval_langs=[]",
                         f"num_threads={args.threads}", "progress=false", *VARIANTS[variant],
                         *rate(variant, args.model), *args.override]
        print(f"{out.name}: training", flush=True)
        wall += run(train, out / "train.log")
        wall_file.write_text(json.dumps({"wall_s": wall}))
    evaluate = topro + ["evaluate", "--checkpoint", str(out / "checkpoint"), "--langs", args.langs, "--split", "dev",
                        "--max-sentences", str(args.eval_sentences), "--output", str(out / "eval.json")]
    wall += run(evaluate, out / "evaluate.log")
    wall_file.write_text(json.dumps({"wall_s": wall}))
    return out


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def fmt(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def sentence_rows(task, gold: list[list[str]], pred: list[list[str]], unseen: set[str]) -> np.ndarray:
    """Per-sentence counts whose sums give the seen and unseen scores: tag tasks (correct, words) for seen
    then unseen gold words; IOB2 tasks (true positives, predicted, gold spans) over seen then unseen types."""
    if task.scheme != "iob2":
        rows = [[sum(a == b for a, b in zip(g, p) if a not in unseen), sum(a not in unseen for a in g),
                 sum(a == b for a, b in zip(g, p) if a in unseen), sum(a in unseen for a in g)]
                for g, p in zip(gold, pred)]
        return np.array(rows, dtype=np.float64).reshape(-1, 4)
    from seqeval.metrics.sequence_labeling import get_entities

    def spans(tags, keep):
        return set(get_entities([t if (t in keep) else "O" for t in tags]))

    every = set(task.labels)
    rows = []
    for g, p in zip(gold, pred):
        row = []
        for keep in (every - unseen - {"O"}, unseen):
            gs, ps = spans(g, keep), spans(p, keep)
            row += [len(gs & ps), len(ps), len(gs)]
        rows.append(row)
    return np.array(rows, dtype=np.float64).reshape(-1, 6)


def hmean_from_sums(sums: np.ndarray, scheme: str) -> np.ndarray:
    def ratio(a, b):
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    if scheme != "iob2":
        seen, unseen = ratio(sums[..., 0], sums[..., 1]), ratio(sums[..., 2], sums[..., 3])
    else:
        seen = ratio(2 * sums[..., 0], sums[..., 1] + sums[..., 2])
        unseen = ratio(2 * sums[..., 3], sums[..., 4] + sums[..., 5])
    return ratio(2 * seen * unseen, seen + unseen)


def bootstrap_hmean(a: np.ndarray, b: np.ndarray, scheme: str, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap over sentences of hmean(A) - hmean(B) (as topro.significance.paired_bootstrap)."""
    observed = float(hmean_from_sums(a.sum(0), scheme) - hmean_from_sums(b.sum(0), scheme))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_resamples, len(a)))
    deltas = hmean_from_sums(a[idx].sum(1), scheme) - hmean_from_sums(b[idx].sum(1), scheme)
    p = float(((np.abs(deltas - observed) >= abs(observed) - 1e-12).sum() + 1) / (n_resamples + 1))
    return {"delta": observed, "p_value": p}


@functools.lru_cache(maxsize=None)
def predictions(folder: Path) -> dict:
    """A run's per-language gold and predicted tags (``eval.predictions.json``), read once per report: every
    bootstrap against full rosprompt pools its predictions again."""
    return json.loads((folder / "eval.predictions.json").read_text())["languages"]


def pooled(folders: list[Path], lang: str, task, unseen: set[str]) -> np.ndarray:
    total = None
    for folder in folders:
        pred = predictions(folder)[lang]
        rows = sentence_rows(task, pred["gold"], pred["pred"], unseen)
        total = rows if total is None else total + rows
    return total


def unseen_precision(folder: Path, unseen: str, task, langs: list[str]) -> float | None:
    """Tag tasks: of the words predicted as an unseen label, the share that is right, averaged over the
    languages with such predictions (``precision_unseen_labels`` of ``topro evaluate``, recomputed from the
    stored predictions so runs evaluated before that metric have it too). Accuracy on unseen gold words is
    their recall, which predicting an unseen label everywhere maximizes. ``None`` for span tasks (span F1
    holds its precision)."""
    if task.scheme == "iob2":
        return None
    from topro.metrics import generalized_scores
    from topro.unseen import expand_unseen_labels

    labels = expand_unseen_labels(task, [x for x in unseen.split(",") if x])
    by_lang = predictions(folder)
    return mean([generalized_scores(task, by_lang[lang]["gold"], by_lang[lang]["pred"], labels)
                 ["precision_unseen_labels"] for lang in langs])


def ablation_significance(args, runs: dict[tuple[str, str, int], Path], task, langs: list[str]) -> list[str]:
    """Per unseen set, each other variant against full ``rosprompt``: the languages where the paired bootstrap of
    the harmonic mean (seeds pooled per sentence) says it is higher or lower at p < 0.05, the rest not
    significant. What "this ingredient helps" rests on, language by language."""
    from topro.unseen import expand_unseen_labels

    lines = []
    for unseen in args.unseen.split(";"):
        labels = set(expand_unseen_labels(task, [x for x in unseen.split(",") if x]))
        base = [f for (v, u, _), f in runs.items() if v == "rosprompt" and u == unseen]
        if not base:
            continue
        for variant in [v for v in args.variants if v != "rosprompt"]:
            other = [f for (v, u, _), f in runs.items() if v == variant and u == unseen]
            if not other:
                continue
            higher, lower = [], []
            for lang in langs:
                r = bootstrap_hmean(pooled(other, lang, task, labels), pooled(base, lang, task, labels), task.scheme)
                if r["p_value"] < 0.05:
                    (higher if r["delta"] > 0 else lower).append(f"{lang} {100 * r['delta']:+.1f}")
            lines.append(f"- {unseen}, {variant} - rosprompt: higher in {', '.join(higher) or 'none'}; lower in "
                         f"{', '.join(lower) or 'none'}; not significant in the other "
                         f"{len(langs) - len(higher) - len(lower)}")
    if lines:
        lines = ["", "Each variant against full rosprompt, paired bootstrap of the harmonic mean per language "
                 "(seeds pooled per sentence; 2000 resamples; p < 0.05):", ""] + lines
    return lines


def report(args, runs: dict[tuple[str, str, int], Path]) -> str:
    from topro.data import get_task
    from topro.unseen import expand_unseen_labels

    task = get_task(args.task)
    metric = "accuracy" if task.scheme != "iob2" else "f1"
    langs = [x for x in args.langs.split(",") if x]
    records = {key: json.loads((folder / "eval.json").read_text()) for key, folder in runs.items()}
    lines = [f"## {args.task}: seen / unseen / harmonic mean ({metric} x100), mean over seeds "
             f"{args.seeds} and unseen sets {args.unseen.split(';')}", "",
             "| variant | " + " | ".join(langs) + " | average | hmean: mean ± std over runs | unseen precision "
             "| trainable params | train s |",
             "|---" * (len(langs) + 6) + "|"]
    for variant in args.variants:
        keys = [k for k in records if k[0] == variant]
        cells = []
        for lang in langs + ["average"]:
            parts = []
            for part in ("seen", "unseen", "hmean"):
                key = f"{metric}_{part}_labels"
                # "average": the mean over the languages listed here (--langs), not the evaluation's own
                # average, so runs evaluated on more languages than others are compared on the same ones
                scores = [mean([records[k]["languages"][x].get(key) for x in langs]) if lang == "average"
                          else records[k]["languages"][lang].get(key) for k in keys]
                parts.append(fmt(mean(scores)))
            cells.append(" / ".join(parts))
        # The spread over runs (seeds x unseen sets) of each run's language-averaged harmonic mean.
        per_run = [mean([records[k]["languages"][x].get(f"{metric}_hmean_labels") for x in langs]) for k in keys]
        per_run = [v for v in per_run if v is not None]
        spread = (f"{100 * statistics.fmean(per_run):.1f} ± {100 * statistics.stdev(per_run):.1f}"
                  if len(per_run) > 1 else "n/a")
        cells.append(spread)
        metrics = [json.loads((runs[k] / "metrics.json").read_text()) for k in keys]
        params = metrics[0]["n_trainable_params"] if metrics else None
        seconds = mean([m["train_seconds"] for m in metrics])
        sets = sorted({k[1] for k in keys})
        precision = fmt(mean([unseen_precision(runs[k], k[1], task, langs) for k in keys]))
        lines.append(f"| {variant} ({len(keys)} runs: {'; '.join(sets)}) | " + " | ".join(cells)
                     + f" | {precision} | {params} | {seconds:.0f} |")
    lines += ["", "Unseen-label words per language: " + "; ".join(
        f"{unseen}: " + ", ".join(f"{lang} {next(r for k, r in records.items() if k[1] == unseen)['languages'][lang]['n_unseen_label_words']}"
                                  for lang in langs) for unseen in args.unseen.split(";")
        if any(k[1] == unseen for k in records))]
    lines += ablation_significance(args, runs, task, langs)
    if {"rosprompt", "topro_soft"} <= set(args.variants):
        lines += ["", "Paired bootstrap of the harmonic mean, rosprompt - topro_soft (seeds pooled per sentence; "
                  "2000 resamples):", ""]
        for unseen in args.unseen.split(";"):
            labels = set(expand_unseen_labels(task, [x for x in unseen.split(",") if x]))
            if not all(any(k[0] == v and k[1] == unseen for k in runs) for v in ("rosprompt", "topro_soft")):
                continue
            for lang in langs:
                a = pooled([runs[(v, u, s)] for (v, u, s) in runs if v == "rosprompt" and u == unseen], lang, task, labels)
                b = pooled([runs[(v, u, s)] for (v, u, s) in runs if v == "topro_soft" and u == unseen], lang, task,
                           labels)
                r = bootstrap_hmean(a, b, task.scheme)
                lines.append(f"- {unseen} {lang}: {100 * r['delta']:+.1f} (p={r['p_value']:.3f})")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="udpos", choices=["udpos", "panx"])
    p.add_argument("--model", default="tiny")
    p.add_argument("--langs", help="evaluation languages (default: methods_e5.py's 11 for the task)")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--unseen", help="unseen-label sets separated by ';' (default: NUM,PROPN,SCONJ;ADJ,ADV,INTJ "
                                    "for UDPOS, LOC;ORG for PAN-X)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--shots", type=int, default=8, help="shots_per_label")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--dev-sentences", type=int, default=100)
    p.add_argument("--eval-sentences", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/rosprompt_ablation")
    p.add_argument("--override", nargs="*", default=[], help="extra key=value for every training run")
    p.add_argument("--report-only", action="store_true", help="tabulate the finished runs, start none")
    args = p.parse_args(argv)
    args.langs = args.langs or (LANGS if args.task == "udpos" else PANX_LANGS)
    args.unseen = args.unseen or ("NUM,PROPN,SCONJ;ADJ,ADV,INTJ" if args.task == "udpos" else "LOC;ORG")
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    started = time.perf_counter()
    keys = [(v, u, s) for v in args.variants for u in args.unseen.split(";") for s in seeds]
    if args.report_only:
        folders = {k: Path(args.out) / f"{k[0]}__{k[1].replace(',', '-')}__seed{k[2]}" for k in keys}
        runs = {k: f for k, f in folders.items() if is_complete(f / "eval.json")}
        args.variants = [v for v in args.variants if any(k[0] == v for k in runs)]
        if not runs:
            sys.exit(f"--report-only: no finished run under {args.out} for these variants, sets and seeds")
    else:
        runs = {k: run_one(*k, args) for k in keys}
    text = report(args, runs)
    print(text)
    (Path(args.out) / "report.md").write_text(text + "\n")
    print(f"\nwall time: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
