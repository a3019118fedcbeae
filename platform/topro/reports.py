"""Tables and plots of per-language results (Ray-free, MLflow-free).

Inputs are plain results records (what ``evaluate_checkpoint`` returns) or
``Scores``: one evaluated model's headline metric per language, tagged with
the task, the compared setting (method, ...) and the seed. Outputs: the
per-language CSV, averages by language family and script, a bar chart grouped
by family, a setting x language heatmap and a paper-style Markdown table
(mean +- std over seeds).
"""
from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from topro import atomic
from topro.data.tasks import language_meta


@dataclass
class Scores:
    """One evaluated model: headline metric per language."""

    task: str
    setting: str
    """What the report compares, e.g. ``topro`` or ``vanilla (template=t2)``."""
    metric: str
    languages: dict[str, float]
    seed: int | None = None
    dev_score: float | None = None
    """English dev score (model selection)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything else worth a footnote (chosen learning rate, run id...)."""


def scores_from_record(record: dict[str, Any], setting: str, seed: int | None = None, **info: Any) -> Scores:
    metric = record["metric"]
    return Scores(record["task"], setting, metric, {lang: r[metric] for lang, r in record["languages"].items()},
                  seed=seed, info=info)


def language_order(langs: Iterable[str]) -> list[str]:
    """English first, then by family and code (so family groups sit together)."""
    return sorted(set(langs), key=lambda lang: (lang != "en", language_meta(lang)["family"], lang))


def group_averages(scores: dict[str, float], by: str) -> dict[str, float]:
    """Mean score per language ``family`` or ``script``."""
    groups: dict[str, list[float]] = defaultdict(list)
    for lang, value in scores.items():
        groups[language_meta(lang)[by]].append(value)
    return {group: statistics.fmean(values) for group, values in sorted(groups.items())}


