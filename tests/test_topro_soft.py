"""Soft ToPro: continuous templates on ToPro's cloze prompts, frozen or fine-tuned backbone, checkpoints, CLI."""
import json
import re
from pathlib import Path

import pytest
import torch

from topro.data import get_task, load_split
from topro.methods import MethodSpec, build_method, load_checkpoint
from topro.methods.base import count_parameters, word_pieces
from topro.methods.topro_soft import SOFT_PROMPT, split_proportionally
from topro.methods.trained_only import TRAINED_FILE

FAMILIES = ["tiny_udpos", "tiny_xlmr"]  # BERT and XLM-R


def make(method, path, max_length=128, **extra):
    spec = MethodSpec(method=method, task="udpos", labels=list(get_task("udpos").labels), base_model=path,
                      max_length=max_length, base_model_path=path, **extra)
    return build_method(spec, path)


def template_tokens(path):
    """The hand-written template's text tokens, span by span (what ``replace`` turns into soft vectors)."""
    hand = make("topro", path)
    spans = re.split(r"\{word\}|\{mask\}", hand.template.question)
    return [t for span in spans if span.strip()
            for t in hand.tokenizer(span.strip(), add_special_tokens=False)["input_ids"]]


def with_slots_filled(example, init_token_ids):
    return [init_token_ids[-1 - i] if i < 0 else i for i in example.input_ids]


def test_split_proportionally():
    assert split_proportionally(16, [4, 5, 1]) == [6, 8, 2]
    assert split_proportionally(10, [4, 5, 1]) == [4, 5, 1]
    assert split_proportionally(2, [4, 5, 1]) == [1, 1, 0]
    assert sum(split_proportionally(7, [3, 3, 3])) == 7


@pytest.mark.parametrize("family", FAMILIES)
def test_soft_template_initialised_at_the_template_is_handwritten_topro(request, family, data_dir):
    """With one vector per template token, each starting at that token's embedding, soft ToPro's inputs
    and label-word scores are hand-written ToPro's: the insertion of soft vectors (positions, token types,
    mask position, trimming) changes nothing by itself."""
    path = request.getfixturevalue(family)
    tokens = template_tokens(path)
    soft = make("topro_soft", path, prefix_length=len(tokens), soft_prompt_placement="replace")
    assert soft.question.init_token_ids == tokens
    hand = make("topro", path)
    sentences = load_split("udpos", "ru", "dev", data_dir, limit=3)
    soft_examples, hand_examples = soft.encode(sentences), hand.encode(sentences)
    assert [with_slots_filled(e, tokens) for e in soft_examples] == [e.input_ids for e in hand_examples]
    assert [e.positions for e in soft_examples] == [e.positions for e in hand_examples]
    soft_model = soft.build_model(path).double().eval()
    hand_model = hand.build_model(path).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(soft.label_log_probs(soft_model, soft.collate(soft_examples)),
                                   hand.label_log_probs(hand_model, hand.collate(hand_examples)),
                                   atol=1e-5, rtol=1e-5)


def test_no_vectors_in_front_of_the_question_is_handwritten_topro(tiny_udpos, data_dir):
    soft = make("topro_soft", tiny_udpos, prefix_length=0, soft_prompt_placement="prefix")
    hand = make("topro", tiny_udpos)
    sentences = load_split("udpos", "ar", "dev", data_dir, limit=2)
    soft_model, hand_model = soft.build_model(tiny_udpos).eval(), hand.build_model(tiny_udpos).eval()
    assert count_parameters(soft_model)[0] == 0
    with torch.no_grad():
        torch.testing.assert_close(soft.label_log_probs(soft_model, soft.collate(soft.encode(sentences))),
                                   hand.label_log_probs(hand_model, hand.collate(hand.encode(sentences))))


