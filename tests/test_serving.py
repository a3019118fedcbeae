"""The Ray-free serving core: unlabelled input through every method, Tagger, model catalogue, request checks."""
import math

import numpy as np
import pytest

from topro.data import load_split
from topro.data.readers import Sentence


def _unlabelled(sentences):
    return [Sentence(s.words, [], s.lang) for s in sentences]


@pytest.mark.parametrize("method_name,model_fixture", [("topro", "tiny_udpos"), ("vanilla", "tiny_udpos"),
                                                       ("topro", "tiny_mt5")])
def test_unlabelled_sentences_get_the_same_predictions_as_labelled_ones(request, data_dir, method_name,
                                                                        model_fixture):
    """Serving input has no tags (tags=[]): every method must encode and predict it unchanged."""
    from topro.data import get_task
    from topro.evaluate import predict
    from topro.methods import MethodSpec, build_method

    path = request.getfixturevalue(model_fixture)
    method = build_method(MethodSpec(method=method_name, task="udpos", labels=list(get_task("udpos").labels),
                                     base_model="test"), path)
    model = method.build_model(path).double().eval()
    labelled = load_split("udpos", "de", "dev", data_dir, limit=3)
    unlabelled = _unlabelled(labelled)
    examples = method.encode(unlabelled)
    assert all(label == -100 for e in examples for label in e.labels)
    got = predict(method, model, unlabelled, dtype="fp64")
    want = predict(method, model, labelled, dtype="fp64")
    for g, w, s in zip(got, want, labelled):
        assert g.log_probs.shape == (len(s), 17) and not np.isnan(g.log_probs).any()
        np.testing.assert_allclose(g.log_probs, w.log_probs, atol=1e-5)


def test_tagger_tags_with_probabilities_from_a_trained_checkpoint(tiny_topro_checkpoint, data_dir):
    from topro.serving import Tagger

    tagger = Tagger.load(str(tiny_topro_checkpoint), "default")
    assert (tagger.info.task, tagger.info.method, tagger.info.id) == ("udpos", "topro", "default")
    sentences = _unlabelled(load_split("udpos", "de", "dev", data_dir, limit=5))
    tagged = tagger.tag(sentences)
    assert len(tagged) == 5
    for out, s in zip(tagged, sentences):
        assert [w.word for w in out.words] == s.words and out.lang == "de"
        assert all(w.tag in tagger.info.labels and 0.0 < w.prob <= 1.0 for w in out.words)
    # one call for many sentences gives what one call per sentence gives (batching changes nothing)
    alone = [tagger.tag([s])[0] for s in sentences[:2]]
    for a, b in zip(alone, tagged[:2]):
        assert [w.tag for w in a.words] == [w.tag for w in b.words]
        assert all(math.isclose(x.prob, y.prob, abs_tol=1e-4) for x, y in zip(a.words, b.words))
    assert tagger.tag([]) == []


def test_tagger_token_budget_defaults_by_device_and_changes_no_prediction(tiny_topro_checkpoint, data_dir):
    from topro.serving import Tagger

    assert Tagger.load(str(tiny_topro_checkpoint), device="cpu").max_tokens == 2048
    sentences = _unlabelled(load_split("udpos", "de", "dev", data_dir, limit=12))
    outputs = []
    for budget in (256, 8192):
        tagger = Tagger.load(str(tiny_topro_checkpoint), device="cpu", max_tokens=budget)
        assert tagger.max_tokens == budget
        outputs.append(tagger.tag(sentences))
    small, large = outputs
    for a, b in zip(small, large):
        assert [w.tag for w in a.words] == [w.tag for w in b.words]
        assert all(math.isclose(x.prob, y.prob, abs_tol=1e-4) for x, y in zip(a.words, b.words))


def test_tagger_span_task_decodes_valid_iob2_and_marks_truncated_words(untrained_checkpoint):
    from topro.serving import Tagger

    words = "Angela Merkel besuchte gestern die Universität von Paris und sprach mit vielen Studenten .".split()
    # By default a long sentence is read in overlapping windows: every word is tagged.
    [whole] = Tagger.load(str(untrained_checkpoint("panx", "vanilla", max_length=12))).tag([Sentence(words, [])])
    assert whole.n_truncated_words == 0 and all(w.prob is not None for w in whole.words)
    folder = untrained_checkpoint("panx", "vanilla", max_length=12, long_sentences="truncate")
    tagger = Tagger.load(str(folder))
    [out] = tagger.tag([Sentence(words, [])])
    tags = [w.tag for w in out.words]
    for prev, tag in zip(["O"] + tags, tags):  # viterbi: no I-X after O or another type
        assert not tag.startswith("I-") or prev[2:] == tag[2:]
    assert out.n_truncated_words > 0
    cut = out.words[-out.n_truncated_words:]
    assert all(w.prob is None and w.tag == "O" for w in cut)
    assert all(w.prob is not None for w in out.words[:-out.n_truncated_words])


