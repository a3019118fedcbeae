"""ToPro vs vanilla with and without a pretrained label-word head: a decoder-only LM against multilingual-e5-small.

ToPro's bet is that the LM already knows what its label words mean. multilingual-e5-small ships without its
masked-LM head (ToPro scores through a head transform that starts random); gemma-3-270m's head is pretrained
(tied to its embeddings). This study trains each method on each backbone with one budget and asks whether
ToPro's zero-shot gain over vanilla is larger with the pretrained head.

For each backbone (``--backbones name=PATH,...``), method (``--methods``) and seed (``--seeds``):
``topro train`` on the first ``--train-sentences`` English sentences (selection on the first
``--dev-sentences`` English dev sentences), then ``topro evaluate`` on the first ``--eval-sentences`` dev
sentences of each language (``--langs``: the 11 of ``methods_e5.py``). Each method keeps its usual settings
per backbone kind (``SETTINGS``: learning rate, batch, epochs; ToPro packed per sentence on both kinds).
``--llm-shots 0,3`` adds the prompt-only rows on causal backbones (``topro eval-llm``, ToPro format,
score mode). A finished run (``zero_shot.json``) is reused, so an interrupted study resumes; runs are
separate processes at ``--threads`` threads each.

Prints per backbone and method the per-language score (mean over seeds), the zero-shot mean (without
English) as mean +- std over seeds, English dev, trainable parameters and wall time; ToPro's gain over
vanilla per backbone with the paired bootstrap per language (seeds pooled per sentence, 10,000 resamples)
and the languages where it is significant; and the total CPU-hours (wall x threads).

    python benchmarks/backbone_study.py --seeds 42,1 --llm-shots 0,3 --out runs/backbone_study \\
        --backbones gemma=~/.cache/offline-models/gemma-3-270m,e5=~/.cache/offline-models/multilingual-e5-small
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods_e5 import LANGS, PANX_LANGS, REPO, is_complete, run  # noqa: E402

# Each method's settings per backbone kind, for a budget of a few hundred English sentences. Causal rates
# are an order below the encoder's (full fine-tuning of a 268M-parameter LM); vanilla sees one sentence per
# example, hence smaller batches and 3 epochs; soft ToPro trains only its prompt (frozen backbone).
SETTINGS = {
    ("causal", "topro"): ["topro", "learning_rate=2e-5", "epochs=1", "prompt_packing=sentence"],
    ("causal", "vanilla"): ["vanilla", "learning_rate=5e-5", "batch_size=8", "epochs=3"],
    ("causal", "topro_soft"): ["topro_soft", "learning_rate=5e-3", "epochs=1", "prompt_packing=sentence"],
    # LoRA ToPro: rank-8 adapters on attention query and value (PEFT's default targets), the base frozen, at a
    # LoRA-sized rate
    ("causal", "topro_lora"): ["topro", "adapter=lora", "learning_rate=3e-4", "epochs=1", "prompt_packing=sentence"],
    ("masked", "topro"): ["topro", "learning_rate=1e-4", "epochs=1", "prompt_packing=sentence"],
    ("masked", "topro_lora"): ["topro", "adapter=lora", "learning_rate=1e-3", "epochs=1", "prompt_packing=sentence"],
    ("masked", "vanilla"): ["vanilla", "learning_rate=3e-4", "batch_size=8", "epochs=3"],
    ("masked", "topro_soft"): ["topro_soft", "learning_rate=5e-3", "epochs=1", "prompt_packing=sentence"],
}
RESAMPLES = 10_000


def kind_of(path: str) -> str:
    from topro.models import model_kind

    return model_kind(path)


def config_file(task: str, path: str, method: str) -> str:
    """The shipped config a run of ``method`` on the backbone at ``path`` starts from (SETTINGS names it)."""
    return f"configs/train/{task}-{SETTINGS[(kind_of(path), method)][0]}.yaml"


def train_and_evaluate(backbone: str, path: str, method: str, seed: int, args) -> Path:
    out = Path(args.out) / backbone / f"{method}-s{seed}"
    done = out / "zero_shot.json"
    if is_complete(done):  # a stopped evaluation's partial file is resumed below
        return out
    out.mkdir(parents=True, exist_ok=True)
    settings = SETTINGS[(kind_of(path), method)][1:]
    topro = [sys.executable, "-m", "topro.cli"]
    timing_file = out / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    if not (out / "checkpoint" / "topro.json").is_file():
        train = topro + ["train", "--config", config_file(args.task, path, method), "--output", str(out),
                         f"model={path}", f"max_train_sentences={args.train_sentences}",
                         f"max_dev_sentences={args.dev_sentences}", "max_length=512", "eval_langs=[]",
                         f"num_threads={args.threads}", "progress=false", f"seed={seed}", *settings, *args.override]
        print(f"{backbone} {method} seed {seed}: training", flush=True)
        timing["train_wall_s"] = run(train, out / "train.log")
        timing_file.write_text(json.dumps(timing))
    evaluate = topro + ["evaluate", "--checkpoint", str(out / "checkpoint"), "--langs", args.langs, "--split", "dev",
                        "--max-sentences", str(args.eval_sentences), "--output", str(done)]
    print(f"{backbone} {method} seed {seed}: evaluating", flush=True)
    timing["eval_wall_s"] = run(evaluate, out / "evaluate.log")
    timing_file.write_text(json.dumps(timing))
    return out


def eval_llm(backbone: str, path: str, shots: int, args) -> Path:
    out = Path(args.out) / backbone / f"eval-llm-{shots}shot.json"
    if not is_complete(out):  # absent, or a stopped run's partial file: the same command resumes it
        cmd = [sys.executable, "-m", "topro.cli", "eval-llm", "--task", args.task, "--model", path,
               "--langs", args.langs, "--max-sentences", str(args.eval_sentences), "--split", "dev",
               "--format", "topro", "--mode", "score", "--shots", str(shots), "--threads", str(args.threads),
               "--no-ray", "--no-mlflow", "--output", str(out)]
        print(f"{backbone} eval-llm {shots}-shot", flush=True)
        wall = run(cmd, out.with_suffix(".log"))
        out.with_suffix(".timing.json").write_text(json.dumps({"eval_wall_s": wall}))
    return out


def sentence_counts(folder: Path, lang: str, metric: str) -> np.ndarray:
    from topro.significance import sentence_stats

    pred = json.loads((folder / "zero_shot.predictions.json").read_text())["languages"][lang]
    return sentence_stats(pred["gold"], pred["pred"], metric)


def pm(values: list[float]) -> str:
    if len(values) < 2:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def report(args, runs: dict[tuple[str, str, int], Path], llm: dict[tuple[str, int], Path]) -> str:
    from topro.data.tasks import get_task
    from topro.significance import paired_bootstrap

    langs = args.langs.split(",")
    zero_shot = [lang for lang in langs if lang != "en"]
    evals = {key: json.loads((folder / "zero_shot.json").read_text()) for key, folder in runs.items()}
    metric = get_task(args.task).metric  # also when the study has no trained run (``--methods ""``)
    rows = {}  # (backbone, method) -> per-seed evaluations
    for (backbone, method, seed), record in evals.items():
        rows.setdefault((backbone, method), []).append((seed, record, runs[(backbone, method, seed)]))
    lines = [f"## {args.task}: {metric} x100 on the first {args.eval_sentences} dev sentences per language "
             f"(mean over seeds {args.seeds}); {args.train_sentences} English training sentences", "",
             "| backbone | method | " + " | ".join(langs) + " | zero-shot mean ± std | English dev (selection) "
             "| trainable params | wall train + eval |", "|---" * (len(langs) + 6) + "|"]
    cpu_s = 0.0
    for (backbone, method), seeds in rows.items():
        per_lang = [statistics.fmean(r["languages"][lang][metric] for _, r, _ in seeds) for lang in langs]
        means = [statistics.fmean(r["languages"][lang][metric] for lang in zero_shot) for _, r, _ in seeds]
        metrics = [json.loads((f / "metrics.json").read_text()) for _, _, f in seeds]
        timings = [json.loads((f / "timing.json").read_text()) for _, _, f in seeds]
        cpu_s += sum(t.get("train_wall_s", 0) + t.get("eval_wall_s", 0) for t in timings) * args.threads
        dev = [m.get(f"best_dev_{metric}") for m in metrics]
        walls = " / ".join(f"{t.get('train_wall_s', 0) / 60:.1f} + {t.get('eval_wall_s', 0) / 60:.1f} min"
                           for t in timings)
        lines.append(f"| {backbone} | {method} | " + " | ".join(f"{100 * v:.1f}" for v in per_lang)
                     + f" | **{pm(means)}** | {pm([d for d in dev if d is not None])} "
                     f"| {metrics[0]['n_trainable_params']:,} | {walls} |")
    for (backbone, shots), path in llm.items():
        record = json.loads(path.read_text())
        scores = record["languages"]
        timing = json.loads(path.with_suffix(".timing.json").read_text())
        cpu_s += timing["eval_wall_s"] * args.threads
        lines.append(f"| {backbone} | eval-llm {shots}-shot (no training) | "
                     + " | ".join(f"{100 * scores[lang][metric]:.1f}" for lang in langs)
                     + f" | **{100 * statistics.fmean(scores[lang][metric] for lang in zero_shot):.1f}** | | 0 "
                     f"| {timing['eval_wall_s'] / 60:.0f} min |")
    lines += ["", "Zero-shot counts above exclude English (en is the selection language).", ""]
    for backbone in dict.fromkeys(b for b, _ in rows):
        if not {(backbone, "topro"), (backbone, "vanilla")} <= set(rows):
            continue
        gains = [statistics.fmean(r["languages"][lang][metric] for lang in zero_shot)
                 - statistics.fmean(v["languages"][lang][metric] for lang in zero_shot)
                 for (_, r, _), (_, v, _) in zip(sorted(rows[(backbone, "topro")], key=lambda x: x[0]),
                                                 sorted(rows[(backbone, "vanilla")], key=lambda x: x[0]))]
        lines.append(f"### {backbone}: ToPro - vanilla, zero-shot mean {pm(gains)} points (per seed pair: "
                     + ", ".join(f"{100 * g:+.1f}" for g in gains) + ")")
        lines += ["", "| lang | ToPro | vanilla | difference | 95% interval | p |", "|---|---|---|---|---|---|"]
        significant = []
        for lang in langs:
            a = sum(sentence_counts(f, lang, metric) for _, _, f in rows[(backbone, "topro")])
            b = sum(sentence_counts(f, lang, metric) for _, _, f in rows[(backbone, "vanilla")])
            r = paired_bootstrap(a, b, metric, n_resamples=RESAMPLES)
            if r["p_value"] < 0.05 and lang != "en":
                significant.append(f"{lang} ({100 * r['delta']:+.1f})")
            lines.append(f"| {lang} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | {100 * r['delta']:+.1f} | "
                         f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}] | {r['p_value']:.4f} |")
        lines += ["", "Significant zero-shot differences (p < 0.05): " + (", ".join(significant) or "none"), ""]
    lines.append(f"Total CPU time of the runs above: {cpu_s / 3600:.2f} CPU-hours (wall x {args.threads} "
                 f"thread(s)).")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    home = Path("~/.cache/offline-models").expanduser()
    p.add_argument("--backbones", default=f"gemma={home / 'gemma-3-270m'},e5={home / 'multilingual-e5-small'}")
    p.add_argument("--methods", default="topro,vanilla")
    p.add_argument("--seeds", default="42,1")
    p.add_argument("--task", default="udpos", choices=["udpos", "panx"])
    p.add_argument("--langs", help=f"default: {LANGS} (udpos), {PANX_LANGS} (panx)")
    p.add_argument("--train-sentences", type=int, default=200)
    p.add_argument("--dev-sentences", type=int, default=100)
    p.add_argument("--eval-sentences", type=int, default=100)
    p.add_argument("--llm-shots", default="", help="prompt-only rows on causal backbones, e.g. 0,3")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/backbone_study")
    p.add_argument("--report-only", action="store_true", help="tabulate the finished runs, start none")
    p.add_argument("override", nargs="*", help="key=value overrides for every training run")
    args = p.parse_args(argv)
    args.langs = args.langs or (PANX_LANGS if args.task == "panx" else LANGS)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # evaluate and eval-llm processes at the study's thread count too (train takes num_threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    backbones = dict(item.split("=", 1) for item in args.backbones.split(",") if item)
    backbones = {name: str(Path(path).expanduser()) for name, path in backbones.items()}
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted({m for m in methods for path in backbones.values() if (kind_of(path), m) not in SETTINGS})
    if unknown:
        sys.exit(f"--methods: no settings for {unknown} on these backbones; known: {sorted(set(SETTINGS))}")
    # every run's config must exist before the first (hours-long) run starts, not when its turn comes
    configs = {config_file(args.task, path, m) for m in methods for path in backbones.values()}
    missing = sorted(c for c in configs if not (REPO / c).is_file())
    if missing:
        sys.exit(f"--methods/--task: no such config {missing} under {REPO}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    shots = [int(s) for s in args.llm_shots.split(",") if s]
    runs, llm = {}, {}
    for seed in seeds:  # seed-major: a partial study has every method of the first seed
        for name, path in backbones.items():
            for method in methods:
                folder = Path(args.out) / name / f"{method}-s{seed}"
                if args.report_only:
                    if is_complete(folder / "zero_shot.json"):
                        runs[(name, method, seed)] = folder
                    continue
                runs[(name, method, seed)] = train_and_evaluate(name, path, method, seed, args)
    for name, path in backbones.items():
        if kind_of(path) != "causal":
            continue
        for k in shots:
            target = Path(args.out) / name / f"eval-llm-{k}shot.json"
            if args.report_only:
                if is_complete(target):
                    llm[(name, k)] = target
                continue
            llm[(name, k)] = eval_llm(name, path, k, args)
    if args.report_only and not runs and not llm:
        sys.exit(f"--report-only: no finished run under {args.out} for these backbones, methods and seeds")
    text = report(args, runs, llm)
    print(text)
    (Path(args.out) / "report.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
