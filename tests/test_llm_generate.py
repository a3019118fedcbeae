"""Shared-prefix greedy generation equals unbatched model.generate on tiny real models."""
import pytest
import torch

from llm_tiny import tiny_model
from topro.llm.generate import greedy_generate_shared
from topro.llm.scoring import TokenCounts, encode_shared_prefix

CONTEXT = "Tag every word. Sentence: the cat sat .\nTags: the/DET cat/NOUN sat/VERB ./PUNCT\n"
PROMPTS = ["Sentence: Wilhelm wrote .\nTags:", "Sentence: a long song in Berlin was written there .\nTags:",
           "Sentence: X\nTags:"]


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_shared_generation_equals_generate(kind):
    model, tok = tiny_model(kind)
    context = tok(CONTEXT).input_ids  # with BOS
    suffixes = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    counts = TokenCounts()
    state = encode_shared_prefix(model, context, counts=counts)
    ours = greedy_generate_shared(model, state, suffixes, max_new_tokens=12, counts=counts, batch_rows=2)
    for suffix, got in zip(suffixes, ours):
        ids = torch.tensor([context + suffix])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert got == ref
    if kind == "gemma3":
        assert len(context) + max(map(len, suffixes)) > model.config.sliding_window


def test_stop_and_eos_end_rows_early():
    model, tok = tiny_model("llama")
    state = encode_shared_prefix(model, tok(CONTEXT).input_ids)
    suffixes = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    full = greedy_generate_shared(model, state, suffixes, max_new_tokens=10)
    cut = greedy_generate_shared(model, state, suffixes, max_new_tokens=10, stop=lambda ids: len(ids) >= 3)
    assert all(c == f[:3] for c, f in zip(cut, full))
    first = {f[0] for f in full}
    ended = greedy_generate_shared(model, state, suffixes, max_new_tokens=10, eos_ids=first)
    assert all(e == [] or e[0] not in first for e in ended)