def test_catalogue_resolves_configured_ids_and_registered_models_only(model_registry):
    from topro.serving import DEFAULT_MODEL_ID, ModelCatalogue, UnknownModelError

    catalogue = ModelCatalogue("/ckpt/a", {"panx": "/ckpt/b"}, allow_registry_ids=["models:/topro-udpos-*"])
    assert catalogue.uri_for(None) == catalogue.uri_for(DEFAULT_MODEL_ID) == "/ckpt/a"
    assert catalogue.uri_for("panx") == "/ckpt/b"
    assert catalogue.uri_for(model_registry["model"]) == model_registry["model"]
    assert catalogue.uri_for("models:/topro-udpos-topro/1") == "models:/topro-udpos-topro/1"
    for bad, reason in [("nope", "unknown model id 'nope'"), ("/etc/passwd", "unknown model id"),
                        ("models:/topro-udpos-topro@nope", "not in the model registry"),
                        ("models:/missing@champion", "unknown model id 'models:/missing@champion'; known ids"),
                        ("x" * 500, "...")]:
        with pytest.raises(UnknownModelError, match=reason.replace(".", r"\.")):
            catalogue.uri_for(bad)
    closed = ModelCatalogue("/ckpt/a")  # the default: no registry id beyond the configured ones
    with pytest.raises(UnknownModelError, match="known ids: \\['default'\\]$"):
        closed.uri_for(model_registry["model"])
    configured = ModelCatalogue("/ckpt/a", {"udpos": model_registry["model"]})
    assert configured.uri_for(model_registry["model"]) == model_registry["model"]  # named by its URI too
    with pytest.raises(UnknownModelError):
        configured.uri_for("models:/topro-udpos-topro/1")


def test_tagger_loads_from_the_registry_and_names_the_run(model_registry):
    from topro.serving import Tagger

    tagger = Tagger.load(model_registry["model"])
    info = tagger.info
    assert info.run_id == model_registry["run_id"] and info.registered_model == "topro-udpos-topro"
    assert info.version == str(model_registry["version"]) and info.task == "udpos"


def test_an_alias_is_read_once_and_a_move_is_noticed(model_registry):
    from mlflow import MlflowClient

    from topro.serving import Tagger, alias_moved
    from topro.tracking import register_checkpoint

    name = "topro-alias-moves"
    first = str(register_checkpoint(model_registry["run_id"], name, "staging"))
    tagger = Tagger.load(f"models:/{name}@staging")
    assert tagger.info.version == first and tagger.info.uri == f"models:/{name}@staging"
    assert alias_moved(tagger.info) is None
    second = str(register_checkpoint(model_registry["run_id"], name, alias=None))
    assert alias_moved(tagger.info) is None  # a new version alone moves nothing
    MlflowClient().set_registered_model_alias(name, "staging", second)
    assert alias_moved(tagger.info) == second
    assert alias_moved(Tagger.load(f"models:/{name}/{first}").info) is None  # a pinned version never moves


def test_a_missing_alias_or_model_is_refused_when_the_app_is_built(model_registry, tiny_topro_checkpoint):
    from topro.endpoint.tagging import make_app

    uri = model_registry["uri"]
    with pytest.raises(ValueError, match=r"args\.model: models:/topro-udpos-topro@nope: the model registry at "
                                         r"sqlite:.* has no alias 'nope' of registered model 'topro-udpos-topro'"):
        make_app({"model": "models:/topro-udpos-topro@nope", "tracking_uri": uri})
    with pytest.raises(ValueError, match=r"args\.models\.other: models:/no-such-model/3: the model registry .* "
                                         r"has no 'models:/no-such-model/3'"):
        make_app({"model": str(tiny_topro_checkpoint), "models": {"other": "models:/no-such-model/3"},
                  "tracking_uri": uri})


