"""`topro evaluate`: registered models as `topro serve` takes them, and results files it did not write are kept."""
import json

from topro.cli import main


def test_evaluate_takes_a_registered_model_and_keeps_files_it_did_not_write(tmp_path, model_registry, capsys):
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--checkpoint", model_registry["model"], "--tracking-uri", model_registry["uri"],
            "--langs", "de", "--max-sentences", "5", "--output", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "evaluate: de done (1/1 languages, " in capsys.readouterr().err  # progress, on stderr
    record = json.loads(out.read_text())
    assert record["source"] == "models:/topro-udpos-topro@champion" and record["task"] == "udpos"
    assert record["languages"]["de"]["n_sentences"] == 5
    assert main(argv) == 0  # its own file, the same model: written again

    mine = tmp_path / "train-eval.json"  # what `topro train` writes beside its checkpoint
    mine.write_text(json.dumps({"task": "udpos", "languages": {}}))
    before = mine.read_text()
    argv_mine = [*argv[:-1], str(mine)]
    assert main(argv_mine) == 2
    err = capsys.readouterr().err
    assert "exists and was not written by `topro evaluate`" in err and "--overwrite" in err
    assert mine.read_text() == before
    assert main([*argv_mine, "--overwrite"]) == 0
    assert json.loads(mine.read_text())["source"] == model_registry["model"]

    assert main([*argv[:2], "models:/topro-udpos-topro@nope", *argv[3:-1], str(tmp_path / "x.json")]) == 2
    assert "not found in the MLflow registry" in capsys.readouterr().err.splitlines()[-1]


def test_sweep_child_runs_get_every_score_the_evaluation_writes():
    from topro.tracking import evaluation_metrics

    record = {"metric": "accuracy", "languages": {
        "de": {"accuracy": 0.8, "xtreme_seqeval_f1": 0.7, "accuracy_seen_words": 0.81, "n_sentences": 5,
               "n_words": 50, "n_truncated_words": 0},
        "en": {"accuracy": 0.9, "xtreme_seqeval_f1": 0.85, "n_sentences": 5, "n_words": 40, "n_truncated_words": 0}}}
    metrics = evaluation_metrics(record)
    assert metrics["xtreme_seqeval_f1.de"] == 0.7 and metrics["xtreme_seqeval_f1.en"] == 0.85
    assert metrics["accuracy_seen_words.de"] == 0.81 and metrics["accuracy.avg_without_en"] == 0.8
    assert not any(k.startswith("n_") for k in metrics)
    panx = {"metric": "f1", "languages": {"de": {"f1": 0.5, "precision": 0.4, "recall": 0.6, "accuracy": 0.9,
                                                 "f1_strict": 0.45, "viterbi": {"f1": 0.55, "precision": 0.5}}}}
    metrics = evaluation_metrics(panx)
    assert {"f1.de", "precision.de", "recall.de", "accuracy.de", "f1_strict.de", "viterbi_f1.de",
            "viterbi_precision.de"} <= set(metrics)


def test_report_tables_stay_readable_with_35_languages():
    """UDPOS has 35 languages: the table is split into blocks of at most 12 language columns."""
    from topro.data import get_task
    from topro.reports import MAX_LANGUAGE_COLUMNS, Scores, markdown_table

    langs = get_task("udpos").languages[:35]
    entries = [Scores(task="udpos", setting=m, seed=1, metric="accuracy",
                      languages={lang: 0.5 for lang in langs}) for m in ("topro", "vanilla")]
    text = markdown_table(entries)
    headers = [line for line in text.splitlines() if line.startswith("| setting | seeds |")]
    assert len(headers) == 3 and all(h.count("|") - 3 <= MAX_LANGUAGE_COLUMNS + 2 for h in headers)
    shown = [c.strip() for h in headers for c in h.split("|")[3:-1]]
    assert [c for c in shown if c not in ("avg", "avg w/o en")] == [c for c in shown if c in langs]
    assert sorted(c for c in shown if c in langs) == sorted(langs) and "avg" in headers[-1]
    assert sum(line.startswith("| topro | 1") for line in text.splitlines()) == 3
