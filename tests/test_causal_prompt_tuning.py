"""Prompt-Tuning (deep prefixes, frozen backbone) on decoder-only LMs: tiny random Llama and Gemma 3."""
from __future__ import annotations

import json

import pytest
import torch

from llm_tiny import tiny_model_dir
from topro.config import TrainConfig
from topro.data import get_task, load_split
from topro.methods import MethodSpec, build_method, load_checkpoint


def test_prefix_attention_on_llama_equals_a_prefilled_key_value_cache(data_dir):
    """Deep prefixes through the attention interface give, in float64, what the same keys and values give as a
    key/value cache in front of the input (positions of the input unshifted), right padding included."""
    from transformers import AutoModel, DynamicCache

    from topro.methods.prefix_attention import PREFIX_KWARG

    path = str(tiny_model_dir("llama"))
    spec = MethodSpec(method="prompt_tuning", task="udpos", labels=list(get_task("udpos").labels), base_model=path,
                      prefix_length=3, prefix_dropout=0.0)
    method = build_method(spec, path)
    model = method.build_model(path).double().eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(model.prefix.embedding.weight)
    batch = method.collate(method.encode(load_split("udpos", "en", "dev", data_dir, limit=2)))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # right padding in the batch
    with torch.no_grad():
        prefix = model.prefix(ids.shape[0])
        ours = model.backbone(input_ids=ids, attention_mask=mask, use_cache=False,
                              **{PREFIX_KWARG: prefix}).last_hidden_state
        reference = AutoModel.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa").eval()
        cache = DynamicCache(config=reference.config)
        for layer, (key, value) in enumerate(prefix):
            cache.update(key, value, layer)
        n_prefix = prefix[0][0].shape[2]
        theirs = reference(input_ids=ids, cache=cache, use_cache=True,
                           attention_mask=torch.cat([torch.ones(ids.shape[0], n_prefix, dtype=mask.dtype), mask], 1),
                           position_ids=torch.arange(ids.shape[1]).expand_as(ids)).last_hidden_state
        plain = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-10, rtol=1e-10)
    assert (ours[real] - plain[real]).abs().max() > 1e-3  # the prefix does change the states


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_causal_prompt_tuning_trains_only_prefix_and_head_and_reloads(kind, tmp_path, data_dir):
    from safetensors import safe_open

    from topro.train import LocalStrategy, fit, prepare, set_seed

    path = str(tiny_model_dir(kind))
    cfg = TrainConfig(task="udpos", method="prompt_tuning", model=path, data_dir=str(data_dir), max_train_sentences=8,
                      max_dev_sentences=4, epochs=1, batch_size=4, max_steps=3, learning_rate=1e-2, max_length=32,
                      progress=False, prefix_length=4, output_dir=str(tmp_path / "run"), seed=3)
    strategy = LocalStrategy(cfg)
    set_seed(cfg.seed)
    run = prepare(cfg, strategy)
    model = run.module.model
    assert run.method.tagging.label_last  # decoder-only: the label sits on the last subword
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"prefix.embedding.weight", "classifier.weight", "classifier.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(run, strategy)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trained)  # backbone frozen
    assert not torch.equal(before["prefix.embedding.weight"], after["prefix.embedding.weight"])
    checkpoint = tmp_path / "run" / "checkpoint"
    with safe_open(str(checkpoint / "trained.safetensors"), "pt") as f:
        assert set(f.keys()) == trained
    assert json.loads((checkpoint / "topro.json").read_text())["label_subword"] == "last"
    method, loaded = load_checkpoint(checkpoint)
    sentences = load_split("udpos", "de", "dev", data_dir, limit=3)
    batch = method.collate(method.encode(sentences))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(method.label_log_probs(loaded, batch), run.method.label_log_probs(model, batch))
