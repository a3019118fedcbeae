"""Sentence-level classification (task kind ``classification``): encoding per method, metrics, the registry's
per-kind classes and the pre-checks (fast tier), and ``topro train`` + ``topro evaluate`` on the PAN-X-derived
``panx_type`` task end to end (slow tier)."""
import json
import math

import numpy as np
import pytest
import torch

from topro.config import ConfigError, TrainConfig, from_dict
from topro.data import get_task, load_split
from topro.data.classification import TextExample, as_sentence, derive_panx_entity_types
from topro.metrics import class_scores, generalized_scores, score_task, selection_metrics

TASK = "panx_type"
LABELS = ["PER", "ORG", "LOC"]


def spec(method: str, model: str, **extra):
    from topro.methods import MethodSpec

    return MethodSpec(method=method, task=TASK, labels=LABELS, base_model=model, **extra)


def texts(*pairs):
    return [as_sentence(TextExample(text, label, "en", f"t:{i}")) for i, (text, label) in enumerate(pairs)]


@pytest.fixture(scope="module")
def panx_type_dir(tmp_path_factory, data_dir):
    """``panx_type`` derived from the real PAN-X files of en and de (train and dev; ~8 s)."""
    out = tmp_path_factory.mktemp("panx_type")
    derive_panx_entity_types(data_dir, out, splits=("train", "dev"), langs=["en", "de"])
    return out