def test_encodings_of_both_placements(tiny_udpos, data_dir):
    sentence = load_split("udpos", "en", "dev", data_dir, limit=1)
    hand = make("topro", tiny_udpos).encode(sentence)

    soft = make("topro_soft", tiny_udpos, prefix_length=16)
    tok = soft.tokenizer
    # "The pos tag of {word} is a kind of : {mask} ." is 4 + 5 + 1 tokens: 16 vectors split 6 + 8 + 2
    slots = [-1 - k for k in range(16)]
    suffix = soft.cloze.layout.suffix
    for e, pieces in zip(soft.encode(sentence), word_pieces(tok, sentence[0].words)):
        question = e.input_ids[e.input_ids.index(-1):len(e.input_ids) - len(suffix)]
        assert question == slots[:6] + pieces + slots[6:14] + [tok.mask_token_id] + slots[14:]
        assert e.input_ids[e.positions[0]] == tok.mask_token_id

    prefix = make("topro_soft", tiny_udpos, prefix_length=4, soft_prompt_placement="prefix").encode(sentence)
    for p, h in zip(prefix, hand):
        start = p.input_ids.index(-1)
        assert p.input_ids[start:start + 4] == [-1, -2, -3, -4]
        assert p.input_ids[:start] + p.input_ids[start + 4:] == h.input_ids  # hand-written question kept
        assert p.positions[0] == h.positions[0] + 4

    long = max(load_split("udpos", "en", "dev", data_dir, limit=200), key=len)
    trimmed = make("topro_soft", tiny_udpos, prefix_length=16, max_length=32).encode([long])
    assert any(e.trimmed_context for e in trimmed)
    assert all(e.length <= 32 and sum(i < 0 for i in e.input_ids) == 16 for e in trimmed)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_training_moves_only_the_prompt(request, family, data_dir):
    path = request.getfixturevalue(family)
    torch.manual_seed(0)
    method = make("topro_soft", path, prefix_length=8, freeze_backbone=True)
    model = method.build_model(path)
    trainable, total = count_parameters(model)
    assert trainable == 8 * model.mlm.config.hidden_size and trainable < total / 100
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = method.collate(method.encode(load_split("udpos", "en", "train", data_dir, limit=2)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(8):
        loss = method.loss(model, batch)
        loss.backward()
        assert all(p.grad is None for p in model.mlm.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == (name == SOFT_PROMPT), name


@pytest.fixture(scope="module")
def headless_bert(tiny_udpos, tmp_path_factory):
    """The tiny BERT saved without its MLM head, as multilingual-e5 is published."""
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("headless")
    BertModel.from_pretrained(tiny_udpos, add_pooling_layer=False).save_pretrained(folder)
    make("topro", tiny_udpos).tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("freeze,backbone", [(True, "tiny_udpos"), (False, "tiny_udpos"), (True, "headless_bert")])
def test_checkpoint_reloads_identically(request, data_dir, tmp_path, freeze, backbone):
    path = request.getfixturevalue(backbone)
    torch.manual_seed(0)
    method = make("topro_soft", path, prefix_length=8, freeze_backbone=freeze)
    model = method.build_model(path)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if backbone == "headless_bert":  # the missing head is random: it trains (and is saved) with the prompt
        head = {"mlm." + n for n, _ in model.mlm.cls.named_parameters(prefix="cls")}
        head.discard("mlm.cls.predictions.decoder.weight")  # tied to the (frozen, pretrained) input embeddings
        assert trained == {SOFT_PROMPT} | head
    elif freeze:
        assert trained == {SOFT_PROMPT}
    batch = method.collate(method.encode(load_split("udpos", "en", "train", data_dir, limit=3)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        method.loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    method.save(model, tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert TRAINED_FILE in files and "tokenizer.json" in files
    assert ("model.safetensors" in files) == (not freeze)  # the backbone is saved only when it was trained
    if freeze:
        backbone_bytes = (Path(path) / "model.safetensors").stat().st_size
        share = 20 if backbone == "headless_bert" else 100  # the headless one also stores its new MLM head
        assert (tmp_path / "ckpt" / TRAINED_FILE).stat().st_size < backbone_bytes / share
    meta = json.loads((tmp_path / "ckpt" / "topro.json").read_text())
    assert meta["method"] == "topro_soft" and meta["soft_prompt"]["n_vectors"] == 8

    loaded_method, loaded = load_checkpoint(tmp_path / "ckpt")
    assert type(loaded_method).__name__ == "ToProSoft"
    test = method.collate(method.encode(load_split("udpos", "zh", "dev", data_dir, limit=3)))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded_method.label_log_probs(loaded, test), method.label_log_probs(model, test))


def test_cli_train_then_evaluate(tmp_path, data_dir):
    from topro.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", "configs/train/udpos-topro_soft.yaml", "--data-dir", str(data_dir),
                 "--output", str(out), "max_train_sentences=12", "max_dev_sentences=6", "epochs=1",
                 "eval_langs=[]", "progress=false"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "topro_soft" and metrics["n_trainable_params"] == 16 * 64  # tiny: hidden 64
    assert metrics["n_total_params"] > 100 * metrics["n_trainable_params"]
    result = tmp_path / "eval.json"
    code = main(["evaluate", "--checkpoint", str(out / "checkpoint"), "--langs", "de,he", "--data-dir",
                 str(data_dir), "--max-sentences", "5", "--output", str(result)])
    assert code == 0
    record = json.loads(result.read_text())
    assert record["method"] == "topro_soft" and set(record["languages"]) == {"de", "he"}
