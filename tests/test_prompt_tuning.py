"""Prompt-Tuning (deep prefix tuning): prefix injection, frozen backbone, trained-only checkpoints, CLI."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from topro.data import get_task, load_split
from topro.metrics import accuracy
from topro.methods import MethodSpec, build_method, load_checkpoint
from topro.methods.base import count_parameters
from topro.methods.prefix_attention import PREFIX_KWARG, enable_prefix_attention
from topro.methods.trained_only import TRAINED_FILE

FAMILIES = ["tiny_udpos", "tiny_xlmr"]  # BERT and XLM-R


def pt_method(path, prefix_length=16, prefix_dropout=0.1):
    spec = MethodSpec(method="prompt_tuning", task="udpos", labels=list(get_task("udpos").labels), base_model=path,
                      prefix_length=prefix_length, prefix_dropout=prefix_dropout, base_model_path=path)
    return build_method(spec, path)


def self_attention_modules(backbone):
    return [m for m in backbone.modules() if hasattr(m, "layer_idx") and hasattr(m, "key") and hasattr(m, "value")]


def own_key_values(backbone, inputs):
    """Each layer's keys/values [B, heads, T, head_dim] for ``inputs``, captured from the plain forward."""
    captured = {}
    hooks = []
    for module in self_attention_modules(backbone):
        def grab(name, module=module):
            def hook(_, __, out):
                b, t, _h = out.shape
                captured[(module.layer_idx, name)] = out.view(b, t, -1, module.attention_head_size).transpose(1, 2)
            return hook
        hooks += [module.key.register_forward_hook(grab("k")), module.value.register_forward_hook(grab("v"))]
    with torch.no_grad():
        out = backbone(**inputs).last_hidden_state
    for h in hooks:
        h.remove()
    n_layers = backbone.config.num_hidden_layers
    return out, [(captured[(i, "k")], captured[(i, "v")]) for i in range(n_layers)]


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_that_duplicates_the_inputs_own_keys_changes_nothing(request, family, data_dir):
    """Attention over [K; K] with values [V; V] equals attention over K, V: a prefix holding each layer's own
    keys/values must leave every hidden state unchanged. Checks the concatenation axis, the head layout,
    the per-layer indexing and that the widened mask lets queries see the prefix."""
    path = request.getfixturevalue(family)
    method = pt_method(path)
    sentence = load_split("udpos", "de", "dev", data_dir, limit=1)
    batch = method.collate(method.encode(sentence))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    backbone = enable_prefix_attention(AutoModel.from_pretrained(path, add_pooling_layer=False)).double().eval()
    plain, key_values = own_key_values(backbone, inputs)
    with torch.no_grad():
        duplicated = backbone(**inputs, **{PREFIX_KWARG: key_values}).last_hidden_state
        other = backbone(**inputs, **{PREFIX_KWARG: [(torch.randn_like(k), torch.randn_like(v))
                                                     for k, v in key_values]}).last_hidden_state
    torch.testing.assert_close(duplicated, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other, plain, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_length_prefix_is_the_plain_backbone(request, family, data_dir):
    path = request.getfixturevalue(family)
    method = pt_method(path, prefix_length=0)
    model = method.build_model(path).double().eval()
    batch = method.collate(method.encode(load_split("udpos", "ru", "dev", data_dir, limit=4)))
    reference = AutoModel.from_pretrained(path, add_pooling_layer=False).double().eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    with torch.no_grad():
        hidden = model.backbone(**inputs).last_hidden_state
        expected = reference(**inputs).last_hidden_state
        log_probs = method.label_log_probs(model, batch)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert log_probs.shape == (len(batch["labels"]), 17)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_in_a_batch_does_not_change_prefixed_predictions(request, family, data_dir):
    path = request.getfixturevalue(family)
    method = pt_method(path)
    torch.manual_seed(0)
    model = method.build_model(path).double().eval()
    sentences = load_split("udpos", "en", "dev", data_dir, limit=6)
    examples = method.encode(sentences)
    assert len({e.length for e in examples}) > 1  # really padded
    with torch.no_grad():
        together = method.label_log_probs(model, method.collate(examples))
        alone = torch.cat([method.label_log_probs(model, method.collate([e])) for e in examples])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_moves_only_prefix_and_head(request, family, data_dir):
    path = request.getfixturevalue(family)
    torch.manual_seed(0)
    method = pt_method(path)
    model = method.build_model(path)
    trainable, total = count_parameters(model)
    cfg = model.backbone.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert trainable == 16 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim \
        + cfg.hidden_size * 17 + 17
    assert trainable < total / 10
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"prefix", "classifier"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = method.collate(method.encode(load_split("udpos", "en", "train", data_dir, limit=8)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        loss = method.loss(model, batch)
        loss.backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == name.startswith(("prefix.", "classifier.")), name


def test_checkpoint_holds_only_trained_tensors_and_reloads_identically(tiny_udpos, data_dir, tmp_path):
    torch.manual_seed(0)
    method = pt_method(tiny_udpos)
    model = method.build_model(tiny_udpos)
    with torch.no_grad():
        model.classifier.weight.normal_()  # anything but the initial head, so reloading is really tested
    method.save(model, tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert TRAINED_FILE in files and "model.safetensors" not in files and "tokenizer.json" in files
    backbone_bytes = (Path(tiny_udpos) / "model.safetensors").stat().st_size
    assert (tmp_path / "ckpt" / TRAINED_FILE).stat().st_size < backbone_bytes / 20
    meta = json.loads((tmp_path / "ckpt" / "topro.json").read_text())
    assert meta["base_model_path"] == tiny_udpos and meta["n_trainable_params"] < meta["n_total_params"]

    loaded_method, loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded_method.name == "prompt_tuning"
    batch = method.collate(method.encode(load_split("udpos", "ar", "dev", data_dir, limit=5)))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded_method.label_log_probs(loaded, batch), method.label_log_probs(model, batch))


def test_missing_or_different_backbone_fails_clearly(tiny_udpos, tmp_path):
    from transformers import BertForMaskedLM

    method = pt_method(tiny_udpos)
    method.save(method.build_model(tiny_udpos), tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "topro.json"
    meta = json.loads(meta_path.read_text())

    meta["base_model_path"] = meta["base_model"] = str(tmp_path / "gone")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match=r"stores only its trained weights.*gone \(no such folder\)"):
        load_checkpoint(tmp_path / "ckpt")

    other = BertForMaskedLM.from_pretrained(tiny_udpos)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    other.save_pretrained(tmp_path / "other")
    meta["base_model_path"] = meta["base_model"] = str(tmp_path / "other")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="a different backbone"):
        load_checkpoint(tmp_path / "ckpt")


def test_cli_train_then_evaluate(tmp_path, data_dir):
    from safetensors.torch import load_file

    from topro.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", "configs/train/udpos-prompt_tuning.yaml", "--data-dir", str(data_dir),
                 "--output", str(out), "max_train_sentences=40", "max_dev_sentences=20", "epochs=1",
                 "eval_langs=[]", "progress=false"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "prompt_tuning"
    assert 0 < metrics["n_trainable_params"] < metrics["n_total_params"] / 10
    state = load_file(out / "checkpoint" / TRAINED_FILE)
    assert sum(t.numel() for t in state.values()) == metrics["n_trainable_params"]
    result = tmp_path / "eval.json"
    code = main(["evaluate", "--checkpoint", str(out / "checkpoint"), "--langs", "de,ja", "--data-dir",
                 str(data_dir), "--max-sentences", "10", "--output", str(result)])
    assert code == 0
    record = json.loads(result.read_text())
    assert record["method"] == "prompt_tuning" and set(record["languages"]) == {"de", "ja"}
    predictions = json.loads((tmp_path / "eval.predictions.json").read_text())["languages"]
    for lang, r in record["languages"].items():  # the score its own per-sentence predictions give
        assert r["n_sentences"] == 10 and r["accuracy"] == pytest.approx(
            accuracy(predictions[lang]["gold"], predictions[lang]["pred"]), abs=1e-12)
