"""Shared-prefix label scoring equals naive per-prompt scoring on tiny real models.

The models run in float64 (`tiny_model`), so the tolerances hold on any CPU and thread count."""
import pytest
import torch

from llm_tiny import tiny_model
from topro.llm.scoring import (ScoringItem, TokenCounts, encode_shared_prefix, normalise, score_naive,
                               score_seq2seq_naive, score_seq2seq_shared, score_shared, score_shared_many)

SENTENCE = "Wilhelm von Zuccalmaglio wrote the long song in Berlin ."
LABELS = ["thing", "verb", "auxiliar", "other", "organisation", "name", "X"]


def encode(tok, text, special=False):
    return tok(text, add_special_tokens=special).input_ids


def prompt_parts(tok, n_words=None):
    words = SENTENCE.split()[:n_words]
    prefix = encode(tok, "Part-of-speech tag: thing verb other\nSentence: " + SENTENCE + "\n", True)
    # Questions of different lengths, so rows are padded.
    questions = [encode(tok, f"Part-of-speech tag of the word {w} in the sentence is") for w in words]
    labels = [encode(tok, " " + label) for label in LABELS]
    return prefix, questions, labels


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_shared_prefix_equals_naive(kind):
    model, tok = tiny_model(kind)
    prefix, questions, labels = prompt_parts(tok)
    assert len({len(q) for q in questions}) > 1, "questions should differ in length"
    assert any(len(l) > 1 for l in labels), "some labels should be multi-token"
    if kind == "gemma3":
        assert len(prefix) > 2 * model.config.sliding_window, "prompt should cross the window"
    naive_counts, shared_counts = TokenCounts(), TokenCounts()
    naive = score_naive(model, prefix, questions, labels, naive_counts, max_tokens_per_batch=512)
    # Context cached, sentence pending: one forward runs sentence, questions and labels.
    state = encode_shared_prefix(model, prefix[:12], counts=shared_counts)
    shared = score_shared(model, state, questions, labels, shared_counts, pending=prefix[12:])
    assert shared.shape == (len(questions), len(labels))
    torch.testing.assert_close(shared, naive, atol=1e-8, rtol=1e-10)
    assert torch.equal(shared.argmax(1), naive.argmax(1))
    assert shared_counts.forwards == 2
    assert shared_counts.tokens * 5 < naive_counts.tokens
    # A small token budget splits the questions over several forwards.
    chunked_counts = TokenCounts()
    chunked = score_shared(model, state, questions, labels, chunked_counts, pending=prefix[12:],
                           max_tokens_per_batch=120)
    torch.testing.assert_close(chunked, naive, atol=1e-8, rtol=1e-10)
    assert chunked_counts.forwards > 2


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_many_sentences_packed_into_forwards(kind):
    model, tok = tiny_model(kind)
    context = encode(tok, "Part-of-speech tag: thing verb other\n", True)
    sentences = ["Wilhelm wrote .", "the long song in Berlin was written there by him .", "X", "a b"]
    items, expected = [], []
    for text in sentences:
        pending = encode(tok, "Sentence: " + text + "\n")
        questions = [encode(tok, f"Tag of the word {w} is") for w in text.split()]
        items.append(ScoringItem(pending, questions))
        labels = [encode(tok, " " + label) for label in LABELS]
        expected.append(score_naive(model, context + pending, questions, labels))
    items.append(ScoringItem(encode(tok, "Sentence: none\n"), []))
    state = encode_shared_prefix(model, context)
    for budget, max_forwards in [(4096, 1), (150, 6)]:
        counts = TokenCounts()
        got = score_shared_many(model, state, items, labels, counts, max_tokens_per_batch=budget)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-8, rtol=1e-10)
        assert got[-1].shape == (0, len(labels))
        assert 1 <= counts.forwards <= max_forwards
    assert counts.forwards > 2  # the long sentence was split, the short ones packed


def test_two_level_prefix_and_empty_question():
    model, tok = tiny_model("gemma3")
    prefix, questions, labels = prompt_parts(tok, n_words=3)
    naive = score_naive(model, prefix, [[]] + questions, labels)
    # Instruction cached once, sentence appended to it.
    first = encode_shared_prefix(model, prefix[:12])
    state = encode_shared_prefix(model, prefix[12:], past=first)
    assert state.ids == prefix
    shared = score_shared(model, state, [[]] + questions, labels)
    torch.testing.assert_close(shared, naive, atol=1e-8, rtol=1e-10)
    # No cached state at all: everything pending.
    shared = score_shared(model, None, [[]] + questions, labels, pending=prefix)
    torch.testing.assert_close(shared, naive, atol=1e-8, rtol=1e-10)


def test_seq2seq_shared_equals_naive():
    model, tok = tiny_model("t5")
    prefix, questions, labels = prompt_parts(tok, n_words=4)
    prompts = [encode(tok, "Sentence: " + SENTENCE + " " + tok.decode(q), True) for q in questions]
    naive = score_seq2seq_naive(model, prompts, labels)
    shared = score_seq2seq_shared(model, prompts, labels)
    torch.testing.assert_close(shared, naive, atol=1e-8, rtol=1e-10)


def test_length_normalisation():
    scores = torch.tensor([[-4.0, -6.0]])
    assert normalise(scores, [[1, 2], [3, 4, 5]], by_length=True).tolist() == [[-2.0, -2.0]]
    assert normalise(scores, [[1], [2]], by_length=False) is scores
