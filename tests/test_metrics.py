import itertools

import numpy as np
import pytest

from topro.data import get_task
from topro.metrics import accuracy, iob2_transition_mask, score_task, viterbi_iob2

PANX = get_task("panx")


def test_span_f1_is_strict_iob2():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "I-LOC"]]  # I-LOC after O opens no entity in strict IOB2
    scores = score_task(PANX, gold, pred)
    assert scores["precision"] == 1.0 and scores["recall"] == 0.5
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["per_type"]["LOC"]["recall"] == 0.0
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
