"""Generalized zero-shot labels (``unseen_labels``): checked early, never trained on, scored seen vs unseen."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from topro.config import ConfigError, TrainConfig, from_dict, load_config
from topro.data import get_task, load_split
from topro.metrics import generalized_scores, harmonic_mean
from topro.methods import MethodSpec, build_method
from topro.methods.base import hide_unseen_gold
from topro.unseen import expand_unseen_labels, unseen_label_indices

REPO = Path(__file__).resolve().parent.parent
UDPOS_UNSEEN = ["NUM", "PROPN", "SCONJ"]


def make(method, task, path, **extra):
    spec = MethodSpec(method=method, task=task, labels=list(get_task(task).labels), base_model=path,
                      base_model_path=path, **extra)
    return build_method(spec, path)


def test_entity_types_expand_and_labels_stay_in_task_order():
    assert expand_unseen_labels("panx", ["LOC"]) == ["B-LOC", "I-LOC"]
    assert expand_unseen_labels("panx", ["I-PER", "LOC"]) == ["I-PER", "B-LOC", "I-LOC"]
    assert expand_unseen_labels("udpos", ["SCONJ", "NUM", "PROPN"]) == ["NUM", "PROPN", "SCONJ"]
    assert expand_unseen_labels("udpos", []) == []


@pytest.mark.parametrize("task,names,needle", [
    ("udpos", ["NUM", "LOC"], "['LOC'] is not among the labels"),
    ("panx", ["MISC"], "or entity types ['PER', 'ORG', 'LOC']"),
    ("panx", ["O"], "'O' (outside any entity) cannot be unseen"),
    ("panx", ["PER", "ORG", "LOC"], "leaves 1 of the 7 labels"),
    ("udpos", list(get_task("udpos").labels), "all labels unseen"),
])
def test_bad_unseen_labels_are_refused_naming_the_field(task, names, needle):
    with pytest.raises(ConfigError, match="field 'unseen_labels'") as err:
        expand_unseen_labels(task, names)
    assert needle in str(err.value)


@pytest.mark.parametrize("method", ["vanilla", "prompt_tuning"])
def test_head_methods_are_refused_with_the_reason(method):
    with pytest.raises(ConfigError, match="field 'unseen_labels': .*classification head.*never seen in training"):
        from_dict(TrainConfig, {"method": method, "unseen_labels": ["NUM"]})
    from_dict(TrainConfig, {"method": method})  # without unseen labels nothing changes


def test_harmonic_mean():
    assert harmonic_mean(0.5, 0.5) == 0.5
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(1.0, None) is None
    assert math.isclose(harmonic_mean(0.9, 0.3), 0.45)


def test_generalized_scores_tags_by_hand():
    task = get_task("udpos")
    gold = [["NOUN", "NUM", "VERB"], ["NUM", "PROPN"]]
    pred = [["NOUN", "NUM", "NOUN"], ["NOUN", "PROPN"]]
    s = generalized_scores(task, gold, pred, ["NUM", "PROPN"])
    assert s["accuracy_seen_labels"] == 0.5  # NOUN right, VERB wrong
    assert s["accuracy_unseen_labels"] == 2 / 3  # NUM right, NUM wrong, PROPN right
    assert math.isclose(s["accuracy_hmean_labels"], 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert (s["n_seen_label_words"], s["n_unseen_label_words"]) == (2, 3)
    assert (s["precision_unseen_labels"], s["n_unseen_label_predictions"]) == (1.0, 2)  # NUM and PROPN, both right
    # Predicting an unseen label everywhere: full accuracy on the unseen gold words, and the precision says so.
    everywhere = generalized_scores(task, gold, [["NUM"] * 3, ["NUM"] * 2], ["NUM", "PROPN"])
    assert everywhere["accuracy_unseen_labels"] == 2 / 3 and everywhere["precision_unseen_labels"] == 2 / 5
    none = generalized_scores(task, [["NOUN"]], [["NOUN"]], ["NUM"])
    assert none["accuracy_unseen_labels"] is None and none["accuracy_hmean_labels"] is None
    assert none["precision_unseen_labels"] is None and none["n_unseen_label_predictions"] == 0


def test_generalized_scores_spans_split_by_type():
    task = get_task("panx")
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "O"]]
    s = generalized_scores(task, gold, pred, ["B-LOC", "I-LOC"])
    # Seen types PER, ORG: PER found, ORG missed -> P 1/1, R 1/2, F1 2/3. Unseen LOC: 1 right of 2 predicted.
    assert math.isclose(s["f1_seen_labels"], 2 / 3)
    assert math.isclose(s["f1_unseen_labels"], 2 / 3)
    assert s["n_unseen_label_words"] == 1


def test_training_loss_ignores_unseen_labels_and_their_gold_words(tiny_udpos, data_dir):
    """float64: the loss equals cross-entropy over the seen labels' logits on the seen-gold words only; the
    unseen labels' label words get no gradient through the label scores."""
    torch.manual_seed(0)
    method = make("topro", "udpos", tiny_udpos, unseen_labels=UDPOS_UNSEEN)
    plain = make("topro", "udpos", tiny_udpos)
    model = method.build_model(tiny_udpos).double()
    sentences = load_split("udpos", "en", "train", data_dir, limit=6)
    index = unseen_label_indices(method.labels, UDPOS_UNSEEN)
    examples, hidden = hide_unseen_gold(method.encode(sentences), index)
    all_examples = method.encode(sentences)
    n_unseen_gold = sum(t in UDPOS_UNSEEN for s in sentences for t in s.tags)
    assert hidden == n_unseen_gold > 0
    assert len(examples) == len(all_examples) - n_unseen_gold  # per word: an unseen word's prompt is dropped
    assert all(label not in index for e in examples for label in e.labels)
    batch = method.collate(all_examples)
    keep = torch.tensor([lab not in index for lab in batch["labels"].tolist()])
    seen = torch.tensor([i for i in range(len(method.labels)) if i not in index])
    logits = plain._label_logits(model, batch)
    expected = F.cross_entropy(logits[keep][:, seen], torch.tensor(
        [seen.tolist().index(lab) for lab in batch["labels"][keep].tolist()]))
    # the loss is taken in float32 (ToPro casts its logits); the reference in float64
    torch.testing.assert_close(method.loss(model, method.collate(examples)).double(), expected, rtol=1e-6, atol=1e-7)
    # the decoder rows of unseen label words get no gradient from the loss
    model.zero_grad()
    method.loss(model, method.collate(examples)).backward()
    grad = model.cls.predictions.decoder.weight.grad
    assert grad[method.label_ids[index]].abs().sum() == 0 and grad[method.label_ids[seen]].abs().sum() > 0


