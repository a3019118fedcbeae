import itertools

import numpy as np
import pytest

from topro.data import get_task
from topro.metrics import accuracy, fallback_label, iob2_transition_mask, score_task, viterbi_iob2

PANX = get_task("panx")


def test_span_f1_default_mode_headline_and_strict_beside_it():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "I-LOC"]]  # I-LOC after O: a LOC span for conlleval, none in strict IOB2
    scores = score_task(PANX, gold, pred)
    assert scores["f1"] == 1.0 and scores["per_type"]["LOC"]["recall"] == 1.0
    assert scores["precision_strict"] == 1.0 and scores["recall_strict"] == 0.5
    assert scores["f1_strict"] == pytest.approx(2 / 3)
    assert scores["per_type_strict"]["LOC"]["recall"] == 0.0
    assert scores["accuracy"] == 0.75


def test_udpos_reports_accuracy_and_xtreme_f1_separately():
    scores = score_task(get_task("udpos"), [["NOUN", "VERB", "DET"]], [["NOUN", "VERB", "NOUN"]])
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert "xtreme_seqeval_f1" in scores and "f1" not in scores


def test_unaligned_predictions_are_refused():
    with pytest.raises(ValueError, match="reassemble"):
        score_task(PANX, [["O", "O"]], [["O"]])


def _valid(seq):
    allowed, start = iob2_transition_mask(PANX.labels)
    return start[seq[0]] and all(allowed[a, b] for a, b in zip(seq, seq[1:]))


def test_viterbi_matches_brute_force_over_valid_sequences():
    rng = np.random.default_rng(0)
    n_labels = len(PANX.labels)
    for _ in range(5):
        lp = np.log(rng.dirichlet(np.ones(n_labels), size=4))
        best = max((s for s in itertools.product(range(n_labels), repeat=4) if _valid(s)),
                   key=lambda s: sum(lp[i, j] for i, j in enumerate(s)))
        assert viterbi_iob2(lp, PANX.labels) == list(best)


def test_accuracy():
    assert accuracy([["a", "b"], ["c"]], [["a", "x"], ["c"]]) == pytest.approx(2 / 3)


# --- golden tests: fixed gold/prediction files, topro's scores against seqeval called directly -------------

GOLDEN = __import__("pathlib").Path(__file__).parent / "golden"


def _read_plain(path):
    """An independent reader: blank-line separated ``word<TAB>tag`` blocks -> tag lists."""
    blocks = path.read_text().strip().split("\n\n")
    return [[line.split("\t")[1] for line in block.splitlines()] for block in blocks]


def test_golden_panx_both_f1_modes_equal_seqeval_and_differ():
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    from topro.evaluate import score_files

    gold, pred = _read_plain(GOLDEN / "panx-gold.tsv"), _read_plain(GOLDEN / "panx-pred.tsv")
    scores = score_files("panx", GOLDEN / "panx-gold.tsv", GOLDEN / "panx-pred.tsv")
    default = f1_score(gold, pred)  # seqeval's default: conlleval-style, what XTREME's run_tag.py reports
    strict = f1_score(gold, pred, mode="strict", scheme=IOB2)
    assert scores["f1"] == pytest.approx(default, abs=1e-12)
    assert scores["precision"] == pytest.approx(precision_score(gold, pred), abs=1e-12)
    assert scores["recall"] == pytest.approx(recall_score(gold, pred), abs=1e-12)
    assert scores["f1_strict"] == pytest.approx(strict, abs=1e-12)
    assert scores["recall_strict"] == pytest.approx(recall_score(gold, pred, mode="strict", scheme=IOB2), abs=1e-12)
    assert abs(default - strict) > 0.02  # the files hold I- tags that open spans: the modes must differ
    for kind in ("PER", "ORG", "LOC"):
        assert scores["per_type"][kind]["f1"] == pytest.approx(
            f1_score(gold, pred, average=None)[["LOC", "ORG", "PER"].index(kind)], abs=1e-12)
    n = sum(len(g) for g in gold)
    assert scores["accuracy"] == pytest.approx(sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p)) / n)
    print(f"golden PAN-X: f1 (seqeval default) {default:.6f}, f1_strict {strict:.6f}")


def test_golden_udpos_accuracy_and_xtreme_f1():
    from seqeval.metrics import f1_score

    from topro.evaluate import score_files

    gold, pred = _read_plain(GOLDEN / "udpos-gold.tsv"), _read_plain(GOLDEN / "udpos-pred.tsv")
    scores = score_files("udpos", GOLDEN / "udpos-gold.tsv", GOLDEN / "udpos-pred.tsv")
    hits = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
    assert scores["accuracy"] == pytest.approx(hits / sum(len(g) for g in gold), abs=1e-12)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        xtreme = f1_score(gold, pred)
    assert scores["xtreme_seqeval_f1"] == pytest.approx(xtreme, abs=1e-12)
    assert abs(scores["accuracy"] - xtreme) > 0.01  # not the same number under another name
    print(f"golden UDPOS: accuracy {scores['accuracy']:.6f}, xtreme_seqeval_f1 {xtreme:.6f}")


def test_selection_metric_is_checked_by_name():
    from topro.config import ConfigError
    from topro.metrics import resolve_selection_metric

    assert resolve_selection_metric(PANX, None) == "f1"
    assert resolve_selection_metric(get_task("udpos"), None) == "accuracy"
    assert resolve_selection_metric(PANX, "f1_strict") == "f1_strict"
    with pytest.raises(ConfigError, match="selection_metric: 'f1_strcit'.*f1_strict"):
        resolve_selection_metric(PANX, "f1_strcit")
    with pytest.raises(ConfigError, match="selection_metric"):
        resolve_selection_metric(get_task("udpos"), "f1")


def test_a_word_without_prediction_takes_one_fallback_rule_in_fine_tuned_and_llm_evaluation():
    from topro.evaluate import SentencePrediction, decode

    udpos = get_task("udpos")
    assert fallback_label("iob2", list(PANX.labels)) == "O"
    assert fallback_label(udpos.scheme, list(udpos.labels)) == "X"
    assert fallback_label("tagging", ["NOUN", "VERB"]) == "NOUN"
    lp = np.full((2, len(PANX.labels)), np.nan)
    lp[0] = np.log(np.eye(len(PANX.labels))[PANX.labels.index("B-PER")] + 1e-9)
    for viterbi in (False, True):
        assert decode(PANX, list(PANX.labels), SentencePrediction(lp, 1, 0), viterbi=viterbi) == ["B-PER", "O"]
