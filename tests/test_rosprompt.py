"""RoSPrompt: kNN verbalizers, label smoothing, drift penalty, few-shot sampling, zero-step prompting."""
import json
import math
from pathlib import Path

import pytest
import torch

from topro.config import ConfigError, TrainConfig, from_dict
from topro.data import get_task, load_split
from topro.data.sampling import few_shot_sentences
from topro.methods import MethodSpec, build_method, load_checkpoint
from topro.methods.rosprompt import aggregate_label_scores, smoothing_targets

REPO = Path(__file__).resolve().parent.parent


def make(method, path, task="udpos", **extra):
    spec = MethodSpec(method=method, task=task, labels=list(get_task(task).labels), base_model=path,
                      base_model_path=path, **extra)
    return build_method(spec, path)


# -- pure parts ---------------------------------------------------------------------------------------------

def test_contrastive_smoothing_with_equal_similarities_is_exactly_uniform():
    gold = torch.tensor([0, 3, 4])
    equal = torch.full((5, 5), 0.37, dtype=torch.float64)
    uniform = smoothing_targets(gold, equal, 0.2, "uniform")
    contrastive = smoothing_targets(gold, equal, 0.2, "contrastive", temperature=0.1)
    assert torch.equal(uniform, contrastive)
    assert torch.equal(uniform[0], torch.tensor([0.8, 0.05, 0.05, 0.05, 0.05], dtype=torch.float64))


def test_contrastive_smoothing_follows_the_similarities():
    sim = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]], dtype=torch.float64)
    target = smoothing_targets(torch.tensor([0]), sim, 0.3, "contrastive", temperature=0.5)[0]
    w1, w2 = math.exp(0.9 / 0.5), math.exp(0.1 / 0.5)
    expected = torch.tensor([0.7, 0.3 * w1 / (w1 + w2), 0.3 * w2 / (w1 + w2)], dtype=torch.float64)
    torch.testing.assert_close(target, expected, rtol=1e-12, atol=1e-15)
    assert math.isclose(float(target.sum()), 1.0, rel_tol=1e-12)


