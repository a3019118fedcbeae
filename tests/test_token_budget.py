"""One token budget name, ``max_tokens_per_batch``, from the configs down to batching; evaluation's own
(``eval_max_tokens_per_batch`` of training and sweeps) apart from training's."""
from __future__ import annotations

import json

import pytest

import topro.evaluate
from topro.batching import EVALUATION_MAX_TOKENS_PER_BATCH, MAX_EXAMPLES, default_max_tokens_per_batch
from topro.cli import main
from topro.config import ConfigError, load_config


def test_the_defaults_live_in_batching():
    from topro.cli.evaluate import EvaluateConfig

    assert EvaluateConfig().max_tokens_per_batch == EVALUATION_MAX_TOKENS_PER_BATCH == 8192  # today's value
    assert (default_max_tokens_per_batch("cpu"), default_max_tokens_per_batch("cuda:0")) == (2048, 8192)
    with pytest.raises(ConfigError, match="max_tokens_per_batch"):
        load_config(EvaluateConfig, None, ["checkpoint=c", "output=o.json", "max_tokens_per_batch=0"])


def test_evaluate_takes_the_budget_down_to_batching(monkeypatch, tmp_path, tiny_topro_checkpoint, data_dir):
    """``--max-tokens-per-batch`` and ``max_tokens_per_batch=`` reach ``token_budget_batches``; the scores do
    not depend on it (fp64: padding a row more or less changes no prediction)."""
    budgets = []
    real = topro.evaluate.token_budget_batches

    def recording(lengths, max_tokens_per_batch, max_examples, **kw):
        budgets.append(max_tokens_per_batch)
        return real(lengths, max_tokens_per_batch, max_examples, **kw)

    monkeypatch.setattr(topro.evaluate, "token_budget_batches", recording)
    records = {}
    for flag in (["--max-tokens-per-batch", "256"], ["max_tokens_per_batch=8192"]):
        out = tmp_path / f"{flag[-1].rsplit('=')[-1]}.json"
        assert main(["evaluate", "--checkpoint", str(tiny_topro_checkpoint), "--langs", "en,de", "--data-dir",
                     str(data_dir), "--max-sentences", "8", "--dtype", "fp64", "--output", str(out), *flag]) == 0
        records[flag[-1]] = json.loads(out.read_text())
    assert budgets == [256, 256, 8192, 8192]  # one prediction per language
    small, large = (records[k]["languages"] for k in ("256", "max_tokens_per_batch=8192"))
    for lang in ("en", "de"):
        assert small[lang]["accuracy"] == large[lang]["accuracy"]
        assert small[lang]["n_words"] == large[lang]["n_words"] > 0


def _recording_budgets(monkeypatch) -> list[tuple[int, int]]:
    """(max_tokens_per_batch, max_examples) of every evaluation batching call from now on."""
    calls = []
    real = topro.evaluate.token_budget_batches

    def recording(lengths, max_tokens_per_batch, max_examples, **kw):
        calls.append((max_tokens_per_batch, max_examples))
        return real(lengths, max_tokens_per_batch, max_examples, **kw)

    monkeypatch.setattr(topro.evaluate, "token_budget_batches", recording)
    return calls


@pytest.mark.parametrize("given,dev,eval_langs", [([], 2 * 1000, EVALUATION_MAX_TOKENS_PER_BATCH),
                                                  (["eval_max_tokens_per_batch=300"], 300, 300)])
def test_train_takes_the_evaluation_budget_to_dev_and_eval_langs(monkeypatch, tmp_path, data_dir, given, dev,
                                                                 eval_langs):
    """``max_tokens_per_batch`` is the training budget; ``eval_max_tokens_per_batch`` (default: today's 2x
    the training budget for dev, 8192 for ``eval_langs``) is what the evaluations batch with."""
    calls = _recording_budgets(monkeypatch)
    out = tmp_path / "run"
    assert main(["train", "--config", "configs/train/udpos-topro.yaml", "--data-dir", str(data_dir), "--output",
                 str(out), "max_train_sentences=8", "max_dev_sentences=4", "epochs=1", "batch_size=8",
                 "max_tokens_per_batch=1000", "eval_langs=[de]", "max_sentences=4", "progress=false",
                 *given]) == 0
    dev_calls, eval_langs_calls = [c for c in calls if c[1] == 8 * 4], [c for c in calls if c[1] != 8 * 4]
    assert dev_calls and all(budget == dev for budget, _ in dev_calls)  # dev: batch_size x 4 examples
    assert eval_langs_calls == [(eval_langs, MAX_EXAMPLES)]  # one language
    assert json.loads((out / "eval.json").read_text())["languages"]["de"]["n_sentences"] == 4


def test_the_evaluation_budget_is_checked_and_named_apart_from_the_training_one():
    from topro.config import TrainConfig

    assert TrainConfig().eval_max_tokens_per_batch is None
    assert (TrainConfig().dev_max_tokens_per_batch(), TrainConfig().eval_langs_max_tokens_per_batch()) == \
        (2 * 4096, 8192)  # today's values
    assert TrainConfig(eval_max_tokens_per_batch=512).dev_max_tokens_per_batch() == 512
    with pytest.raises(ConfigError, match="eval_max_tokens_per_batch"):
        load_config(TrainConfig, None, ["eval_max_tokens_per_batch=0"])


def test_the_evaluation_actor_batches_with_its_budget(monkeypatch, tiny_topro_checkpoint, data_dir):
    """What a sweep's evaluation actors run, built in-process (no Ray): the budget reaches batching, and the
    scores are those of the sequential path (fp64)."""
    from topro.cluster.evaluation import LanguageEvaluator

    calls = _recording_budgets(monkeypatch)
    options = {"data_dir": str(data_dir), "split": "dev", "max_sentences": 6, "viterbi": True}
    small = LanguageEvaluator(dtype="fp64", max_tokens_per_batch=256).evaluate(str(tiny_topro_checkpoint),
                                                                              "udpos", "de", options)
    default = LanguageEvaluator(dtype="fp64").evaluate(str(tiny_topro_checkpoint), "udpos", "de", options)
    assert [budget for budget, _ in calls] == [256, EVALUATION_MAX_TOKENS_PER_BATCH]
    assert small["node"] == "local"
    assert small["result"]["accuracy"] == default["result"]["accuracy"]
    assert small["result"]["n_words"] == default["result"]["n_words"] > 0
