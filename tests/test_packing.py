"""Packed ToPro (prompt_packing: sentence): layout, isolation, windowing, checkpoints, bad input.

Logits are compared in float64, so the tolerances hold on any CPU and thread count.
"""
import json
import logging

import pytest
import torch

from topro.batching import token_budget_batches
from topro.config import ConfigError, TrainConfig, from_dict
from topro.data import get_task, load_split
from topro.data.readers import Sentence
from topro.evaluate import predict
from topro.methods import MethodSpec, build_method, load_checkpoint
from topro.methods.base import word_pieces
from topro.methods.topro_mlm import label_logits_at
from topro.train import method_spec

FAMILIES = ["tiny_udpos", "tiny_xlmr"]  # BERT and XLM-R (positions from padding_idx + 1)


def make(path, method="topro", max_length=128, **extra):
    spec = MethodSpec(method=method, task="udpos", labels=list(get_task("udpos").labels), base_model=path,
                      max_length=max_length, base_model_path=path, **extra)
    return build_method(spec, path)


def float64_model(method, path):
    torch.manual_seed(0)
    return method.build_model(path).double().eval()


def by_word(method, model, examples):
    """{(sentence, word): label logits} of ``examples`` run as one padded batch."""
    with torch.no_grad():
        model_logits = method._label_logits(model, method.collate(examples))  # float64, not log-softmaxed
    keys = [(e.sentence, w) for e in examples for w in e.words]
    return dict(zip(keys, model_logits))


@pytest.mark.parametrize("word_bias", [0.0, 1.5])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_question_row_is_the_single_prompt_layout(request, family, word_bias, data_dir):
    """A packed row with one question holds exactly the single prompt's tokens and token types, and its
    logits equal that prompt run through the model's own position ids with a hand-built mask in which the
    sentence does not see the question (what packing changes in the computation, and nothing else);
    with ``packed_word_bias``, the mask also adds it where the question meets its own word's tokens."""
    path = request.getfixturevalue(family)
    single = make(path)
    packed = make(path, prompt_packing="sentence", max_questions_per_row=1, packed_word_bias=word_bias)
    model = float64_model(single, path)
    base = getattr(model, model.base_model_prefix)
    sentences = load_split("udpos", "ar", "dev", data_dir, limit=2)
    one_each = packed.encode(sentences)
    prompts = single.encode(sentences)
    assert [(e.sentence, e.words) for e in one_each] == [(e.sentence, e.words) for e in prompts]
    suffix = single.layout.suffix
    for row, prompt in zip(one_each, prompts):
        assert row.input_ids == prompt.input_ids and row.token_type_ids == prompt.token_type_ids
        assert row.positions == prompt.positions and row.position_ids == list(range(prompt.length))
        sentence = sentences[prompt.sentence]
        question = single.question_ids(sentence, None)[prompt.words[0]]
        n_sentence = prompt.length - len(question) - len(suffix)
        visible = torch.ones(prompt.length, prompt.length, dtype=torch.bool)
        visible[:n_sentence, n_sentence:] = False  # the sentence part never sees the question
        mask = visible
        own = [i for i, b in enumerate(row.word_blocks) if b == 1]  # the asked word's tokens in the sentence
        assert [row.input_ids[i] for i in own] == word_pieces(single.tokenizer, [sentence.words[row.words[0]]])[0]
        assert own == list(range(own[0], own[-1] + 1)) and own[-1] < n_sentence
        if word_bias:
            mask = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)
            mask[n_sentence:, own] += word_bias
        inputs = {"input_ids": torch.tensor([prompt.input_ids]), "attention_mask": mask[None, None]}
        if prompt.token_type_ids is not None:
            inputs["token_type_ids"] = torch.tensor([prompt.token_type_ids])
        with torch.no_grad():
            hidden = base(**inputs).last_hidden_state[0, prompt.positions[0]]
            expected = label_logits_at(model, hidden[None], single.label_ids)[0]
            got = packed._label_logits(model, packed.collate([row]))[0]
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # ... and a different computation from today's per-word prompt, where the sentence sees the question.
    with torch.no_grad():
        today = single._label_logits(model, single.collate(prompts))
        now = packed._label_logits(model, packed.collate(one_each))
    assert (today - now).abs().max() > 1e-8  # float64: far above rounding, tiny on a random tiny model


