"""Reports and MLflow tracking pieces, without Ray: tables, plots, nested runs, metrics, registry."""
import json

import pytest

from topro import reports, tracking
from topro.evaluate import results_record


def _predictions(score: float, offset: int = 0) -> dict:
    """20 sentences of 5 words with accuracy ``score``: the first round(100 * score) words right."""
    gold = [["NOUN"] * 5 for _ in range(20)]
    right = round(100 * score)
    pred = [["NOUN" if (5 * i + j + offset) % 100 < right else "VERB" for j in range(5)] for i in range(20)]
    return {"digests": [f"s{i}" for i in range(20)], "gold": gold, "pred": pred}


def _record(method: str, scores: dict[str, float], task: str = "udpos", predictions: bool = False) -> dict:
    metric = "accuracy" if task == "udpos" else "f1"
    languages = {lang: {metric: v, "accuracy": v, "n_sentences": 10, "n_words": 100, "n_truncated_words": 0}
                 for lang, v in scores.items()}
    if predictions:
        for lang, v in scores.items():
            languages[lang]["predictions"] = _predictions(v)
    return results_record(task, method, "tiny", languages)


def test_markdown_table_is_mean_and_std_over_seeds():
    entries = [reports.Scores("udpos", "topro", "accuracy", {"en": 0.9, "de": 0.6}, seed=1),
               reports.Scores("udpos", "topro", "accuracy", {"en": 0.8, "de": 0.4}, seed=2),
               reports.Scores("udpos", "vanilla", "accuracy", {"en": 0.85, "de": 0.5}, seed=1)]
    table = reports.markdown_table(entries)
    assert "| setting | seeds | en | de | avg | avg w/o en |" in table
    assert "| topro | 2 | 85.0 ± 7.1 | 50.0 ± 14.1 | 67.5 ± 10.6 | 50.0 ± 14.1 |" in table
    assert "| vanilla | 1 (no spread: single seed) | 85.0 | 50.0 | 67.5 | 50.0 |" in table
    # 95% t-interval over the two topro seeds: mean ± 12.706 * std / sqrt(2); one seed has none.
    assert "| topro | [21.5, 148.5] | [-77.1, 177.1] |" in table
    assert "| vanilla | n/a (1 seed) |" in table

    single = reports.markdown_table([e for e in entries if e.seed == 1])
    assert "confidence interval" not in single and "n/a (1 seed)" not in single
    assert "| vanilla | 1 (no spread: single seed) | 85.0 | 50.0 | 67.5 | 50.0 |" in single
    assert "Single seed (no spread, no interval) (1)" in single


def test_group_averages_csv_and_plots(tmp_path):
    record = _record("topro", {"de": 0.5, "nl": 0.7, "ru": 0.4, "en": 0.9})
    assert reports.group_averages({"de": 0.5, "nl": 0.7, "ru": 0.4}, "family") == {"Germanic": 0.6,
                                                                                   "Slavic": 0.4}
    assert reports.group_averages({"de": 0.5, "ru": 0.4}, "script") == {"Cyrillic": 0.4, "Latin": 0.5}
    rows = reports.language_rows(record)
    assert [r["lang"] for r in rows][0] == "en" and {"family", "script", "accuracy"} <= set(rows[0])
    csv = reports.write_csv(rows, tmp_path / "l.csv").read_text().splitlines()
    assert csv[0].startswith("task,method,lang,name,family,script") and len(csv) == 5
    series = {"topro": {"de": 0.5, "ru": 0.4}, "vanilla": {"de": 0.6, "ru": 0.3}}
    import matplotlib.image
    import numpy as np

    for path in (reports.plot_language_bars(series, tmp_path / "bars.png", metric="accuracy"),
                 reports.plot_heatmap(series, tmp_path / "heat.png", metric="accuracy")):
        # A decodable picture of a readable size that draws something: not blank, more than a few colours.
        pixels = matplotlib.image.imread(path)
        height, width = pixels.shape[:2]
        colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
        assert height >= 200 and width >= 300 and len(colours) > 20, (path, pixels.shape, len(colours))


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.configure(uri)
    yield uri
    tracking.configure(None)