def test_aggregates_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]], dtype=torch.float64)
    index = torch.tensor([[0, 1, 2], [3, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    torch.testing.assert_close(aggregate_label_scores(logits, index, mask, "mean"),
                               torch.tensor([[2.0, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(aggregate_label_scores(logits, index, mask, "max"),
                               torch.tensor([[3.0, -1.0]], dtype=torch.float64))
    lme = math.log((math.e + math.e ** 3 + math.e ** 2) / 3)
    torch.testing.assert_close(aggregate_label_scores(logits, index, mask, "logsumexp"),
                               torch.tensor([[lme, -1.0]], dtype=torch.float64))


def test_few_shot_sampler_is_seeded_and_refuses_naming_what_it_found(data_dir):
    sentences = load_split("udpos", "en", "train", data_dir, limit=400)
    labels = [l for l in get_task("udpos").labels if l not in ("NUM", "PROPN", "SCONJ")]
    picked = few_shot_sentences(sentences, labels, 2, seed=1)
    counts = {l: sum(t == l for s in picked for t in s.tags) for l in labels}
    assert min(counts.values()) >= 2 and len(picked) < len(sentences) / 4
    assert few_shot_sentences(sentences, labels, 2, seed=1) == picked
    assert few_shot_sentences(sentences, labels, 2, seed=2) != picked
    with pytest.raises(ConfigError, match=r"field 'shots_per_label': 100000 labelled words .* 400 training "
                                          r"sentences hold only \{'ADJ': \d+"):
        few_shot_sentences(sentences, labels, 100000, seed=1)


# -- verbalizers ----------------------------------------------------------------------------------------------

def test_verbalizer_lists_and_plain_strings(tmp_path, monkeypatch):
    from topro.prompts import get_verbalizer
    from topro.prompts import registry

    plain = get_verbalizer("udpos", "topro")
    assert plain.words["NUM"] == "number" and plain.seed_words("NUM") == ("number",)
    listed = get_verbalizer("udpos", "multilingual")
    assert listed.words["NUM"] == "number"  # what ToPro, soft ToPro and the LLM formats read: a string
    assert listed.seed_words("NUM") == ("number", "numeral", "Zahl", "número")
    labels = get_task("panx").labels
    bad = {label: f"w{i}" for i, label in enumerate(labels)} | {"O": []}
    (tmp_path / "panx.yaml").write_text(json.dumps({"verbalizers": {"broken": bad}}))
    monkeypatch.setenv("TOPRO_PROMPTS_PATH", str(tmp_path))
    registry._prompts.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"panx.yaml: verbalizer 'broken': tag 'O' needs a word or a non-empty"):
            get_verbalizer("panx", "broken")
    finally:
        monkeypatch.delenv("TOPRO_PROMPTS_PATH")
        registry._prompts.cache_clear()


def test_tiny_cache_key_covers_every_added_word(tmp_path, monkeypatch, data_dir):
    from topro.models import tiny_model_dir, tiny_vocabulary_words
    from topro.prompts import registry

    before = tiny_vocabulary_words("panx")
    assert {"Nachname", "lugar", "person"} <= set(before)  # seeds of the list verbalizer are added too
    labels = get_task("panx").labels
    extra = {label: [f"label{i}", f"seedword{i}"] for i, label in enumerate(labels)}
    (tmp_path / "panx.yaml").write_text(json.dumps({"verbalizers": {"extra": extra}}))
    monkeypatch.setenv("TOPRO_PROMPTS_PATH", str(tmp_path))
    registry._prompts.cache_clear()
    try:
        after = tiny_vocabulary_words("panx")
        assert set(after) - set(before) == {f"label{i}" for i in range(7)} | {f"seedword{i}" for i in range(7)}
        assert tiny_model_dir("panx", str(data_dir), after) != tiny_model_dir("panx", str(data_dir), before)
        # only a second seed word changes: still another model
        extra["O"] = ["label0", "otherseed"]
        (tmp_path / "panx.yaml").write_text(json.dumps({"verbalizers": {"extra": extra}}))
        registry._prompts.cache_clear()
        assert tiny_model_dir("panx", str(data_dir), tiny_vocabulary_words("panx")) != \
            tiny_model_dir("panx", str(data_dir), after)
    finally:
        monkeypatch.delenv("TOPRO_PROMPTS_PATH")
        registry._prompts.cache_clear()
    assert tiny_model_dir("panx", str(data_dir), tiny_vocabulary_words("panx")) == \
        tiny_model_dir("panx", str(data_dir), before)


# -- the method on real tiny models -----------------------------------------------------------------------------

@pytest.mark.parametrize("packing", ["per_word", "sentence"])
@pytest.mark.parametrize("family", ["tiny_udpos", "tiny_xlmr"])
def test_without_its_ingredients_rosprompt_is_soft_topro(request, family, packing, data_dir):
    """float64: no expansion, one seed word per label, no smoothing, no penalty: the same label scores and
    loss as soft ToPro, one prompt per word and packed per sentence alike."""
    path = request.getfixturevalue(family)
    torch.manual_seed(0)
    ros = make("rosprompt", path, prefix_length=8, prompt_packing=packing)
    soft = make("topro_soft", path, prefix_length=8, prompt_packing=packing)
    ros_model, soft_model = ros.build_model(path).double(), soft.build_model(path).double()
    assert ros.word_sets == [[i] for i in soft.cloze.label_ids.tolist()]
    rows = ros.encode(load_split("udpos", "de", "dev", data_dir, limit=3))
    assert (len(rows) == 3) == (packing == "sentence")  # one row per sentence when packed
    batch = ros.collate(rows)
    torch.testing.assert_close(ros.label_log_probs(ros_model, batch), soft.label_log_probs(soft_model, batch),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ros.loss(ros_model, batch).double(), soft.loss(soft_model, batch).double(), rtol=1e-6,
                               atol=1e-7)


def test_knn_words_seeds_and_k(tiny_udpos):
    method = make("rosprompt", tiny_udpos, verbalizer="multilingual", verbalizer_expansion="knn", knn_k=5)
    model = method.build_model(tiny_udpos)
    tok = method.tokenizer
    assert all(len(words) == 5 for words in method.word_sets)
    assert not set(tok.all_special_ids) & {t for words in method.word_sets for t in words}
    # a seed that is one token has cosine 1 with itself: it is among its label's words
    noun = method.labels.index("NOUN")
    assert tok.convert_tokens_to_ids("thing") in method.word_sets[noun]
    # the k nearest by max cosine over the seeds, checked against a direct computation
    table = model.mlm.get_input_embeddings().weight.detach()
    seeds = [tok.convert_tokens_to_ids(w) for w in ("thing", "noun", "Substantiv", "sustantivo")]
    sims = torch.nn.functional.normalize(table[seeds], dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    best = sims.max(0).values
    best[tok.all_special_ids] = -math.inf
    assert set(best.topk(5).indices.tolist()) == set(method.word_sets[noun])
    words = method.readable_label_words()
    assert words["NOUN"][0] in ("thing", "noun", "Substantiv", "sustantivo")


def test_knn_k_larger_than_the_vocabulary_is_refused(tiny_udpos):
    method = make("rosprompt", tiny_udpos, verbalizer_expansion="knn", knn_k=10 ** 6)
    with pytest.raises(ValueError, match=r"field 'knn_k': knn_k=1000000 is more than the \d+ tokens"):
        method.build_model(tiny_udpos)


def test_unseen_label_word_near_a_seen_label_is_warned(tiny_udpos, caplog):
    method = make("rosprompt", tiny_udpos, unseen_labels=["NUM"])
    method.build_model(tiny_udpos)
    num, noun = method.labels.index("NUM"), method.labels.index("NOUN")
    method.word_sets[noun] = method.word_sets[noun] + [method.tokenizer.convert_tokens_to_ids("number")]
    messages = method.warn_unseen_overlap()
    assert messages == ["unseen label 'NUM': its label word(s) ['number'] are also kNN neighbours of the seen "
                        "label 'NOUN', which trains them"]
    assert messages[0] in caplog.text
    assert num not in method.seen_index.tolist()


def test_drift_penalty_formula(tiny_udpos, data_dir):
    torch.manual_seed(0)
    method = make("rosprompt", tiny_udpos, prefix_length=8, prompt_drift_penalty=0.5)
    model = method.build_model(tiny_udpos).double()
    assert float(method.drift_penalty(model).detach()) == 0.0
    init = model.prompt_init.clone()
    with torch.no_grad():
        model.soft_prompt.add_(0.1)
    expected = 0.5 * float(((model.soft_prompt.detach() - init) ** 2).sum() / (init ** 2).sum())
    assert math.isclose(float(method.drift_penalty(model).detach()), expected, rel_tol=1e-12)
    batch = method.collate(method.encode(load_split("udpos", "en", "train", data_dir, limit=2)))
    plain = make("rosprompt", tiny_udpos, prefix_length=8)
    plain_model = plain.build_model(tiny_udpos).double()
    plain_model.load_state_dict(model.state_dict())
    torch.testing.assert_close(method.loss(model, batch) - plain.loss(plain_model, batch),
                               torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_smoothing_in_the_loss_matches_the_formula(tiny_udpos, data_dir):
    torch.manual_seed(0)
    method = make("rosprompt", tiny_udpos, prefix_length=8, label_smoothing=0.2, unseen_labels=["NUM", "X"])
    model = method.build_model(tiny_udpos).double()
    batch = method.collate([e for e in method.encode(load_split("udpos", "en", "train", data_dir, limit=3))
                            if method.labels[e.labels[0]] not in ("NUM", "X")])
    seen = method.seen_index
    scores = method.label_scores(model, batch).float()[:, seen]
    gold = torch.tensor([seen.tolist().index(l) for l in batch["labels"].tolist()])
    target = smoothing_targets(gold, method.label_similarity[seen][:, seen].float(), 0.2, "contrastive", 0.1)
    expected = -(target * torch.log_softmax(scores, -1)).sum(-1).mean()
    torch.testing.assert_close(method.loss(model, batch), expected)


def test_checkpoint_keeps_the_chosen_words(tiny_udpos, tmp_path, data_dir):
    torch.manual_seed(0)
    method = make("rosprompt", tiny_udpos, verbalizer="multilingual", verbalizer_expansion="knn", knn_k=3,
                  knn_aggregate="logsumexp")
    model = method.build_model(tiny_udpos)
    method.save(model, tmp_path)
    meta = json.loads((tmp_path / "topro.json").read_text())
    assert meta["method"] == "rosprompt" and meta["label_token_sets"] == method.word_sets
    assert meta["label_word_sets"]["NOUN"] == method.tokenizer.convert_ids_to_tokens(method.word_sets[method.labels.index("NOUN")])
    loaded_method, loaded = load_checkpoint(tmp_path)
    assert loaded_method.word_sets == method.word_sets
    batch = method.collate(method.encode(load_split("udpos", "tr", "dev", data_dir, limit=2)))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded_method.label_log_probs(loaded, batch), method.label_log_probs(model, batch))


# -- configuration and the command line -----------------------------------------------------------------------

def test_settings_of_rosprompt_are_refused_elsewhere_and_zero_epochs_only_for_it():
    with pytest.raises(ConfigError, match="field 'label_smoothing': applies to method 'rosprompt' only"):
        from_dict(TrainConfig, {"method": "topro_soft", "label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="field 'verbalizer_expansion': applies to method 'rosprompt' only"):
        from_dict(TrainConfig, {"method": "topro", "verbalizer_expansion": "knn"})
    with pytest.raises(ConfigError, match="field 'epochs': must be at least 1, got 0"):
        from_dict(TrainConfig, {"method": "topro", "epochs": 0})
    assert from_dict(TrainConfig, {"method": "rosprompt", "epochs": 0}).epochs == 0
    with pytest.raises(ConfigError, match="field 'label_smoothing': must be in"):
        from_dict(TrainConfig, {"method": "rosprompt", "label_smoothing": 1.0})


@pytest.mark.parametrize("overrides,needle", [
    (["shots_per_label=100000"], "field 'shots_per_label': 100000 labelled words per label asked for, but the"),
    (["knn_k=1000000"], "field 'knn_k': 1000000 is more than the"),
    (["unseen_labels=[PER,ORG,LOC]"], "field 'unseen_labels'"),
    (["unseen_labels=[FOO]"], "field 'unseen_labels': ['FOO'] is not among"),
])
def test_bad_input_stops_before_training(tmp_path, capsys, monkeypatch, overrides, needle, tiny_panx):
    from topro.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["train", "--config", str(REPO / "configs/train/panx-rosprompt.yaml"), "--output",
                 str(tmp_path / "run"), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err.splitlines()[-1], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_zero_steps_is_zero_shot_prompting_and_evaluate_shows_the_words(tmp_path, data_dir, capsys):
    """``epochs: 0``: no optimizer step, the initial prompt is scored on English dev, exported and evaluated;
    ``topro evaluate`` prints each label's words."""
    from topro.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", str(REPO / "configs/train/udpos-rosprompt.yaml"), "--data-dir",
                 str(data_dir), "--output", str(out), "epochs=0", "max_train_sentences=20", "max_dev_sentences=5",
                 "eval_langs=[]", "progress=false", "shots_per_label=null", "knn_k=3"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 0 and len(metrics["history"]) == 1
    assert set(metrics["label_word_sets"]) == set(get_task("udpos").labels)
    capsys.readouterr()
    code = main(["evaluate", "--checkpoint", str(out / "checkpoint"), "--langs", "de", "--data-dir", str(data_dir),
                 "--max-sentences", "5", "--output", str(tmp_path / "eval.json")])
    printed = capsys.readouterr().out
    assert code == 0 and "Label words: ADJ: " in printed and "accuracy_unseen_labels" in printed
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["label_words"] == metrics["label_word_sets"]


@pytest.mark.slow
def test_few_shot_training_run(tmp_path, data_dir):
    """The shipped PAN-X config: few-shot sample, kNN words, smoothing and penalty, a few steps end to end."""
    from topro.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", str(REPO / "configs/train/panx-rosprompt.yaml"), "--data-dir", str(data_dir),
                 "--output", str(out), "max_steps=4", "max_dev_sentences=10", "eval_langs=[de]", "max_sentences=10",
                 "progress=false"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["n_train_sentences"] < 200
    assert metrics["n_trainable_params"] == 16 * 64  # the soft prompt only