@pytest.mark.parametrize("word_bias", [0.0, 1.5])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_questions_are_isolated(request, family, word_bias, data_dir):
    """Each question packed with others gives the logits it gives alone with the sentence (the mask
    isolates questions), also when rows of different lengths are padded together (and each question's
    word bias points at its own word only)."""
    path = request.getfixturevalue(family)
    packed = make(path, prompt_packing="sentence", packed_word_bias=word_bias)
    alone = make(path, prompt_packing="sentence", max_questions_per_row=1, packed_word_bias=word_bias)
    model = float64_model(packed, path)
    sentences = load_split("udpos", "de", "dev", data_dir, limit=4)
    rows = packed.encode(sentences)
    assert len(rows) < sum(len(s) for s in sentences) / 4  # really packed
    assert max(len(r.words) for r in rows) > 5
    together = by_word(packed, model, rows)
    separate = by_word(alone, model, alone.encode(sentences))
    assert together.keys() == separate.keys() == {(i, w) for i, s in enumerate(sentences) for w in range(len(s))}
    for key in together:
        torch.testing.assert_close(together[key], separate[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("word_bias", [0.0, 1.5])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_attention_equals_the_4d_mask(request, family, word_bias, data_dir):
    """The block-by-block attention (the fast path a packed model runs) gives the 4-D mask's logits and
    gradients on padded rows of different lengths, in float64; and it is really the path in use."""
    from topro.methods.packing import PACKED_ATTENTION

    path = request.getfixturevalue(family)
    packed = make(path, prompt_packing="sentence", max_questions_per_row=7, packed_word_bias=word_bias)
    model = float64_model(packed, path).train()  # dropout off below: same values, gradients compared
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    base = getattr(model, model.base_model_prefix)
    assert base.config._attn_implementation == PACKED_ATTENTION
    rows = packed.encode(load_split("udpos", "en", "dev", data_dir, limit=3))
    batch = packed.collate(rows)
    assert len({r.length for r in rows}) > 1 and (batch["packing_blocks"] == -1).any()

    def logits_and_grads(implementation):
        base.set_attn_implementation(implementation)
        model.zero_grad()
        logits = packed._label_logits(model, batch)
        (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast, fast_grads = logits_and_grads(PACKED_ATTENTION)
    reference, reference_grads = logits_and_grads("sdpa")
    torch.testing.assert_close(fast, reference, atol=1e-10, rtol=0)
    assert fast_grads.keys() == reference_grads.keys() and len(fast_grads) > 10
    # One scale for all: some gradients are exactly zero in exact arithmetic (attention's key bias), rounding
    # noise there is not a difference.
    scale = max(g.abs().max().item() for g in reference_grads.values())
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], reference_grads[name], atol=1e-9 * scale, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_long_sentence_is_windowed_over_rows_and_every_word_predicted(request, family, data_dir):
    path = request.getfixturevalue(family)
    packed = make(path, max_length=40, prompt_packing="sentence", max_packed_length=120)
    sentence = max(load_split("udpos", "en", "dev", data_dir, limit=300), key=len)
    rows = packed.encode([sentence])
    assert len(rows) > 1 and any(r.trimmed_context for r in rows)
    assert sorted(w for r in rows for w in r.words) == list(range(len(sentence)))
    pieces = word_pieces(packed.tokenizer, sentence.words)
    per_word = {e.words[0]: e for e in make(path, max_length=40).encode([sentence])}
    mask_id = packed.tokenizer.mask_token_id
    for row in rows:
        assert row.length <= 120 or len(row.words) == 1
        assert max(row.position_ids) < 40  # each question's single-prompt layout fits max_length
        assert all(row.input_ids[at] == mask_id for at in row.positions)
        if len(row.words) == 1:  # alone in its row: exactly the per-word prompt, window and all
            assert row.input_ids == per_word[row.words[0]].input_ids
            continue
        context = row.input_ids[:row.blocks.count(0)]
        for w in row.words:  # sharing a row: the window holds every word the row asks about
            word = pieces[w]
            assert any(context[i:i + len(word)] == word for i in range(len(context))), (w, sentence.words[w])
    model = float64_model(packed, path)
    prediction = predict(packed, model, [sentence], max_tokens_per_batch=300)[0]
    assert not torch.isnan(torch.tensor(prediction.log_probs)).any()
    assert prediction.truncated_words == 0 and prediction.trimmed_prompts > 0


@pytest.mark.parametrize("method", ["topro", "topro_soft", "rosprompt"])
def test_packed_training_checkpoint_reloads_identically(tiny_udpos, data_dir, tmp_path, method):
    from topro.train import train

    cfg = TrainConfig(task="udpos", method=method, model="tiny", data_dir=str(data_dir), max_train_sentences=12,
                      max_dev_sentences=6, epochs=1, batch_size=16, learning_rate=1e-3, prefix_length=4,
                      prompt_packing="sentence", output_dir=str(tmp_path / "run"), progress=False)
    metrics = train(cfg)
    assert metrics["n_train_examples"] < metrics["n_train_questions"] == metrics["n_train_words"]
    meta = json.loads((tmp_path / "run" / "checkpoint" / "topro.json").read_text())
    assert meta["prompt_packing"] == "sentence" and meta["method"] == method
    loaded_method, loaded = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert (loaded_method if method == "topro" else loaded_method.cloze).packing == "sentence"
    sentences = load_split("udpos", "zh", "dev", data_dir, limit=4)
    rows = loaded_method.encode(sentences)
    assert len(rows) == len(sentences)  # served packed, as trained
    again_method, again = load_checkpoint(tmp_path / "run" / "checkpoint")
    first = predict(loaded_method, loaded, sentences)
    second = predict(again_method, again, sentences)
    for a, b in zip(first, second):
        assert (a.log_probs == b.log_probs).all()
    from topro.serving import Tagger  # the endpoint's tagger serves it packed, with the same tags

    tagger = Tagger.load(str(tmp_path / "run" / "checkpoint"), device="cpu")
    assert tagger.info.prompt_packing == "sentence"
    served = tagger.tag([Sentence(s.words, [], s.lang) for s in sentences])
    for tagged, prediction in zip(served, first):
        assert [w.tag for w in tagged.words] == [loaded_method.labels[i] for i in prediction.log_probs.argmax(1)]


def test_training_batches_count_questions(tiny_udpos, data_dir):
    packed = make(tiny_udpos, prompt_packing="sentence")
    rows = packed.encode(load_split("udpos", "en", "train", data_dir, limit=60))
    lengths, sizes = [r.length for r in rows], [r.batch_units for r in rows]
    assert sizes == [len(r.words) for r in rows]
    counts = set()
    for seed in range(4):
        batches = token_budget_batches(lengths, 4096, 32, shuffle=True, seed=seed, sizes=sizes)
        assert sorted(i for b in batches for i in b) == list(range(len(rows)))
        totals = [sum(sizes[i] for i in b) for b in batches]
        # A row goes in only while that leaves the batch nearer 32 than stopping: never 64 or more.
        assert all(t < 64 or len(b) == 1 for t, b in zip(totals, batches))
        # About 32 questions a step on average (a hard cap of 32 left whole rows out: a quarter short),
        # so an epoch takes about as many steps as unpacked ToPro's.
        assert 0.85 * 32 <= sum(totals) / len(batches) <= 1.15 * 32
        assert abs(len(batches) - sum(sizes) / 32) <= 0.15 * sum(sizes) / 32
        counts.add(len(batches))
    assert len(counts) == 1  # the number of steps per epoch does not depend on the shuffle


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("packing", ["per_word", "sentence"])
def test_a_very_long_word_is_cut_inside_its_question_with_a_warning(request, family, packing, caplog):
    path = request.getfixturevalue(family)
    method = make(path, max_length=24, prompt_packing=packing)
    long_word = "Donaudampfschifffahrtsgesellschaft" * 2  # < 100 characters: WordPiece splits it, no [UNK]
    sentence = Sentence(["Die", long_word, "fährt", "."], ["DET", "NOUN", "VERB", "PUNCT"], "de", "x.tsv:7")
    with caplog.at_level(logging.WARNING, logger="topro.methods.packing"):
        examples = method.encode([sentence])
    assert long_word[:40] in caplog.text and "x.tsv:7" in caplog.text
    mask_id = method.tokenizer.mask_token_id
    assert sorted(w for e in examples for w in e.words) == [0, 1, 2, 3]
    for e in examples:
        positions = e.position_ids if packing == "sentence" else range(e.length)
        assert max(positions) < 24 and all(e.input_ids[p] == mask_id for p in e.positions)
    model = method.build_model(path).eval()
    log_probs = predict(method, model, [sentence])[0].log_probs
    assert not torch.isnan(torch.tensor(log_probs)).any()


def test_max_length_beyond_the_position_embeddings_is_refused(tiny_udpos):
    method = make(tiny_udpos, max_length=100_000)
    with pytest.raises(ValueError, match="max_length=100000 exceeds"):
        method.build_model(tiny_udpos)


def test_methods_that_cannot_pack_are_refused_by_name(tiny_udpos, tiny_mt5):
    for method in ("vanilla", "prompt_tuning"):
        with pytest.raises(ConfigError, match=f"field 'prompt_packing': method '{method}' cannot pack"):
            from_dict(TrainConfig, {"method": method, "prompt_packing": "sentence"})
        with pytest.raises(ValueError, match=f"method '{method}' cannot pack"):
            make(tiny_udpos, method=method, prompt_packing="sentence")
    with pytest.raises(ValueError, match="method 'topro' on the encoder-decoder"):
        make(tiny_mt5, prompt_packing="sentence")
    with pytest.raises(ConfigError, match="prompt_packing"):
        from_dict(TrainConfig, {"prompt_packing": "words"})
    with pytest.raises(ConfigError, match="max_packed_length"):
        from_dict(TrainConfig, {"prompt_packing": "sentence", "max_packed_length": 64})
    from_dict(TrainConfig, {"method": "topro_soft", "prompt_packing": "sentence"})  # packable: accepted
    with pytest.raises(ConfigError, match="packed_word_bias.*prompt_packing: sentence"):
        from_dict(TrainConfig, {"packed_word_bias": 1.0})  # per_word: the sentence already sees the question
    with pytest.raises(ConfigError, match="packed_word_bias"):
        from_dict(TrainConfig, {"prompt_packing": "sentence", "packed_word_bias": -1.0})
    cfg = from_dict(TrainConfig, {"prompt_packing": "sentence", "packed_word_bias": 1.0})
    assert method_spec(cfg, "tiny").packed_word_bias == 1.0  # into topro.json with the method spec


def test_prompt_packing_is_sweepable_and_checked_per_trial(tmp_path):
    from topro.sweep_config import grid_size, load_sweep_config

    path = tmp_path / "s.yaml"
    path.write_text("name: t\nbase: {task: udpos, model: tiny, method: topro, epochs: 1}\n"
                    "search_space:\n  prompt_packing: {grid: [per_word, sentence]}\n")
    assert grid_size(load_sweep_config(path)) == 2
    path.write_text("name: t\nbase: {task: udpos, model: tiny, epochs: 1}\n"
                    "search_space:\n  method: {grid: [topro, vanilla]}\n  prompt_packing: {grid: [sentence]}\n")
    with pytest.raises(ConfigError, match="method 'vanilla' cannot pack"):
        load_sweep_config(path)