def test_nested_runs_metrics_report_and_registry(tmp_path, mlflow_store, capsys):
    from mlflow import MlflowClient

    from topro.cli import main

    parent = tracking.start_sweep_run("exp", "unit", {"search_space": {"seed": {"grid": [1, 2]}}})
    client = MlflowClient()
    # MLflow 3's "Model training" kind, the tag the UI's own kind selector writes
    assert client.get_experiment_by_name("exp").tags["mlflow.experimentKind"] == "custom_model_development"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "topro.json").write_text(json.dumps({"task": "udpos", "method": "topro"}))
    for seed, method, scores in [(1, "topro", {"de": 0.5, "ru": 0.3}), (2, "topro", {"de": 0.7, "ru": 0.5}),
                                 (1, "vanilla", {"de": 0.4, "ru": 0.2})]:
        run = tracking.trial_run(parent, f"t{seed}{method}", f"{method} {seed}", {"method": method, "seed": seed})
        assert tracking.trial_run(parent, f"t{seed}{method}", "again") == run  # found again after a resume
        for step, acc in ((10, 0.5), (20, 0.6)):
            tracking.log_metrics(run, tracking.training_metrics(
                {"epoch": step // 10, "train_loss": 1 / step, "dev_accuracy": acc, "trial_id": "x", "pid": 1}),
                step=step)
        record = {**_record(method, scores, predictions=True), "setting": method, "seed": seed,
                  "learning_rate": 1e-3, "selection_metric": "accuracy"}
        tracking.log_evaluation(run, record, tmp_path / run)
        tracking.end_run(run)
    runs = tracking.child_runs(parent)
    assert len(runs) == 3 and all(r.data.tags["mlflow.parentRunId"] == parent for r in runs)
    first = runs[0].data
    assert first.params["method"] == "topro" and first.metrics["accuracy.de"] == 0.5
    assert first.metrics["accuracy.avg"] == pytest.approx(0.4)
    assert first.metrics["accuracy.family.Germanic"] == 0.5 and first.metrics["accuracy.script.Cyrillic"] == 0.3
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "dev_accuracy")] == [10, 20]
    assert "pid" not in first.metrics
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "evaluation")}
    assert artifacts == {"evaluation/eval.json", "evaluation/per_language.csv", "evaluation/predictions.json",
                         "evaluation/per_language_by_family.png"}
    assert "predictions" not in tracking.load_evaluation(runs[0].info.run_id)["languages"]["de"]
    assert len(tracking.load_predictions(runs[0].info.run_id)["languages"]["de"]["pred"]) == 20

    assert main(["report", "--sweep", "unit", "--tracking-uri", mlflow_store, "--out-dir", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert f"files to {tmp_path / 'rep'}/: heatmap_udpos.png, per_language.csv" in out  # says where it wrote
    assert (tmp_path / "rep" / "report.md").read_text().startswith("## Sweep unit")
    assert "| topro | 2 | 60.0 ± 14.1 | 40.0 ± 14.1 | 50.0 ± 14.1 |" in out
    assert "| vanilla | 1 (no spread: single seed) | 40.0 | 20.0 | 30.0 |" in out
    assert "selected on English dev accuracy" in out
    assert "random-weight" not in out  # these runs name no model: no smoke-test note
    # topro (seeds pooled: de 60%, ru 40%) vs vanilla (40%, 20%) on 100 words each: significant in both
    assert "### udpos: paired bootstrap against vanilla" in out
    assert "| de | 60.0 | 40.0 | +20.0 |" in out and "Five largest differences" in out
    report = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/per_language.csv", "report/heatmap_udpos.png",
            "report/per_language_by_family_udpos.png", "report/significance.json"} <= report
    assert client.get_run(parent).data.metrics["udpos/topro/accuracy.avg"] == pytest.approx(0.5)
    assert tracking.find_sweep_run(parent).info.run_id == parent

    tracking.log_checkpoint(runs[1].info.run_id, ckpt)
    name = tracking.registered_name("udpos", "topro")
    version = tracking.register_checkpoint(runs[1].info.run_id, name, alias="champion")
    assert tracking.registered_version_of_run(name, runs[1].info.run_id) == version
    folder = tracking.resolve_checkpoint(f"models:/{name}@champion", cache=tmp_path / "cache")
    assert json.loads((folder / "topro.json").read_text())["method"] == "topro"


def test_a_sweep_of_the_tiny_model_is_called_a_smoke_test():
    from topro.sweep_report import TINY_NOTE, uses_tiny_model

    assert uses_tiny_model([{"model_param": "vanilla-e5"}, {"model_param": "tiny"}])
    assert uses_tiny_model([{"model": "/root/.cache/topro/tiny-udpos-abc/model"}])
    assert not uses_tiny_model([{"model_param": "/models/multilingual-e5-small", "model": "/models/x"}])
    assert "random-weight" in TINY_NOTE and "configs/sweeps/e5.yaml" in TINY_NOTE
