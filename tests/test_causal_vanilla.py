"""Vanilla token classification on decoder-only LMs (tiny random Llama and Gemma 3 with real BPE tokenizers)."""
from __future__ import annotations

import json

import pytest
import torch

from llm_tiny import tiny_model_dir
from topro.data import get_task, load_split
from topro.data.readers import Sentence
from topro.methods import MethodSpec, build_method, load_checkpoint


def causal_spec(path: str, **kw) -> MethodSpec:
    return MethodSpec(method="vanilla", task="udpos", labels=list(get_task("udpos").labels), base_model=path, **kw)


def long_sentence(data_dir, n_parts=6) -> Sentence:
    parts = load_split("udpos", "en", "dev", data_dir, limit=40)[10:10 + n_parts]
    return Sentence([w for p in parts for w in p.words], [t for p in parts for t in p.tags], "en", "joined")


def test_causal_vanilla_labels_each_words_last_subword_of_the_running_text(data_dir):
    from topro.methods.vanilla_causal import CausalVanilla

    path = str(tiny_model_dir("llama"))
    method = build_method(causal_spec(path), path)
    assert isinstance(method, CausalVanilla) and method.spec.label_subword == "last"
    sentence = load_split("udpos", "en", "dev", data_dir, limit=3)[2]
    [example] = method.encode([sentence])
    tok = method.tokenizer
    # The words are the running text's tokens, in order, after the BOS token.
    text_ids = tok(" ".join(sentence.words), add_special_tokens=False)["input_ids"]
    assert example.input_ids == [tok.bos_token_id] + text_ids
    # Each label position is its word's last token: the next token starts the next word (or the row ends).
    pieces = method.word_pieces(sentence)
    ends = [1 + sum(len(p) for p in pieces[:w + 1]) - 1 for w in range(len(sentence))]
    assert example.positions == ends
    assert any(len(p) > 1 for p in pieces)  # the tiny BPE splits words: first and last differ somewhere
    first = build_method(causal_spec(path, label_subword="first"), path).encode([sentence])[0]
    assert first.positions == [e - len(p) + 1 for e, p in zip(ends, pieces)]


def test_causal_vanilla_window_labels_each_word_with_most_left_context(data_dir):
    path = str(tiny_model_dir("gemma3"))
    max_length = 24
    method = build_method(causal_spec(path, max_length=max_length, window_stride=8), path)
    sentence = long_sentence(data_dir)
    examples = method.encode([sentence])
    assert len(examples) > 3
    assert sorted(w for e in examples for w in e.words) == list(range(len(sentence)))  # each word once
    assert all(e.length <= max_length for e in examples)
    # A word is labelled in the first window that holds it (the most left context); a later window labels
    # only words the earlier ones do not hold, so each window's labelled words are its last ones.
    seen: set[int] = set()
    for e in examples:
        assert not seen & set(e.words)
        seen |= set(e.words)
    model = method.build_model(path).double().eval()
    with torch.no_grad():  # a word's scores come from its own window alone
        whole = method.label_log_probs(model, method.collate(examples))
        second = method.label_log_probs(model, method.collate(examples[1:2]))
    n0 = len(examples[0].words)
    torch.testing.assert_close(whole[n0:n0 + len(examples[1].words)], second, atol=1e-10, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_causal_vanilla_trains_saves_loads_and_evaluates(kind, tmp_path, data_dir):
    from safetensors import safe_open

    from topro.config import TrainConfig
    from topro.evaluate import evaluate_checkpoint
    from topro.methods.vanilla_causal import CausalTagger
    from topro.train import train

    path = str(tiny_model_dir(kind))
    cfg = TrainConfig(task="udpos", method="vanilla", model=path, data_dir=str(data_dir), max_train_sentences=12,
                      max_dev_sentences=6, epochs=1, batch_size=4, learning_rate=3e-3, max_length=32,
                      progress=False, output_dir=str(tmp_path / "run"), seed=1)
    summary = train(cfg)
    assert summary["steps"] >= 3 and summary["history"]
    folder = tmp_path / "run" / "checkpoint"
    meta = json.loads((folder / "topro.json").read_text())
    assert meta["label_subword"] == "last" and meta["backbone_in_checkpoint"]
    with safe_open(str(folder / "trained.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["classifier.bias", "classifier.weight"]
        trained_head = f.get_tensor("classifier.bias")
    assert trained_head.abs().sum() > 0  # the head starts at zero bias: it trained
    method, model = load_checkpoint(folder)
    assert isinstance(model, CausalTagger) and type(method).__name__ == "CausalVanilla"
    torch.testing.assert_close(model.classifier.bias.detach(), trained_head)
    result = evaluate_checkpoint(str(folder), ["en", "de"], data_dir=str(data_dir), max_sentences=5,
                                 progress=False)
    for lang in ("en", "de"):
        scores = result["languages"][lang]
        assert 0.0 <= scores["accuracy"] <= 1.0 and scores["n_truncated_words"] == 0
