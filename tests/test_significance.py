"""Seed intervals and the paired bootstrap over sentences; ``topro compare`` on stored predictions."""
import json
from pathlib import Path

import numpy as np
import pytest

from topro.data import get_task
from topro.metrics import score_task
from topro.significance import (ComparisonError, Predictions, compare_predictions, confidence_interval,
                                paired_bootstrap, score_from_sums, sentence_stats, t_quantile)

GOLDEN = Path(__file__).parent / "golden"


def _tags(path):
    return [[line.split("\t")[1] for line in block.splitlines()] for block in path.read_text().strip().split("\n\n")]


# Two-sided critical values of Student's t as printed in published tables (NIST/SEMATECH e-Handbook of
# Statistical Methods, table 1.4.2 "Critical values of Student's t distribution", upper-tail 0.05 / 0.025 /
# 0.005 columns, i.e. two-sided 0.90 / 0.95 / 0.99), to the three decimals printed there: an oracle that
# is not the code's own numbers. df 31 and 120 lie beyond the old 30-row table that jumped to 1.96.
PUBLISHED_T = {1: (6.314, 12.706, 63.657), 2: (2.920, 4.303, 9.925), 30: (1.697, 2.042, 2.750),
               31: (1.696, 2.040, 2.744), 120: (1.658, 1.980, 2.617)}


@pytest.mark.parametrize("df", sorted(PUBLISHED_T))
@pytest.mark.parametrize("column,level", [(0, 0.90), (1, 0.95), (2, 0.99)])
def test_t_quantile_matches_published_tables(df, column, level):
    assert t_quantile(level, df) == pytest.approx(PUBLISHED_T[df][column], abs=6e-4)


def test_t_quantile_refuses_what_has_no_quantile():
    for level, df in ((1.0, 3), (0.0, 3), (0.95, 0)):
        with pytest.raises(ValueError):
            t_quantile(level, df)


def test_confidence_interval_is_the_t_interval_over_seeds():
    low, high = confidence_interval([0.80, 0.84, 0.88])
    half = PUBLISHED_T[2][1] * 0.04 / 3 ** 0.5
    assert low == pytest.approx(0.84 - half, abs=1e-4) and high == pytest.approx(0.84 + half, abs=1e-4)
    # 32 seeds: 31 degrees of freedom, where the old table gave the normal's 1.96 instead of t's 2.040.
    values = [0.80 + 0.01 * (i % 5) for i in range(32)]
    import statistics
    low, high = confidence_interval(values)
    half = PUBLISHED_T[31][1] * statistics.stdev(values) / 32 ** 0.5
    assert (high - low) / 2 == pytest.approx(half, rel=3e-4)
    low99, high99 = confidence_interval([0.80, 0.84, 0.88], level=0.99)
    assert (high99 - low99) / 2 == pytest.approx(PUBLISHED_T[2][2] * 0.04 / 3 ** 0.5, rel=1e-4)
    assert confidence_interval([0.8]) is None


@pytest.mark.parametrize("task,metric", [("panx", "f1"), ("panx", "f1_strict"), ("panx", "accuracy"),
                                         ("udpos", "accuracy")])
def test_sentence_counts_give_back_the_reported_score(task, metric):
    gold, pred = _tags(GOLDEN / f"{task}-gold.tsv"), _tags(GOLDEN / f"{task}-pred.tsv")
    stats = sentence_stats(gold, pred, metric)
    assert float(score_from_sums(stats.sum(axis=0), metric)) == pytest.approx(
        score_task(get_task(task), gold, pred)[metric], abs=1e-12)


def test_paired_bootstrap_is_seeded_and_tells_noise_from_a_difference():
    gold, pred = _tags(GOLDEN / "panx-gold.tsv"), _tags(GOLDEN / "panx-pred.tsv")
    a, b = sentence_stats(gold, gold, "f1"), sentence_stats(gold, pred, "f1")
    r = paired_bootstrap(a, b, "f1", n_resamples=2000, seed=3)
    assert r["a"] == 1.0 and r["delta"] > 0.5 and r["p_value"] < 0.01 and r["ci_low"] > 0
    assert paired_bootstrap(a, b, "f1", n_resamples=2000, seed=3) == r
    same = paired_bootstrap(b, b, "f1", n_resamples=500)
    assert same["delta"] == 0 and same["p_value"] == 1.0
    # One sentence of difference in 24 is not significant.
    pred_one = [list(g) for g in gold]
    pred_one[0] = ["O"] * len(pred_one[0])
    close = paired_bootstrap(a, sentence_stats(gold, pred_one, "f1"), "f1", n_resamples=2000)
    assert 0 < close["delta"] < 0.1 and close["p_value"] > 0.05


def _write_eval(folder: Path, name: str, task: str, langs: dict) -> Path:
    from topro.evaluate import results_record, write_results

    languages = {lang: {"accuracy": 0.0, "f1": 0.0, "n_sentences": len(p["gold"]), "n_words": 1,
                        "n_truncated_words": 0, "predictions": p} for lang, p in langs.items()}
    return write_results(folder / f"{name}.json", results_record(task, name, "tiny", languages))