@pytest.fixture(scope="module")
def panx_type_dev_de(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("panx_type_dev")
    derive_panx_entity_types(data_dir, out, splits=("dev",), langs=["de"])
    return out


# -- metrics ---------------------------------------------------------------------------------------------------

def test_class_scores_by_hand():
    gold = ["PER", "PER", "ORG", "LOC", "LOC", "LOC"]
    pred = ["PER", "ORG", "ORG", "LOC", "PER", "LOC"]
    scores = class_scores(gold, pred)
    per = scores["per_class"]
    # PER: 1 hit of 2 predicted, 2 gold; ORG: 1 of 2, 1 gold; LOC: 2 of 2, 3 gold
    assert per["PER"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert per["ORG"]["f1"] == pytest.approx(2 / 3) and per["LOC"]["f1"] == pytest.approx(0.8)
    assert scores["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    # a class in neither gold nor prediction is left out; one predicted but never gold counts with F1 0
    assert class_scores(["PER", "ORG"], ["PER", "ORG"])["macro_f1"] == 1.0
    assert class_scores(["PER", "PER"], ["PER", "LOC"])["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_score_task_and_generalized_scores_on_texts():
    task = get_task(TASK)
    gold = [["PER"], ["ORG"], ["LOC"], ["LOC"]]
    pred = [["PER"], ["LOC"], ["LOC"], ["PER"]]
    scores = score_task(task, gold, pred)
    assert scores["accuracy"] == 0.5 and "xtreme_seqeval_f1" not in scores and "f1" not in scores
    assert scores["macro_f1"] == pytest.approx(class_scores(["PER", "ORG", "LOC", "LOC"],
                                                            ["PER", "LOC", "LOC", "PER"])["macro_f1"])
    g = generalized_scores(task, gold, pred, ["LOC"])
    assert g["accuracy_seen_labels"] == 0.5 and g["accuracy_unseen_labels"] == 0.5
    assert g["accuracy_hmean_labels"] == 0.5 and g["n_unseen_label_words"] == 2
    assert selection_metrics(task) == ["accuracy", "macro_f1"]


# -- data --------------------------------------------------------------------------------------------------------

def test_load_split_gives_one_unit_sentences(panx_type_dev_de):
    sentences = load_split(TASK, "de", "dev", panx_type_dev_de, limit=5)
    lines = (panx_type_dev_de / TASK / "dev-de.tsv").read_text().splitlines()[:5]
    assert [(s.words, s.tags) for s in sentences] == [([t], [label]) for t, label in (x.rsplit("\t", 1) for x in lines)]
    assert sentences[0].source.endswith("dev-de.tsv:1") and sentences[0].lang == "de"


def test_classification_template_asks_no_word(tmp_path, monkeypatch):
    from topro.prompts import registry

    (tmp_path / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ntemplates:\n  bad:\n    question: \"{{word}} is a {{mask}} .\"\n")
    monkeypatch.setenv("TOPRO_PROMPTS_PATH", str(tmp_path))
    registry._prompts.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"template 'bad' needs a 'question' holding \{mask\} and no \{word\}"):
            registry.get_template(TASK, "bad")
    finally:
        registry._prompts.cache_clear()


# -- the registry's per-kind classes and the pre-checks ---------------------------------------------------------

def test_registry_names_a_classification_class_per_method():
    from topro.method_registry import METHOD_REGISTRY
    from topro.methods.classification import TextCloze, TextClozeRoSPrompt, TextClozeSoft, TextVanilla

    found = {name: METHOD_REGISTRY[name].implementation("masked", "classification")
             for name in ("topro", "topro_soft", "rosprompt", "vanilla")}
    assert found == {"topro": TextCloze, "topro_soft": TextClozeSoft, "rosprompt": TextClozeRoSPrompt,
                     "vanilla": TextVanilla}
    with pytest.raises(ValueError, match="'prompt_tuning' has no classification form; classification tasks take"):
        METHOD_REGISTRY["prompt_tuning"].implementation("masked", "classification")
    with pytest.raises(ValueError, match="runs on masked LMs only; this backbone is causal"):
        METHOD_REGISTRY["topro"].implementation("causal", "classification")
    assert METHOD_REGISTRY["topro"].implementation("masked").__name__ == "ToProMLM"  # token tasks as before


@pytest.mark.parametrize("overrides,needle", [
    ({"method": "prompt_tuning"}, "method 'prompt_tuning' has no classification form"),
    ({"method": "topro", "prompt_packing": "sentence"}, "asks one question per text, so there is nothing to pack"),
    ({"method": "vanilla", "unseen_labels": ["LOC"]}, "classification head"),
    ({"method": "rosprompt", "unseen_labels": ["LOC", "PER"]}, "leaves 1 of the 3 labels"),
    ({"method": "rosprompt", "unseen_labels": ["MISC"]}, r"\['MISC'\] is not among the labels"),
])
def test_bad_classification_settings_stop_before_training(overrides, needle):
    from topro.precheck import check_names

    with pytest.raises(ConfigError, match=needle):
        check_names(from_dict(TrainConfig, {"task": TASK, **overrides}))


def test_a_classification_task_on_a_causal_lm_stops_before_a_model_loads():
    from llm_tiny import tiny_model_dir

    from topro.precheck import check_backbone

    cfg = from_dict(TrainConfig, {"task": TASK, "method": "topro", "model": str(tiny_model_dir("gemma3"))})
    with pytest.raises(ConfigError, match="classification task: its methods run on masked LMs only so far; .* causal LM"):
        check_backbone(cfg)


def test_llm_evaluation_of_a_classification_task_takes_topro_formats_only():
    from topro.precheck import check_llm

    with pytest.raises(ConfigError, match="classification task .* takes a topro-style format .* not 'sentence'"):
        check_llm(task=TASK, model="x", format="sentence", langs="en")


def test_llm_prompt_of_a_text_is_one_question_about_it():
    from topro.prompts.formats import render_topro, task_prompt

    prompt = task_prompt(get_task(TASK), "topro")
    assert prompt.label_words == {"PER": "person", "ORG": "organisation", "LOC": "location"}
    assert prompt.context == "Named entity type: location organisation person\n"
    rendered = render_topro(prompt.fmt, TASK, prompt.label_words, prompt.context, ["Angela Merkel sprach ."])
    assert rendered.sentence == "Text: Angela Merkel sprach .\n"
    assert rendered.questions == ["The named entities of this text are a kind of:"]
    assert rendered.answers == {"PER": " person", "ORG": " organisation", "LOC": " location"}


@pytest.mark.slow
def test_eval_llm_on_a_classification_task(tmp_path, panx_type_dir, capsys):
    """`topro eval-llm` on panx_type with a tiny Gemma 3: one scored question per text; accuracy and
    macro-F1 add up from the per-class counts of the gold texts."""
    from llm_tiny import tiny_model_dir

    from topro.cli import main

    out = tmp_path / "llm.json"
    assert main(["eval-llm", "--task", TASK, "--model", str(tiny_model_dir("gemma3")), "--langs", "de,en",
                 "--max-sentences", "6", "--shots", "1", "--no-ray", "--threads", "1", "--data-dir",
                 str(panx_type_dir), "--output", str(out), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 0
    record = json.loads(out.read_text())
    gold = {lang: [s.tags for s in load_split(TASK, lang, "dev", panx_type_dir, limit=6)] for lang in ("de", "en")}
    for lang in ("de", "en"):
        r = record["languages"][lang]
        assert r["n_sentences"] == r["n_words"] == 6 and r["format_failure_rate"] == 0.0
        # the per-class counts are those of the 6 gold texts, and the scores add up from them
        assert {c: v["support"] for c, v in r["per_class"].items() if v["support"]} == \
            {c: sum(g == [c] for g in gold[lang]) for c in {g[0] for g in gold[lang]}}
        assert sum(r["predicted_label_counts"].values()) == 6
        hits = sum(v["recall"] * v["support"] for v in r["per_class"].values())
        assert r["accuracy"] == pytest.approx(hits / 6)
        assert r["macro_f1"] == pytest.approx(sum(v["f1"] for v in r["per_class"].values()) / len(r["per_class"]))


# -- encoding (tiny XLM-R with a real sentencepiece tokenizer: "person", "organisation", "location" whole) -----

def test_cloze_encoding_one_prompt_per_text(tiny_xlmr):
    from topro.methods import build_method

    method = build_method(spec("topro", tiny_xlmr, max_length=48), tiny_xlmr)
    tok, layout = method.tokenizer, method.layout
    short, long = "Angela Merkel spoke .", " ".join(["Paris"] * 80)
    examples = method.encode(texts((short, "PER"), (long, "LOC")))
    assert len(examples) == 2 and [e.words for e in examples] == [[0], [0]]
    question = tok("The named entities of this text are a kind of: <mask> .", add_special_tokens=False)["input_ids"]
    text = tok(short, add_special_tokens=False)["input_ids"]
    assert examples[0].input_ids == layout.lead + text + layout.middle + question + layout.suffix
    assert examples[0].input_ids[examples[0].positions[0]] == tok.mask_token_id
    assert examples[0].labels == [0] and examples[1].labels == [2] and not examples[0].trimmed_context
    # a long text keeps its beginning; the question and its mask are never cut
    cut = examples[1]
    assert cut.length == 48 and cut.trimmed_context and cut.input_ids[-len(question) - len(layout.suffix):] == \
        question + layout.suffix
    long_ids = tok(long, add_special_tokens=False)["input_ids"]
    n_text = 48 - layout.pair_overhead - len(question)
    assert n_text > 0
    assert cut.input_ids[len(layout.lead):len(layout.lead) + n_text] == long_ids[:n_text]


def test_cloze_scores_equal_the_full_vocabulary_reference_in_float64(tiny_xlmr):
    """The label-restricted head at the text's mask = the full MLM logits read at that position (float64)."""
    from topro.methods import build_method
    from topro.methods.topro_mlm import full_vocab_label_logits

    method = build_method(spec("topro", tiny_xlmr), tiny_xlmr)
    torch.manual_seed(0)
    model = method.build_model(tiny_xlmr).double().eval()
    batch = method.collate(method.encode(texts(("Angela Merkel spoke .", "PER"), ("Die Stadt Paris", "LOC"),
                                               ("Siemens AG", "ORG"))))
    with torch.no_grad():
        ours = method.label_log_probs(model, batch)
        ref = torch.log_softmax(full_vocab_label_logits(model, batch, method.label_ids), dim=-1)
    assert ours.shape == (3, 3) and ours.dtype == torch.float64
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)


def test_soft_prompt_question_per_text(tiny_xlmr):
    from topro.methods import build_method

    for name in ("topro_soft", "rosprompt"):
        method = build_method(spec(name, tiny_xlmr, prefix_length=6, verbalizer_expansion="none"), tiny_xlmr)
        examples = method.encode(texts(("Angela Merkel spoke .", "PER")))
        batch = method.collate(examples)
        soft = batch["soft_index"][0]
        # the question's text became 6 soft vectors (5 before the mask, 1 after, by token counts); the text is
        # kept as it is and the mask sits between the soft runs
        assert (soft >= 0).sum() == 6 and sorted(soft[soft >= 0].tolist()) == list(range(6))
        mask_at = examples[0].positions[0]
        assert batch["input_ids"][0, mask_at] == method.tokenizer.mask_token_id
        model = method.build_model(tiny_xlmr).eval()
        with torch.no_grad():
            lp = method.label_log_probs(model, batch)
        assert lp.shape == (1, 3) and torch.allclose(lp.exp().sum(-1), torch.ones(1))


def test_vanilla_reads_the_text_with_a_sequence_classification_head(tiny_xlmr):
    from topro.methods import build_method

    method = build_method(spec("vanilla", tiny_xlmr, max_length=10), tiny_xlmr)
    model = method.build_model(tiny_xlmr).eval()
    assert type(model).__name__ == "XLMRobertaForSequenceClassification" and model.config.num_labels == 3
    examples = method.encode(texts(("Angela Merkel spoke .", "PER"), (" ".join(["Paris"] * 30), "LOC")))
    assert [e.length for e in examples][1] == 10 and examples[1].trimmed_context and examples[1].labels == [2]
    batch = method.collate(examples)
    with torch.no_grad():
        lp = method.label_log_probs(model, batch)
        direct = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    assert torch.allclose(lp, direct)
    with torch.no_grad():
        loss = method.loss(model, batch)
    assert math.isclose(float(loss), float(-(direct[0, 0] + direct[1, 2]) / 2), rel_tol=1e-5)


# -- end to end (slow) ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("rosprompt", ["unseen_labels=[LOC]", "verbalizer=multilingual", "shots_per_label=null", "epochs=2"]),
    ("vanilla", ["epochs=1"]),
])
def test_train_then_evaluate_panx_type(tmp_path, panx_type_dir, method, extra, capsys):
    from topro.cli import main

    out = tmp_path / "run"
    assert main(["train", "--config", f"configs/train/panx_type-{'rosprompt' if method == 'rosprompt' else 'vanilla'}.yaml",
                 "--data-dir", str(panx_type_dir), "--output", str(out), "max_train_sentences=60",
                 "max_dev_sentences=30", "eval_langs=[]", "progress=false", "learning_rate=3e-3", *extra]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selection_metric"] == "accuracy" and metrics["n_train_sentences"] == 60
    result = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint"), "--langs", "de,en", "--data-dir",
                 str(panx_type_dir), "--max-sentences", "20", "--output", str(result)]) == 0
    table = capsys.readouterr().out
    assert "| lang | accuracy | macro_f1 | texts | trimmed texts |" in table
    record = json.loads(result.read_text())
    predictions = json.loads((tmp_path / "eval.predictions.json").read_text())
    for lang in ("de", "en"):
        r = record["languages"][lang]
        stored = predictions["languages"][lang]
        assert r["n_sentences"] == 20 and all(len(g) == 1 for g in stored["gold"])
        again = score_task(get_task(TASK), stored["gold"], stored["pred"])
        assert r["accuracy"] == pytest.approx(again["accuracy"]) and r["macro_f1"] == pytest.approx(again["macro_f1"])
    if method == "rosprompt":
        de = record["languages"]["de"]
        assert record["unseen_labels"] == ["LOC"] and de["n_unseen_label_words"] == sum(
            g == ["LOC"] for g in predictions["languages"]["de"]["gold"])
        assert {"accuracy_seen_labels", "accuracy_unseen_labels", "accuracy_hmean_labels"} <= set(de)
        assert metrics["n_train_unseen_label_words"] > 0  # LOC texts were in the data and carried no loss
        assert "label_words" in record


# -- serving (Ray-free) ---------------------------------------------------------------------------------------------

def test_tagger_classifies_texts_and_refuses_the_other_kind(tmp_path, tiny_xlmr):
    from topro.data import get_task
    from topro.evaluate import predict
    from topro.methods import MethodSpec, build_method
    from topro.serving import Tagger, WrongKindError

    def checkpoint(task: str) -> str:
        method = build_method(MethodSpec(method="topro", task=task, labels=list(get_task(task).labels),
                                         base_model=tiny_xlmr), tiny_xlmr)
        torch.manual_seed(0)
        method.save(method.build_model(tiny_xlmr), tmp_path / task)
        return str(tmp_path / task)

    tagger = Tagger.load(checkpoint(TASK), "cls", device="cpu")
    assert tagger.kind == "classification"
    units = texts(("Angela Merkel spoke .", "PER"), ("Die Stadt Paris", "LOC"))
    out = tagger.classify([as_sentence(TextExample(s.words[0], "", "de")) for s in units])
    expected = [p.log_probs[0] for p in predict(tagger.method, tagger.model, units)]
    for result, log_probs, unit in zip(out, expected, units):
        assert result.text == unit.words[0] and result.lang == "de" and not result.trimmed
        assert list(result.scores) == LABELS and result.label == LABELS[int(log_probs.argmax())]
        assert [result.scores[k] for k in LABELS] == pytest.approx(np.exp(log_probs).tolist(), abs=1e-6)
        assert result.prob == max(result.scores.values()) and sum(result.scores.values()) == pytest.approx(1, abs=1e-5)
    with pytest.raises(WrongKindError, match="is a classification model .* send its requests to POST /classify"):
        tagger.tag(units)
    tagging = Tagger.load(checkpoint("panx"), "ner", device="cpu")
    with pytest.raises(WrongKindError, match="is a tagging model .* send its requests to POST /tag"):
        tagging.classify(units)


@pytest.mark.parametrize("body,status,needle", [
    ({"texts": []}, 422, "texts: send at least one text"),
    ({"texts": ["a", "b", "c"]}, 413, "texts: 3 texts in one request; the limit is 2"),
    ({"text": "   "}, 422, "text: empty or whitespace-only text"),
    ({"texts": ["ok", "one two three four five six"]}, 413, "texts[1]: 6 words; the limit is 5 words per text"),
    ({"texts": ["x" * 11]}, 413, "texts[0]: a word of 11 characters; the limit is 10"),
    ({"text": "bad \ud800"}, 422, "text: character 4 (U+D800) cannot be encoded as UTF-8"),
])
def test_classify_request_limits_name_the_text(body, status, needle):
    from topro.endpoint.schemas import ClassifyRequest, Limits, RequestProblem, check_text_limits

    with pytest.raises(RequestProblem) as err:
        check_text_limits(ClassifyRequest(**body), Limits(max_sentences=2, max_words=5, max_word_chars=10))
    assert err.value.status == status and needle in err.value.message
    with pytest.raises(ValueError, match="send exactly one of 'texts'"):
        ClassifyRequest(texts=["a"], text="b")


# -- serving over real HTTP (slow: Ray Serve) ------------------------------------------------------------------------

@pytest.fixture
def classify_url(ray_local, tiny_panx, tmp_path_factory):
    """The ``tagging`` app on 127.0.0.1 with an (untrained) ``panx_type`` topro checkpoint as ``default`` and a
    PAN-X tagging one as ``ner``, both over the tiny PAN-X BERT; Serve is shut down after the test, so its
    replica's CPU is free for the sweep test on the same 2-CPU Ray."""
    import os
    from pathlib import Path

    from net import serve_on_free_port
    from ray import serve as ray_serve

    from topro.endpoint.tagging import make_app
    from topro.methods import MethodSpec, build_method

    repo = Path(__file__).resolve().parent.parent
    folders = {}
    for task in (TASK, "panx"):
        method = build_method(MethodSpec(method="topro", task=task, labels=list(get_task(task).labels),
                                         base_model=tiny_panx), tiny_panx)
        folders[task] = tmp_path_factory.mktemp(task)
        method.save(method.build_model(tiny_panx), folders[task])
    actor = {"num_cpus": 1, "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join([str(repo), str(repo / "platform")])}}}
    app = make_app({"model": str(folders[TASK]), "models": {"ner": str(folders["panx"])}, "max_sentences": 3,
                    "max_words": 10, "max_word_chars": 20, "max_call_words": 10, "max_batch_size": 8},
                   {"Tagger": {"num_replicas": 1, "ray_actor_options": actor}})
    url = serve_on_free_port(lambda port: ray_serve.run(app, name="classify", route_prefix="/"))
    yield url
    ray_serve.shutdown()


@pytest.mark.slow
def test_classify_route_over_http(classify_url):
    import requests

    from topro.endpoint.schemas import ClassifyResponse

    body = {"texts": ["Angela Merkel sprach in Berlin .", "Siemens AG baut Züge ."], "lang": "de"}
    r = requests.post(f"{classify_url}/classify", json=body, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    ClassifyResponse.model_validate(answer)  # the documented response schema
    assert answer["model"]["task"] == TASK and answer["model"]["method"] == "topro"
    assert [t["text"] for t in answer["texts"]] == body["texts"]
    for t in answer["texts"]:
        assert t["lang"] == "de" and list(t["scores"]) == LABELS and t["label"] in LABELS
        assert t["prob"] == max(t["scores"].values()) and sum(t["scores"].values()) == pytest.approx(1, abs=1e-4)
    # more words than one model call takes (max_call_words 10): split into chunks, the same answer per text
    many = {"texts": ["Angela Merkel sprach in Berlin .", "Siemens AG baut Züge .", "Paris"]}
    r = requests.post(f"{classify_url}/classify", json=many, timeout=120)
    assert r.status_code == 200 and r.json()["batch"]["chunks"] == 2
    assert r.json()["texts"][:2] == [{**t, "lang": None} for t in answer["texts"]]

    bad = [({"texts": []}, 422, "texts: send at least one text"),
           ({"texts": ["a", "b", "c", "d"]}, 413, "the limit is 3"),
           ({"text": " "}, 422, "text: empty or whitespace-only text"),
           ({"sentences": [["a"]]}, 422, "unknown field"),
           ({"text": "Berlin", "lang": "xx"}, 422, "lang: 'xx' is not a language of task 'panx_type'"),
           ({"text": "bad \ud800"}, 422, "cannot be encoded as UTF-8")]
    for request_body, status, needle in bad:
        r = requests.post(f"{classify_url}/classify", json=request_body, timeout=60)
        assert r.status_code == status and needle in r.json()["detail"], (request_body, r.status_code, r.text)
    # each route refuses a model of the other kind, saying which route to use
    r = requests.post(f"{classify_url}/tag", json={"text": "Angela Merkel"}, timeout=60)
    assert r.status_code == 422 and "send its requests to POST /classify" in r.json()["detail"]
    r = requests.post(f"{classify_url}/classify", json={"text": "Angela Merkel"}, timeout=120,
                      headers={"serve_multiplexed_model_id": "ner"})
    assert r.status_code == 422 and "send its requests to POST /tag" in r.json()["detail"]
    assert requests.post(f"{classify_url}/tag", json={"text": "Angela Merkel"}, timeout=120,
                         headers={"serve_multiplexed_model_id": "ner"}).status_code == 200
    assert requests.get(f"{classify_url}/healthz", timeout=30).json()["status"] == "ok"


# -- the sweep and the report ----------------------------------------------------------------------------------------

def test_report_shows_generalized_zero_shot_columns():
    from topro.reports import generalized_table

    def record(setting, seed, seen, unseen, hmean, n):
        return {"task": TASK, "method": "rosprompt", "setting": setting, "seed": seed, "unseen_labels": ["LOC"],
                "average": {"accuracy": 0.5, "accuracy_seen_labels": seen, "accuracy_unseen_labels": unseen,
                            "accuracy_hmean_labels": hmean, "n_unseen_label_words": n}}

    plain = {"task": "panx", "method": "vanilla", "average": {"f1": 0.4}}  # no unseen labels: not in the table
    table = generalized_table([record("knn", 1, 0.8, 0.2, 0.32, 30.0), record("knn", 2, 0.6, 0.4, 0.48, 30.0),
                               plain])
    assert "### panx_type: generalized zero-shot (accuracy, %" in table and "panx:" not in table
    assert "| knn | LOC | 2 | 70.0 ± 14.1 | 30.0 ± 14.1 | 40.0 ± 11.3 | 30.0 |" in table
    assert generalized_table([plain]) == ""


def test_the_shipped_classification_configs_pass_the_prechecks(tmp_path, data_dir):
    """The sweep and train configs of panx_type load and pass every check `topro sweep` / `train` run first."""
    from topro.config import load_config
    from topro.precheck import check_sweep, check_train
    from topro.sweep_config import load_sweep_config

    derive_panx_entity_types(data_dir, tmp_path, splits=("train", "dev"), langs=["en"])
    sweep = load_sweep_config("configs/sweeps/panx_type-unseen.yaml", [f"base.data_dir={tmp_path}", "eval_langs=[en]"])
    check_sweep(sweep)
    for name in ("rosprompt", "vanilla"):
        check_train(load_config(TrainConfig, f"configs/train/panx_type-{name}.yaml",
                                [f"data_dir={tmp_path}", "eval_langs=[en]"]))


@pytest.mark.slow
def test_a_sweep_over_a_classification_task_and_its_report(tmp_path, panx_type_dir, ray_local, capsys):
    """A real sweep (Tune over Ray Train trials, MLflow in SQLite) on panx_type with LOC unseen: trials are
    selected on English dev accuracy, evaluated with accuracy, macro-F1 and seen / unseen / hmean, and the
    report prints the generalized zero-shot table."""
    from topro import tracking
    from topro.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"base.data_dir={panx_type_dir}", "base.max_train_sentences=60", "base.max_dev_sentences=20",
                 "base.epochs=1", "base.shots_per_label=null", "base.verbalizer_expansion=none", "seeds=[1]",
                 "eval_langs=[de]", "max_sentences=10", f"storage_path={tmp_path / 'sweeps'}", "base.max_failures=0"]
    summary_path = tmp_path / "summary.json"
    assert main(["sweep", "--config", "configs/sweeps/panx_type-unseen.yaml", "--tracking-uri", uri,
                 "--summary", str(summary_path), *overrides]) == 0
    summary = json.loads(summary_path.read_text())
    assert [t["status"] for t in summary["trials"]] == ["TERMINATED", "TERMINATED"]
    for trial in summary["trials"]:
        average = trial["average"]
        assert {"accuracy", "macro_f1", "accuracy_seen_labels", "accuracy_hmean_labels"} <= set(average)
        assert 0 <= trial["dev_score"] <= 1
    capsys.readouterr()
    tracking.configure(uri)
    assert main(["report", "--sweep", "panx_type-unseen", "--tracking-uri", uri, "--out-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "### panx_type (accuracy, %" in out and "### panx_type: generalized zero-shot (accuracy, %" in out
    assert "| LOC | 1 |" in out


# -- SIB-200: its task spec, prompts and the hub rows' reading (the hub itself is not reachable here) -------------

def test_sib200_rows_read_as_texts():
    from topro.data.loading import _hub_text
    from topro.data.readers import DataFormatError
    from topro.prompts import get_template, get_verbalizer

    task = get_task("sib200")
    assert task.kind == "classification" and task.hub.path == "Davlan/sib200" and task.hub.splits == {"dev": "validation"}
    allowed = set(task.labels)
    row = {"index_id": 7, "category": "travel", "text": " The train to Lyon leaves at noon . "}
    s = _hub_text(task, row, "eng_Latn", "Davlan/sib200/eng_Latn[validation]", 3, None, allowed)
    assert (s.words, s.tags, s.lang, s.source) == (["The train to Lyon leaves at noon ."], ["travel"], "eng_Latn",
                                                   "Davlan/sib200/eng_Latn[validation]#3")
    names = list(task.labels)  # a ClassLabel column gives indices
    assert _hub_text(task, {**row, "category": 3}, "x", "w", 0, names, allowed).tags == ["sports"]
    with pytest.raises(DataFormatError, match=r"w row 5: unknown label 'weather'; allowed labels"):
        _hub_text(task, {**row, "category": "weather"}, "x", "w", 5, None, allowed)
    with pytest.raises(DataFormatError, match=r"w row 6: empty text \(label 'travel'\)"):
        _hub_text(task, {**row, "text": "  "}, "x", "w", 6, None, allowed)
    assert get_template("sib200").question == "The topic of this text is: {mask} ."
    assert get_verbalizer("sib200", "multilingual").seed_words("science/technology")[0] == "science"