def language_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per language of a results record: metadata and every scalar metric."""
    rows = []
    for lang in language_order(record["languages"]):
        result = record["languages"][lang]
        meta = language_meta(lang)
        row = {"task": record["task"], "method": record["method"], "lang": lang, "name": meta["name"],
               "family": meta["family"], "script": meta["script"]}
        row.update({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for key, value in (result.get("viterbi") or {}).items():
            row[f"viterbi_{key}"] = value
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Rows with possibly different keys; columns in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic.staged_file(path, "report_csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_language_bars(series: dict[str, dict[str, float]], path: str | Path, title: str = "",
                       metric: str = "score", errors: dict[str, dict[str, float]] | None = None) -> Path:
    """Grouped bars per language (one colour per series), languages grouped by family with family labels;
    ``errors`` (series -> language -> std over seeds) draws error bars."""
    plt = _pyplot()
    langs = language_order(lang for scores in series.values() for lang in scores)
    langs = sorted(langs, key=lambda lang: (language_meta(lang)["family"], lang))
    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(langs) * max(1, n / 2) + 2), 4.2))
    for i, (label, scores) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j, lang in enumerate(langs) if lang in scores]
        spread = (errors or {}).get(label)
        yerr = [100 * spread.get(lang, 0.0) for lang in langs if lang in scores] if spread else None
        ax.bar(xs, [100 * scores[lang] for lang in langs if lang in scores], width, label=label, yerr=yerr,
               capsize=1.5 if yerr else 0, error_kw={"elinewidth": 0.6})
    ax.set_xticks(range(len(langs)), langs, fontsize=8)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    start = 0
    for j in range(1, len(langs) + 1):  # a separator and a label per family run
        if j == len(langs) or language_meta(langs[j])["family"] != language_meta(langs[start])["family"]:
            ax.text((start + j - 1) / 2, 101, language_meta(langs[start])["family"], ha="center", va="bottom",
                    fontsize=6, rotation=30)
            if j < len(langs):
                ax.axvline(j - 0.5, color="grey", lw=0.5, ls=":")
            start = j
    ax.set_title(title, pad=28, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=7, loc="lower right")
    return _save_figure(plt, fig, path)


def _save_figure(plt, fig, path: str | Path) -> Path:
    """Lay out, write atomically (a reader never sees half a PNG) and close ``fig``."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.staged_file(path, "report_plot") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def plot_heatmap(matrix: dict[str, dict[str, float]], path: str | Path, title: str = "",
                 metric: str = "score", marks: dict[str, set[str]] | None = None) -> Path:
    """Rows (settings, e.g. methods) x languages, annotated with the score in percent; a cell in
    ``marks`` (row -> languages) gets a ``*`` and a frame (significantly different from the baseline)."""
    import numpy as np

    plt = _pyplot()
    langs = language_order(lang for scores in matrix.values() for lang in scores)
    rows = list(matrix)
    values = np.array([[100 * matrix[r].get(lang, math.nan) for lang in langs] for r in rows])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(langs) + 2.5), 0.55 * len(rows) + 1.8))
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(langs)), langs, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(len(rows)):
        for j in range(len(langs)):
            if not math.isnan(values[i, j]):
                marked = langs[j] in (marks or {}).get(rows[i], set())
                ax.text(j, i, f"{values[i, j]:.0f}{'*' if marked else ''}", ha="center", va="center", fontsize=6,
                        color="white" if values[i, j] < 60 else "black", fontweight="bold" if marked else None)
                if marked:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
    fig.colorbar(image, ax=ax, label=f"{metric} (%)")
    if marks:
        title = (title + "\n" if title else "") + "* framed: significant vs the baseline (paired bootstrap, p < 0.05)"
    ax.set_title(title, fontsize=10)
    return _save_figure(plt, fig, path)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(entries: list[Scores]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """task -> setting -> column (language, ``avg``, ``avg w/o en``) -> values over seeds."""
    table: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for e in entries:
        cells = table[e.task][e.setting]
        for lang, value in e.languages.items():
            cells[lang].append(value)
        cells["avg"].append(statistics.fmean(e.languages.values()))
        zero_shot = [v for lang, v in e.languages.items() if lang != "en"]
        if "en" in e.languages and zero_shot:
            cells["avg w/o en"].append(statistics.fmean(zero_shot))
    return table


def setting_means(entries: list[Scores], task: str) -> dict[str, dict[str, float]]:
    """setting -> language -> mean over seeds, for one task (the heatmap's and bar chart's input)."""
    table = aggregate([e for e in entries if e.task == task]).get(task, {})
    return {setting: {c: statistics.fmean(v) for c, v in cells.items() if not c.startswith("avg")}
            for setting, cells in table.items()}


def setting_stds(entries: list[Scores], task: str) -> dict[str, dict[str, float]]:
    """setting -> language -> sample std over seeds (0 with one seed): the bar chart's error bars."""
    table = aggregate([e for e in entries if e.task == task]).get(task, {})
    return {setting: {c: mean_std(v)[1] for c, v in cells.items() if not c.startswith("avg")}
            for setting, cells in table.items()}


def format_ci(values: list[float]) -> str:
    from topro.significance import confidence_interval

    ci = confidence_interval(values)
    if ci is None:
        return "n/a (1 seed)" if values else "–"
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def format_cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


MAX_LANGUAGE_COLUMNS = 12
"""Languages per report table; more are split over several tables."""


def markdown_table(entries: list[Scores], title: str | None = None) -> str:
    """Paper-style tables, one per task: settings x languages, averages; mean ± std over seeds, in percent,
    then the 95% confidence interval of each mean (t over seeds). One seed is said so in the table; where
    every setting has one seed, the interval tables are left out (the footer says so)."""
    out: list[str] = []
    if title:
        out += [f"## {title}", ""]
    table = aggregate(entries)
    for task in sorted(table):
        settings = table[task]
        task_entries = [e for e in entries if e.task == task]
        metric = task_entries[0].metric
        langs = language_order(lang for e in task_entries for lang in e.languages)
        averages = [c for c in ("avg", "avg w/o en") if any(c in cells for cells in settings.values())]
        seeds = sorted({e.seed for e in task_entries if e.seed is not None})
        flagged = {e.setting for e in task_entries if e.info.get("mlm_head_untrained")}

        def name(setting: str) -> str:
            return f"{setting} †" if setting in flagged else setting

        out.append(f"### {task} ({metric}, %, zero-shot from English; {len(langs)} languages)")
        # Many languages (35 for UDPOS) make rows no screen holds: then one table per block of languages
        # (in language_order, so a block keeps families together), the averages with the last block.
        blocks = [langs[i:i + MAX_LANGUAGE_COLUMNS] for i in range(0, len(langs), MAX_LANGUAGE_COLUMNS)] or [[]]
        blocks[-1] = blocks[-1] + averages
        for block in blocks:
            out.append("")
            out.append("| setting | seeds | " + " | ".join(block) + " |")
            out.append("|---|---|" + "---|" * len(block))
            for setting, cells in settings.items():
                n = len(cells["avg"])
                count = f"{n}" if n > 1 else "1 (no spread: single seed)"
                out.append(f"| {name(setting)} | {count} | "
                           + " | ".join(format_cell(cells.get(c, [])) for c in block) + " |")
        if any(len(cells["avg"]) > 1 for cells in settings.values()):  # one seed everywhere: no interval at all
            out.append("")
            out.append(f"95% confidence interval of the mean over seeds (Student's t), {metric} %:")
            for block in blocks:
                out.append("")
                out.append("| setting | " + " | ".join(block) + " |")
                out.append("|---|" + "---|" * len(block))
                for setting, cells in settings.items():
                    out.append(f"| {name(setting)} | "
                               + " | ".join(format_ci(cells.get(c, [])) for c in block) + " |")
        notes = sorted({f"{e.setting}: {k}={v}" for e in task_entries for k, v in e.info.items()
                        if k in ("learning_rate", "selected")})
        selection = sorted({str(e.info["selection_metric"]) for e in task_entries if e.info.get("selection_metric")})
        out.append("")
        footer = "Mean ± sample std over seeds" if len(seeds) > 1 else "Single seed (no spread, no interval)"
        out.append(f"{footer} ({', '.join(map(str, seeds)) or 'n/a'}); avg: mean over the languages shown"
                   + (f"; checkpoints and settings selected on English dev {'/'.join(selection)}" if selection else "")
                   + ("; " + "; ".join(notes) if notes else "") + ".")
        if flagged:
            out.append("")
            out.append("† The pretrained checkpoint has no masked-LM head: ToPro's head started from random "
                       "weights (not the published setup).")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


GENERALIZED_PARTS = ("seen", "unseen", "hmean")


def generalized_metric(average: dict[str, Any]) -> str | None:
    """``f1`` (span tasks) or ``accuracy`` (tag and classification tasks): the score a generalized zero-shot
    record's seen / unseen / harmonic-mean columns are of; ``None`` for a run without ``unseen_labels``."""
    return next((m for m in ("f1", "accuracy") if f"{m}_hmean_labels" in average), None)


def generalized_table(records: list[dict[str, Any]]) -> str:
    """Generalized zero-shot scores of the records that held labels out of training, one table per task:
    setting x (unseen labels, seen, unseen, harmonic mean, unseen-label words), each the mean over the
    languages where it is defined, then mean ± std over seeds, in percent; empty when no record has them."""
    groups: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        average = record.get("average") or {}
        if generalized_metric(average) is None:
            continue
        held_out = ",".join(record.get("unseen_labels") or [])
        groups[record["task"]][(record.get("setting") or record["method"], held_out)].append(average)
    out: list[str] = []
    for task, settings in sorted(groups.items()):
        metric = generalized_metric(next(iter(settings.values()))[0])
        columns = [f"{metric}_{part}_labels" for part in GENERALIZED_PARTS]
        out += [f"### {task}: generalized zero-shot ({metric}, %, mean over languages; labels held out of training)",
                "", "| setting | unseen labels | seeds | seen | unseen | hmean | unseen-label units per language |",
                "|---|---|---|---|---|---|---|"]
        for (setting, held_out), averages in settings.items():
            cells = [format_cell([a[c] for a in averages if a.get(c) is not None]) for c in columns]
            units = [a["n_unseen_label_words"] for a in averages if a.get("n_unseen_label_words") is not None]
            per_language = f"{statistics.fmean(units):.1f}" if units else "–"
            out.append(f"| {setting} | {held_out or '–'} | {len(averages)} | " + " | ".join(cells)
                       + f" | {per_language} |")
        out += ["", "seen / unseen: over the words (texts, for classification tasks) whose gold label was seen / "
                "held out in training, predicted over the full label set; hmean: their harmonic mean per language. "
                "Units: gold words (texts) of unseen labels.", ""]
    return "\n".join(out)