def test_compare_cli_marks_significant_languages_and_refuses_mismatches(tmp_path, capsys):
    from topro.cli import main

    gold, pred = _tags(GOLDEN / "panx-gold.tsv"), _tags(GOLDEN / "panx-pred.tsv")
    digests = [f"d{i}" for i in range(len(gold))]
    good = {"digests": digests, "gold": gold, "pred": gold}
    noisy = {"digests": digests, "gold": gold, "pred": pred}
    a = _write_eval(tmp_path, "topro", "panx", {"de": good, "fr": noisy})
    b = _write_eval(tmp_path, "vanilla", "panx", {"de": noisy, "fr": noisy})
    assert (tmp_path / "topro.predictions.json").is_file()
    assert main(["compare", str(a), str(b), "--resamples", "2000", "--output", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    de = next(line for line in out.splitlines() if line.startswith("| de "))
    fr = next(line for line in out.splitlines() if line.startswith("| fr "))
    assert de.endswith("| * |") and fr.endswith("|  |")  # fr: the same predictions, p = 1
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["languages"]["fr"]["p_value"] == 1.0 and result["n_resamples"] == 2000

    other_task = _write_eval(tmp_path, "pos", "udpos", {"de": good})
    assert main(["compare", str(a), str(other_task)]) == 2
    assert "different tasks" in capsys.readouterr().err
    shifted = _write_eval(tmp_path, "shifted", "panx", {"de": {**noisy, "digests": ["x"] + digests[1:]},
                                                         "fr": noisy})
    assert main(["compare", str(a), str(shifted)]) == 2
    assert "evaluated different 'de' sentences (sentence 0 differs)" in capsys.readouterr().err
    fewer = _write_eval(tmp_path, "fewer", "panx", {"de": noisy})
    assert main(["compare", str(a), str(fewer)]) == 2
    assert "has no predictions for language 'fr'" in capsys.readouterr().err
    assert main(["compare", str(a), str(fewer), "--langs", "de", "--resamples", "200"]) == 0

    # A topro train output folder stands for its eval.json; a folder without one is named.
    run_a, run_b, empty = tmp_path / "run_a", tmp_path / "run_b", tmp_path / "empty"
    for run, name in ((run_a, "topro"), (run_b, "vanilla")):
        run.mkdir()
        for suffix in (".json", ".predictions.json"):
            (run / f"eval{suffix}").write_text((tmp_path / f"{name}{suffix}").read_text().replace(
                f'"{name}.predictions.json"', '"eval.predictions.json"'))
    empty.mkdir()
    assert main(["compare", str(run_a), str(run_b), "--resamples", "2000"]) == 0
    assert next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| de ")).endswith("| * |")
    assert main(["compare", str(run_a), str(empty)]) == 2
    assert f"{empty}: a folder without eval.json" in capsys.readouterr().err


def test_pooled_seeds_compare_over_sentences():
    gold = [["NOUN"] * 4 for _ in range(30)]
    right = {"digests": list(range(30)), "gold": gold, "pred": gold}
    wrong = {"digests": list(range(30)), "gold": gold, "pred": [["VERB"] * 4 for _ in range(30)]}
    seeds_a = [Predictions("udpos", "a", {"de": right}), Predictions("udpos", "a", {"de": wrong})]
    seeds_b = [Predictions("udpos", "b", {"de": wrong})] * 2
    result = compare_predictions(seeds_a, seeds_b, "accuracy", n_resamples=300)
    assert result["languages"]["de"]["a"] == 0.5 and result["n_seeds_a"] == 2
    with pytest.raises(ComparisonError, match="different tasks"):
        compare_predictions(seeds_a, [Predictions("panx", "c", {"de": wrong})], "accuracy")


def test_compare_names_the_direction_and_ends_with_the_language_average(tmp_path, capsys):
    """Δ is A − B (a better B shows negative, and the header says so); the last table row is the mean over
    languages with its interval, which lies between the languages' own differences here."""
    from topro.cli import main

    gold = [["NOUN"] * 4 for _ in range(40)]
    half = [["NOUN", "NOUN", "VERB", "VERB"] for _ in range(40)]
    digests = list(range(40))
    a = _write_eval(tmp_path, "a", "udpos", {"de": {"digests": digests, "gold": gold, "pred": half},
                                             "fr": {"digests": digests, "gold": gold, "pred": half}})
    b = _write_eval(tmp_path, "b", "udpos", {"de": {"digests": digests, "gold": gold, "pred": gold},
                                             "fr": {"digests": digests, "gold": gold, "pred": half}})
    assert main(["compare", str(a), str(b), "--resamples", "500", "--output", str(tmp_path / "c.json")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert "| Δ (A − B) |" in rows[0] and "| A: " in rows[0] and "| B: " in rows[0]
    assert rows[1].startswith("| de | 50.0 | 100.0 | -50.0 |")  # B better: negative
    assert rows[-1].startswith("| **avg of 2** | 50.0 | 75.0 | -25.0 |") and rows[-1].endswith("| * |")
    average = json.loads((tmp_path / "c.json").read_text())["average"]
    assert average["delta"] == pytest.approx(-0.25) and average["ci_low"] <= -0.25 <= average["ci_high"]
