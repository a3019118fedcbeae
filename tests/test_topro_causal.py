"""ToPro on causal LMs (tiny random Llama and Gemma 3, float64): the training-time scores are eval-llm's,
packed rows give the per-word scores and gradients, and a checkpoint trains, saves, loads and evaluates."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm_tiny import tiny_model_dir
from topro.data import get_task, load_split
from topro.methods import MethodSpec, build_method

KINDS = ["llama", "gemma3"]


def causal_method(kind: str, packing: str = "per_word", **spec):
    task = get_task("udpos")
    path = str(tiny_model_dir(kind))
    fields = dict(method="topro", task="udpos", labels=list(task.labels), base_model=path,
                  verbalizer=task.default_verbalizer, max_length=1024, prompt_packing=packing,
                  max_packed_length=2048)
    method = build_method(MethodSpec(**{**fields, **spec}), path)
    torch.manual_seed(0)
    model = method.build_model(path).to(torch.float64)
    return method, model, path


def sentences(data_dir, n=3):
    return load_split("udpos", "en", "dev", str(data_dir), limit=n)


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_scores_equal_eval_llm_scoring(kind, data_dir):
    """Before any step, the label log-probs training computes are `topro eval-llm --mode score --shots 0`'s
    (its own library function, on the fp64 backend) within 1e-6; the label words span several tokens."""
    from topro.llm.backends import HFBackend
    from topro.llm.evaluate import LLMEvalConfig, predict_sentences, prepare

    method, model, path = causal_method(kind)
    model.eval()
    sents = sentences(data_dir)
    with torch.no_grad():
        ours = method.label_log_probs(model, method.collate(method.encode(sents))).numpy()
    cfg = LLMEvalConfig(task="udpos", model=path, format="topro", mode="score", shots=0)
    results = predict_sentences(HFBackend(path, threads=1, dtype="fp64"), prepare(cfg), cfg, sents)
    reference = np.concatenate([r.log_probs for r in results])
    assert ours.shape == reference.shape == (sum(len(s) for s in sents), len(method.labels))
    assert max(len(method.tokens.ids(w)) for w in method.label_words) > 1  # multi-token label words
    np.testing.assert_allclose(ours, reference, atol=1e-6, rtol=0)


def test_architecture_and_prompt_recorded(data_dir):
    method, _, _ = causal_method("llama")
    meta = method.meta()
    assert meta["architecture"] == "causal" and meta["llm_format"] == "topro"
    assert type(method).__name__ == "ToProCausal"
