"""A real sweep end to end: local Ray, Tune over Ray Train trials, MLflow in SQLite, real data, tiny model.

One sweep (ToPro vs vanilla, 30 English sentences, 1 epoch) feeds several
checks: nested MLflow runs with the full config and per-epoch metrics,
per-language metrics and artifacts, registered champions, the report, and
parallel evaluation giving the sequential results.
"""
import json
from pathlib import Path

import pytest

from topro import tracking
from topro.cli import main

SWEEP = """name: mini
base: {{task: udpos, model: tiny, max_train_sentences: 30, max_dev_sentences: 10, epochs: 1, learning_rate: 1e-3,
        strategy: ddp, workers: 1, cpus_per_worker: 0.9, num_threads: 1, max_failures: 0}}
search_space:
  method: {{grid: [topro, vanilla]}}
  seed: {{grid: [1]}}
eval_langs: [de, ru]
max_sentences: 10
storage_path: {storage}
"""


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, ray_local, tiny_udpos):
    folder = tmp_path_factory.mktemp("sweep")
    config = folder / "mini.yaml"
    config.write_text(SWEEP.format(storage=folder / "sweeps"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    code = main(["sweep", "--config", str(config), "--tracking-uri", uri, "--summary", str(folder / "summary.json")])
    return {"code": code, "folder": folder, "uri": uri, "config": config,
            "summary": json.loads((folder / "summary.json").read_text())}


@pytest.fixture(autouse=True)
def _sweep_store(request):
    """The sweep's own MLflow store for each test that reads MLflow through the process-wide URI (conftest
    points every test at a fresh one first)."""
    if "sweep_run" in request.fixturenames:
        tracking.configure(request.getfixturevalue("sweep_run")["uri"])


def test_sweep_runs_every_trial_and_evaluates_them(sweep_run):
    summary = sweep_run["summary"]
    assert sweep_run["code"] == 0
    assert [t["status"] for t in summary["trials"]] == ["TERMINATED", "TERMINATED"]
    assert {t["params"]["method"] for t in summary["trials"]} == {"topro", "vanilla"}
    assert len(summary["selected"]) == 2 and not summary["resumed"]
    from topro.data import load_split
    from topro.evaluate import evaluate_sentences
    from topro.methods import load_checkpoint

    dev = load_split("udpos", "en", "dev", limit=10)
    for trial in summary["trials"]:
        # The reported English dev score is the selected checkpoint's own score on those 10 dev sentences.
        method, model = load_checkpoint(trial["checkpoint"])
        assert trial["dev_score"] == pytest.approx(evaluate_sentences(method, model, "udpos", dev)["accuracy"],
                                                   abs=1e-6)
        assert trial["average"]["n_languages"] == 2


def test_mlflow_holds_nested_runs_with_config_metrics_and_artifacts(sweep_run):
    from mlflow import MlflowClient

    client = MlflowClient()
    parent = tracking.find_sweep_run("mini")
    assert parent.info.run_id == sweep_run["summary"]["parent_run_id"] and parent.info.status == "FINISHED"
    children = tracking.child_runs(parent.info.run_id)
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        params, metrics = child.data.params, child.data.metrics
        assert params["max_train_sentences"] == "30" and params["task"] == "udpos" and "trial_id" in params
        assert params["method"] in ("topro", "vanilla") and float(params["learning_rate"]) == 1e-3
        history = client.get_metric_history(child.info.run_id, "dev_accuracy")
        assert len(history) == 1 and history[0].step > 0  # one evaluation per epoch, at its step
        assert {"train_loss", "best_dev_accuracy", "epoch"} <= set(metrics)
        assert {"accuracy.de", "accuracy.ru", "accuracy.avg", "accuracy.family.Germanic",
                "accuracy.family.Slavic", "accuracy.script.Latin", "accuracy.script.Cyrillic"} <= set(metrics)
        files = {a.path for a in client.list_artifacts(child.info.run_id, "evaluation")}
        assert {"evaluation/eval.json", "evaluation/per_language.csv", "evaluation/per_language_by_family.png",
                "evaluation/predictions.json"} == files  # per-sentence predictions: topro compare reads them
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/per_language.csv", "report/heatmap_udpos.png",
            "report/per_language_by_family_udpos.png"} <= report
    assert parent.data.params["search_space.method.grid"] == '["topro", "vanilla"]'


def test_champions_are_registered_and_load(sweep_run):
    from topro.methods import load_checkpoint

    registered = {r["name"]: r for r in sweep_run["summary"]["registered"]}
    assert set(registered) == {"topro-udpos-topro", "topro-udpos-vanilla"}
    for name in registered:
        folder = tracking.resolve_checkpoint(f"models:/{name}@champion", cache=sweep_run["folder"] / "cache")
        method, _ = load_checkpoint(folder)
        assert method.name == name.rsplit("-", 1)[1]


def test_report_command_prints_the_table(sweep_run, capsys):
    assert main(["report", "--sweep", "mini", "--tracking-uri", sweep_run["uri"], "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "| setting | seeds | de | ru | avg |" in out
    one_seed = "1 (no spread: single seed)"
    assert out.count(f"| topro | {one_seed} |") == 1 and out.count(f"| vanilla | {one_seed} |") == 1
    assert "`tiny` is a random-weight model built for smoke tests" in out and "configs/sweeps/e5.yaml" in out


def test_parallel_evaluation_matches_sequential(sweep_run):
    from topro.cluster.evaluation import evaluate_checkpoint_parallel
    from topro.evaluate import evaluate_checkpoint

    checkpoint = next(t["checkpoint"] for t in sweep_run["summary"]["trials"] if t["params"]["method"] == "topro")
    # float64 on both sides: the actors' one thread and this process's two sum float32 in another order,
    # which can flip a near-tied argmax
    sequential = evaluate_checkpoint(checkpoint, "de,ru,fr", max_sentences=6, dtype="fp64", progress=False)
    stats = {}
    parallel = evaluate_checkpoint_parallel(checkpoint, "de,ru,fr", max_sentences=6, num_workers=2, dtype="fp64",
                                            stats=stats)
    assert set(parallel.pop("nodes")) == {"de", "ru", "fr"}  # where each language ran (one node here)
    assert parallel == sequential
    assert stats["items"] == 3 and stats["model_loads"] == 2  # once per worker, not once per language


def test_rerunning_a_finished_sweep_redoes_nothing(sweep_run, capsys):
    before = {c.info.run_id: c.data.tags[tracking.EVALUATED_TAG] for c in tracking.child_runs(
        sweep_run["summary"]["parent_run_id"])}
    summary_path = sweep_run["folder"] / "again.json"
    assert main(["sweep", "--config", str(sweep_run["config"]), "--tracking-uri", sweep_run["uri"],
                 "--summary", str(summary_path)]) == 0
    again = json.loads(summary_path.read_text())
    assert again["resumed"] and again["parent_run_id"] == sweep_run["summary"]["parent_run_id"]
    assert {c.info.run_id for c in tracking.child_runs(again["parent_run_id"])} == set(before)
    assert [r["version"] for r in again["registered"]] == [r["version"] for r in sweep_run["summary"]["registered"]]


# --- pieces of the driver that need no cluster -------------------------------------------------------------

def _sweep_config(tmp_path, text):
    from topro.sweep_config import load_sweep_config

    path = tmp_path / "s.yaml"
    path.write_text(text)
    return load_sweep_config(path)


def test_search_space_scheduler_and_resources(tmp_path):
    from ray import tune

    from topro.cluster.sweep_tune import param_space, scheduler, trial_cpus

    cfg = _sweep_config(tmp_path, """name: s
base: {task: udpos, epochs: 3, workers: 2, cpus_per_worker: 1.5}
search_space:
  method: {grid: [topro, vanilla]}
  learning_rate: {loguniform: [1e-5, 1e-3]}
  template: {choice: [topro, topro_is]}
  epochs: {grid: [2, 5]}
scheduler: asha
""")
    space = param_space(cfg)
    assert space["method"] == tune.grid_search(["topro", "vanilla"])
    assert isinstance(space["learning_rate"], tune.search.sample.Float)
    assert isinstance(space["template"], tune.search.sample.Categorical)
    asha = scheduler(cfg)
    assert isinstance(asha, tune.schedulers.ASHAScheduler) and asha._max_t == 5  # the most epochs in the space
    cfg.base["evals_per_epoch"] = 3  # a trial then reports 3 evaluations per epoch
    assert scheduler(cfg)._max_t == 15
    assert trial_cpus(cfg) == pytest.approx(0.1 + 2 * 1.5)
    random = _sweep_config(tmp_path, "name: r\nsearch: random\nnum_samples: 3\n"
                                     "search_space: {method: {grid: [topro, vanilla]}}\n")
    assert isinstance(param_space(random)["method"], tune.search.sample.Categorical)


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_runs_metrics_and_report_in_a_browser(sweep_run):
    """A real `mlflow ui` on the finished sweep, read in headless Chromium through the link the sweep prints:
    the model-training view (not the GenAI one), both trials under the expanded parent, a trial's
    per-language metrics and the parent's report artifacts. Screenshots are kept (the folder is printed)."""
    from browser import chromium_page, mlflow_ui, screenshot_dir

    shots = screenshot_dir("mlflow-ui")
    summary = sweep_run["summary"]
    parent = summary["parent_run_id"]
    experiment = tracking.mlflow_client().get_run(parent).info.experiment_id
    assert tracking.mlflow_client().get_experiment(experiment).tags[tracking.EXPERIMENT_KIND_TAG] == \
        tracking.MODEL_TRAINING_KIND
    child = tracking.child_runs(parent)[0]
    with mlflow_ui(sweep_run["uri"], shots / "mlflow-ui.log") as base, chromium_page(height=1400) as page:
        page.goto(tracking.ui_link(experiment, base))
        page.get_by_text("mini", exact=True).first.wait_for()  # the parent run in the runs table
        assert page.get_by_text("Evaluation runs").count() == 0 and page.get_by_text("Judges").count() == 0
        page.get_by_role("row").filter(has_text="mini").first.get_by_role("button").first.click()  # expand
        for trial in tracking.child_runs(parent):
            page.get_by_text(trial.info.run_name, exact=True).wait_for()
        page.screenshot(path=shots / "1-runs-table.png")

        page.goto(tracking.ui_link(experiment, base).replace("?", f"/runs/{child.info.run_id}?"))
        for name in ("accuracy.de", "accuracy.ru", "accuracy.avg"):
            page.get_by_text(name, exact=True).first.wait_for()
        page.screenshot(path=shots / "2-run-per-language-metrics.png")

        page.goto(tracking.ui_link(experiment, base).replace("?", f"/runs/{parent}/artifacts?"))
        page.get_by_text("report", exact=True).first.click()
        for name in ("report.md", "heatmap_udpos.png", "per_language.csv"):
            page.get_by_text(name, exact=True).first.wait_for()
        page.screenshot(path=shots / "3-report-artifacts.png")
    assert sorted(p.name for p in shots.glob("*.png")) == ["1-runs-table.png", "2-run-per-language-metrics.png",
                                                           "3-report-artifacts.png"]