def test_dev_selection_predicts_and_scores_seen_labels_only(tiny_panx, data_dir):
    from topro.evaluate import evaluate_seen_labels, evaluate_sentences, predict, seen_label_view

    method = make("topro", "panx", tiny_panx, unseen_labels=["B-LOC", "I-LOC"])
    model = method.build_model(tiny_panx).eval()
    sentences = load_split("panx", "en", "dev", data_dir, limit=20)
    assert any("B-LOC" in s.tags for s in sentences)
    predictions = predict(method, model, sentences)
    view_sentences, view_predictions = seen_label_view(get_task("panx"), method.labels, method.spec.unseen_labels,
                                                       sentences, predictions)
    assert all("LOC" not in t for s in view_sentences for t in s.tags)
    assert all(np.isneginf(p.log_probs[:, 5:]).all() for p in view_predictions)
    dev = evaluate_seen_labels(method, model, "panx", sentences)
    assert "f1_seen_labels" not in dev and "predictions" not in dev
    full = evaluate_sentences(method, model, "panx", sentences)
    assert full["n_unseen_label_words"] == sum(t in ("B-LOC", "I-LOC") for s in sentences for t in s.tags)
    assert set(full) >= {"f1_seen_labels", "f1_unseen_labels", "f1_hmean_labels"}


def test_seq2seq_topro_refuses_unseen_labels(tiny_mt5):
    with pytest.raises(ValueError, match="encoder-decoder .* cannot leave its training softmax"):
        make("topro", "udpos", tiny_mt5, unseen_labels=["NUM"])


@pytest.mark.parametrize("overrides,needle", [
    (["unseen_labels=[MISC]"], "field 'unseen_labels': ['MISC'] is not among the labels"),
    (["unseen_labels=[PER,ORG,LOC]"], "leaves 1 of the 7 labels"),
    (["method=vanilla", "unseen_labels=[LOC]"], "classification head"),
])
def test_train_refuses_bad_unseen_labels_before_work_starts(tmp_path, capsys, monkeypatch, overrides, needle):
    from topro.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["train", "--config", str(REPO / "configs/train/panx-unseen.yaml"), "--output",
                 str(tmp_path / "run"), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err.splitlines()[-1], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_train_then_evaluate_reports_seen_and_unseen(tmp_path, data_dir):
    """A few steps of the shipped PAN-X config (LOC unseen): training hides the LOC words, evaluation
    reports seen / unseen / harmonic mean per language and on average."""
    from topro.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", str(REPO / "configs/train/panx-unseen.yaml"), "--data-dir", str(data_dir),
                 "--output", str(out), "max_train_sentences=30", "max_dev_sentences=10", "epochs=1",
                 "max_steps=3", "eval_langs=[de]", "max_sentences=20", "progress=false"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unseen_labels"] == ["B-LOC", "I-LOC"] and metrics["n_train_unseen_label_words"] > 0
    record = json.loads((out / "eval.json").read_text())
    de = record["languages"]["de"]
    assert de["unseen_labels"] == ["B-LOC", "I-LOC"] and de["n_unseen_label_words"] > 0
    assert {"f1_seen_labels", "f1_unseen_labels", "f1_hmean_labels"} <= set(record["average"])
    meta = json.loads((out / "checkpoint" / "topro.json").read_text())
    assert meta["unseen_labels"] == ["B-LOC", "I-LOC"]
