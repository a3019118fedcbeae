"""The paper-style report of a sweep, from MLflow alone (Ray-free): ``topro report`` and the end of a sweep.

Reads the evaluated trial runs under the sweep's parent run, prints settings x
languages (mean ± std over seeds) per task, and logs the table, the combined
per-language CSV, a setting x language heatmap and a bar chart grouped by
language family to the parent run under ``report/``.
"""
from __future__ import annotations

import re
import statistics
import tempfile
from pathlib import Path

from topro import atomic
from topro import reports, tracking


def collect_scores(parent_run_id: str) -> tuple[list[reports.Scores], list[dict]]:
    """Scores per evaluated trial run, and their results records."""
    entries, records = [], []
    for run in tracking.child_runs(parent_run_id):
        if tracking.EVALUATED_TAG not in run.data.tags:
            continue
        record = tracking.load_evaluation(run.info.run_id)
        if record is None:
            continue
        setting = record.get("setting") or run.data.tags.get("topro.setting") or record["method"]
        seed = record.get("seed", run.data.params.get("seed"))
        info = {}
        if "learning_rate" in record:
            info["learning_rate"] = f"{record['learning_rate']:g}"
        for key in ("selection_metric", "mlm_head_untrained"):
            if record.get(key):
                info[key] = record[key]
        entries.append(reports.scores_from_record(record, setting, seed=int(seed) if seed is not None else None,
                                                  **info))
        entries[-1].dev_score = record.get("dev_score")
        records.append({**record, "run_id": run.info.run_id, "model_param": run.data.params.get("model")})
    return entries, records


TINY_NOTE = ("Note: `tiny` is a random-weight model built for smoke tests: it knows no label words, so this "
             "run tests the pipeline, not the methods (ToPro needs a pretrained LM head). For a real "
             "comparison run configs/sweeps/e5.yaml (multilingual-e5-small; "
             "`python ../shared/tools/offline_models.py e5` builds it), or the same sweep with "
             "model=~/.cache/offline-models/gemma-3-270m, a decoder-only LM with its pretrained head "
             "(`python ../shared/tools/offline_models.py gemma`).")


def uses_tiny_model(records: list[dict]) -> bool:
    """Whether any evaluated run used the built-in random-weight ``tiny`` model (its param or its built path)."""
    return any(r.get("model_param") == "tiny" or "/tiny-" in str(r.get("model", "")) for r in records)


def baseline_setting(settings: list[str]) -> str:
    """What the other settings are tested against: vanilla fine-tuning where the sweep has it."""
    return next((s for s in settings if s == "vanilla" or s.startswith("vanilla ")), settings[0])


def significance_section(records: list[dict], task: str, seed: int = 0) -> tuple[str, dict[str, set[str]], list]:
    """Paired bootstrap (stored per-sentence predictions, seeds pooled) of every setting against the
    baseline on one task: the Markdown section, the significant languages per setting, the comparisons."""
    from topro.significance import ComparisonError, Predictions, compare_predictions, comparison_markdown

    groups: dict[str, list[Predictions]] = {}
    for record in records:
        if record["task"] != task:
            continue
        data = tracking.load_predictions(record["run_id"])
        if data is None:
            continue
        setting = record.get("setting") or record["method"]
        groups.setdefault(setting, []).append(Predictions(task, setting, data["languages"]))
    if len(groups) < 2:
        return "", {}, []
    baseline = baseline_setting(list(groups))
    metric = next(r["metric"] for r in records if r["task"] == task)
    out = [f"### {task}: paired bootstrap against {baseline}", ""]
    marks: dict[str, set[str]] = {}
    comparisons = []
    for setting, preds in groups.items():
        if setting == baseline:
            continue
        try:
            result = compare_predictions(preds, groups[baseline], metric, seed=seed)
        except ComparisonError as err:
            out += [f"{setting} vs {baseline}: not compared ({err})", ""]
            continue
        comparisons.append(result)
        marks[setting] = {lang for lang, r in result["languages"].items() if r["significant"]}
        out += [f"#### {setting} vs {baseline}", "", comparison_markdown(result)]
        top = sorted(result["languages"].items(), key=lambda kv: -abs(kv[1]["delta"]))[:5]
        out.append("Five largest differences: " + ", ".join(
            f"{lang} {100 * r['delta']:+.1f} (p={r['p_value']:.4f})" for lang, r in top) + ".")
        out.append("")
    return "\n".join(out) + "\n", marks, comparisons


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]+", "_", text).strip("_ ")


def sweep_report(ref: str, log_artifacts: bool = True, out_dir: str | Path | None = None) -> str:
    """The Markdown report of sweep ``ref`` (name or parent run id); also logged to the parent run, and
    its files (report.md, per_language.csv, plots) kept in ``out_dir`` when given."""
    parent = tracking.find_sweep_run(ref)
    parent_id = parent.info.run_id
    name = parent.data.tags.get(tracking.SWEEP_TAG, ref)
    entries, records = collect_scores(parent_id)
    if not entries:
        return f"## Sweep {name}\n\nNo evaluated trials yet (parent run {parent_id}).\n"
    table = reports.markdown_table(entries, title=f"Sweep {name} (MLflow run {parent_id})")
    marks_by_task, comparisons = {}, []
    sections = []
    for task in sorted({e.task for e in entries}):
        section, marks, results = significance_section(records, task)
        if section:
            sections.append(section)
        marks_by_task[task] = marks
        comparisons += results
    generalized = reports.generalized_table(records)
    if generalized:
        table += "\n## Generalized zero-shot (labels held out of training)\n\n" + generalized
    if sections:
        table += "\n## Significance (paired bootstrap over sentences)\n\n" + "\n".join(sections)
    if uses_tiny_model(records):
        table += "\n" + TINY_NOTE + "\n"
    if log_artifacts or out_dir:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(out_dir or tmp)
            folder.mkdir(parents=True, exist_ok=True)
            atomic.write_text(folder / "report.md", table, "report_text")
            if comparisons:
                import json

                atomic.write_json(folder / "significance.json", comparisons, "report_text")
            rows = []
            for record in records:
                for row in reports.language_rows(record):
                    rows.append({"setting": record.get("setting"), "seed": record.get("seed"),
                                 "learning_rate": record.get("learning_rate"), "trial_id": record.get("trial_id"),
                                 "run_id": record["run_id"], **row})
            reports.write_csv(rows, folder / "per_language.csv")
            metrics = {}
            for task in sorted({e.task for e in entries}):
                means = reports.setting_means(entries, task)
                metric = next(e.metric for e in entries if e.task == task)
                reports.plot_heatmap(means, folder / f"heatmap_{task}.png", metric=metric,
                                     title=f"{name}: {task} zero-shot {metric} (mean over seeds)",
                                     marks=marks_by_task.get(task))
                reports.plot_language_bars(means, folder / f"per_language_by_family_{task}.png", metric=metric,
                                           title=f"{name}: {task} zero-shot {metric} by language family "
                                                 f"(error bars: std over seeds)",
                                           errors=reports.setting_stds(entries, task))
                for setting in means:
                    averages = [statistics.fmean(e.languages.values()) for e in entries
                                if e.task == task and e.setting == setting]
                    metrics[slug(f"{task}/{setting}/{metric}.avg")] = statistics.fmean(averages)
            if log_artifacts:
                client = tracking.mlflow_client()
                client.log_artifacts(parent_id, str(folder), "report")
                tracking.log_metrics(parent_id, metrics)
    return table
