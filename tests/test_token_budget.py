"""One token budget, ``max_tokens_per_batch``, from the evaluate config down to batching."""
from __future__ import annotations

import json

import pytest

import topro.evaluate
from topro.batching import EVALUATION_MAX_TOKENS_PER_BATCH, default_max_tokens_per_batch
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