@pytest.mark.parametrize("body,status,message", [
    ({"sentences": []}, 422, "sentences: send at least one sentence"),
    ({"sentences": [["a"], []]}, 422, "sentences[1]: a sentence needs at least one word"),
    ({"text": "  \n "}, 422, "text: a sentence needs at least one word (the text is empty"),
    ({"sentences": [["a", " "]]}, 422, "sentences[0][1]: empty or whitespace-only word"),
    ({"sentences": [["a"]] * 5}, 413, "sentences: 5 sentences in one request; the limit is 4"),
    ({"sentences": [["a"] * 11]}, 413, "sentences[0]: 11 words; the limit is 10 words per sentence"),
    ({"text": "ok " + "x" * 21}, 413, "text[1]: a word of 21 characters; the limit is 20"),
])
def test_request_limits_name_the_problem(body, status, message):
    from topro.endpoint.schemas import Limits, RequestProblem, TagRequest, check_limits

    with pytest.raises(RequestProblem) as err:
        check_limits(TagRequest.model_validate(body), Limits(max_sentences=4, max_words=10, max_word_chars=20))
    assert err.value.status == status and err.value.message.startswith(message)


@pytest.mark.parametrize("body,message", [
    ({"sentences": [["a", 3]]}, "sentences[0][1]: Input should be a valid string"),
    ({"sentences": "a b"}, "sentences: Input should be a valid list"),
    ({"sentence": [["a"]]}, "sentence: unknown field"),
    ({}, "send exactly one of 'sentences'"),
    ({"text": "a", "sentences": [["a"]]}, "send exactly one of 'sentences'"),
    ({"text": "a", "lang": "German!"}, "lang: expected a language code"),
])
def test_request_shape_errors_are_one_readable_line(body, message):
    from pydantic import ValidationError

    from topro.endpoint.schemas import TagRequest, describe_validation_errors

    with pytest.raises(ValidationError) as err:
        TagRequest.model_validate(body)
    assert message in describe_validation_errors(err.value.errors())


def test_a_relative_tracking_uri_in_a_serve_config_resolves_against_the_config_folder(tmp_path,
                                                                                    tiny_topro_checkpoint):
    from topro.cli.serve import build_applications

    config = {"applications": [{"name": "tagging", "route_prefix": "/", "import_path": "serve.tagging:build_app",
                                "args": {"model": str(tiny_topro_checkpoint), "tracking_uri": "sqlite:///db/mlflow.db"}}]}
    [(name, _, app)] = build_applications(config, config_dir=tmp_path / "configs")
    args = app._bound_deployment.init_args[0]
    assert name == "tagging" and args["tracking_uri"] == f"sqlite:///{tmp_path / 'configs' / 'db' / 'mlflow.db'}"
    assert args["allow_registry_ids"] == []  # the default: no registry id beyond the configured ones


# Moved from test_serve_http.py: the batching of tag_requests over the real Tagger, no Serve needed.
def test_a_request_the_model_cannot_take_fails_alone_and_its_batch_is_answered(tiny_topro_checkpoint):
    """Beyond validation: the real tagger fails on one request's sentences inside a shared model call; that
    request alone fails (422, the others succeeded alone), the others get the tags they get on their own."""
    import asyncio

    from topro.endpoint.tagging import tag_requests
    from topro.data.readers import Sentence
    from topro.serving import Tagger

    tagger = Tagger.load(str(tiny_topro_checkpoint))
    first, second = [Sentence(["Das", "ist", "gut"], [])], [Sentence(["Berlin"], []), Sentence(["ja", "."], [])]
    poison = [Sentence(["a", "\ud800"], [])]  # what validation refuses; here it reaches the tokenizer
    outcomes = asyncio.run(tag_requests(tagger.tag, [first, poison, second], "default"))
    assert [o.status for o in outcomes] == [200, 422, 200], outcomes
    assert "could not tag these sentences: TypeError" in outcomes[1].error and outcomes[1].tagged is None
    alone = tagger.tag(first + second)
    assert [[(w.word, w.tag) for w in s.words] for o in (outcomes[0], outcomes[2]) for s in o.tagged] == \
        [[(w.word, w.tag) for w in s.words] for s in alone]
    [only] = asyncio.run(tag_requests(tagger.tag, [poison], "default"))
    assert only.status == 500 and only.error.startswith("tagging failed: TypeError")  # nothing to compare with
