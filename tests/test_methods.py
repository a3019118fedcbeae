import pytest
import torch

from topro.batching import shard_batches, split_batches, token_budget_batches
from topro.data import load_split
from topro.methods import MethodSpec, build_method
from topro.methods.topro_mlm import full_vocab_label_logits
from topro.models import load_tokenizer


def spec(method, task="udpos", **kw):
    from topro.data import get_task

    return MethodSpec(method=method, task=task, labels=list(get_task(task).labels), base_model="test", **kw)


@pytest.mark.parametrize("model_fixture", ["tiny_udpos", "tiny_xlmr"])
def test_label_restricted_head_equals_full_vocabulary(request, model_fixture, data_dir):
    path = request.getfixturevalue(model_fixture)
    method = build_method(spec("topro"), path)
    model = method.build_model(path).eval()
    sentences = load_split("udpos", "de", "dev", data_dir, limit=4)
    batch = method.collate(method.encode(sentences))
    with torch.no_grad():
        fast = method._label_logits(model, batch)
        full = full_vocab_label_logits(model, batch, method.label_ids)
    assert fast.shape == (sum(len(s) for s in sentences), 17)
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=1e-4)


def test_topro_prompt_keeps_question_and_mask_when_sentence_is_trimmed(tiny_udpos, data_dir):
    method = build_method(spec("topro", max_length=24), tiny_udpos)
    sentence = max(load_split("udpos", "en", "dev", data_dir, limit=200), key=len)
    examples = method.encode([sentence])
    assert len(examples) == len(sentence)  # one prompt per word, none dropped
    tok = method.tokenizer
    for example, word in zip(examples, sentence.words):
        assert example.input_ids[example.positions[0]] == tok.mask_token_id
        assert example.length <= 24 or example.trimmed_context
        question = tok.decode(example.input_ids[example.positions[0] - 8: example.positions[0]])
        assert "kind of" in question
    assert sum(e.trimmed_context for e in examples) > 0


def test_vanilla_truncate_counts_truncated_words_and_still_scores_them(tiny_udpos, data_dir):
    from topro.evaluate import evaluate_sentences

    method = build_method(spec("vanilla", max_length=16, long_sentences="truncate"), tiny_udpos)
    model = method.build_model(tiny_udpos)
    sentences = load_split("udpos", "en", "dev", data_dir, limit=30)
    examples = method.encode(sentences)
    truncated = sum(e.truncated_words for e in examples)
    assert truncated > 0
    assert all(len(e.words) + e.truncated_words == len(s) for e, s in zip(examples, sentences))
    result = evaluate_sentences(method, model, "udpos", sentences)
    assert result["n_truncated_words"] == truncated
    assert result["n_words"] == sum(len(s) for s in sentences)  # truncated words stay in the denominator
    assert result["n_seen_words"] == result["n_words"] - truncated  # the seen-word score is named as such


def _long_sentence(data_dir, n_parts=8):
    from topro.data.readers import Sentence

    parts = load_split("udpos", "en", "dev", data_dir, limit=40)[10:10 + n_parts]
    return Sentence([w for p in parts for w in p.words], [t for p in parts for t in p.tags], "en", "joined")


@pytest.mark.parametrize("method_name", ["vanilla", "prompt_tuning", "topro", "topro_soft"])
def test_every_method_predicts_every_word_of_a_sentence_several_times_max_length(method_name, tiny_udpos,
                                                                                 data_dir):
    from topro.evaluate import evaluate_sentences, predict

    max_length = 24
    method = build_method(spec(method_name, max_length=max_length), tiny_udpos)
    sentence = _long_sentence(data_dir)
    n_tokens = sum(len(p) for p in __import__("topro.methods.base", fromlist=["x"]).word_pieces(
        method.tokenizer, sentence.words))
    assert n_tokens > 4 * max_length  # several times max_length
    examples = method.encode([sentence])
    assert all(e.length <= max_length or e.trimmed_context for e in examples)
    labelled = sorted(w for e in examples for w in e.words)
    assert labelled == list(range(len(sentence)))  # each word labelled exactly once
    model = method.build_model(tiny_udpos)
    [prediction] = predict(method, model, [sentence])
    assert not __import__("numpy").isnan(prediction.log_probs).any()
    result = evaluate_sentences(method, model, "udpos", [sentence])
    assert result["n_truncated_words"] == 0 and result["n_seen_words"] == len(sentence)


def test_vanilla_window_labels_each_word_where_it_has_most_context(tiny_udpos, data_dir):
    import torch as _torch

    method = build_method(spec("vanilla", max_length=24, window_stride=12), tiny_udpos)
    sentence = _long_sentence(data_dir)
    examples = method.encode([sentence])
    assert len(examples) > 3
    budget = 24 - method.layout.single_overhead
    for e in examples:
        assert e.length <= 24 and e.truncated_words == 0
        inner = e.input_ids[len(method.layout.lead):e.length - len(method.layout.single_suffix)]
        assert 0 < len(inner) <= budget
    # A sentence that fits is one example, the same as with truncation.
    short = load_split("udpos", "en", "dev", data_dir, limit=3)[0]
    wide = build_method(spec("vanilla", max_length=128), tiny_udpos)
    cut = build_method(spec("vanilla", max_length=128, long_sentences="truncate"), tiny_udpos)
    assert [e.input_ids for e in wide.encode([short])] == [e.input_ids for e in cut.encode([short])]
    # A word's prediction comes from its window alone: re-encoding that window gives the same numbers.
    model = method.build_model(tiny_udpos).double().eval()
    with _torch.no_grad():
        whole = method.label_log_probs(model, method.collate(examples))
        first = method.label_log_probs(model, method.collate(examples[:1]))
    _torch.testing.assert_close(whole[:len(examples[0].words)], first, atol=1e-5, rtol=1e-5)


def test_label_word_policy_strict_names_word_and_tokenizer(tiny_xlmr):
    tok = load_tokenizer(tiny_xlmr)
    with pytest.raises(ValueError, match=r"label word 'adjective' is \d+ tokens .* tokenizer"):
        build_method(spec("topro", verbalizer="tag_names", label_word_policy="strict"), tiny_xlmr, tok)


def test_seq2seq_scores_every_label_and_learns(tiny_mt5, data_dir):
    torch.manual_seed(0)
    method = build_method(spec("topro"), tiny_mt5)
    assert type(method).__name__ == "ToProSeq2Seq"
    model = method.build_model(tiny_mt5)
    sentences = load_split("udpos", "en", "train", data_dir, limit=3)
    batch = method.collate(method.encode(sentences))
    model.eval()
    with torch.no_grad():
        lp = method.label_log_probs(model, batch)
        # naive reference: one forward per (prompt, label), summed token log-probs
        row, label = 1, 5
        target = torch.tensor([method.targets[label]])
        out = model(input_ids=batch["input_ids"][row:row + 1], attention_mask=batch["attention_mask"][row:row + 1],
                    labels=target)
        naive = -out.loss * target.shape[1]
        all_labels = []
        for j in range(17):
            t = torch.tensor([method.targets[j]])
            o = model(input_ids=batch["input_ids"][row:row + 1], attention_mask=batch["attention_mask"][row:row + 1], labels=t)
            all_labels.append(-o.loss * t.shape[1])
        expected = naive - torch.logsumexp(torch.stack(all_labels), 0)
    assert lp.shape == (batch["input_ids"].shape[0], 17)
    torch.testing.assert_close(lp[row, label], expected, atol=1e-4, rtol=1e-4)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = method.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_token_budget_batches_cover_everything_within_budget():
    lengths = [5, 50, 7, 12, 33, 8, 90, 3] * 20
    batches = token_budget_batches(lengths, max_tokens_per_batch=200, max_examples=16, shuffle=True, seed=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 16 and max(lengths[i] for i in b) * len(b) <= 200 or len(b) == 1
    shards = [shard_batches(batches, r, 3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1


def test_split_batches_keep_the_global_batch_for_any_number_of_workers():
    lengths = [5, 50, 7, 12, 33, 8, 90, 3] * 20 + [200]
    batches = token_budget_batches(lengths, max_tokens_per_batch=400, max_examples=16, shuffle=True, seed=3)
    assert split_batches(batches, 0, 1) == batches
    slices = [split_batches(batches, r, 2) for r in range(2)]
    assert len(slices[0]) == len(slices[1])  # collectives stay in step
    splittable = [b for b in batches if len(b) >= 2]
    assert len(slices[0]) == len(splittable) and len(splittable) >= len(batches) - 1
    for whole, a, b in zip(splittable, *slices):
        assert sorted(a + b) == sorted(whole) and abs(len(a) - len(b)) <= 1 and a and b


def test_spec_reads_typed_meta_and_old_checkpoints_extra_dict():
    from dataclasses import replace

    typed = spec("topro", template="t", prompt_packing="sentence", prefix_length=4, base_model_path="/m")
    assert MethodSpec.from_meta(typed.meta()) == typed
    # topro.json before the settings were typed: method settings under "extra", plus keys that are not spec fields
    old = {**spec("prompt_tuning").meta(), "n_total_params": 10,
           "extra": {"prefix_length": 4, "prefix_dropout": 0.2, "base_model_path": "/m", "mlm_head_untrained": True}}
    for key in ("prefix_length", "prefix_dropout", "base_model_path", "mlm_head_untrained"):
        old.pop(key)
    assert MethodSpec.from_meta(old) == replace(spec("prompt_tuning"), prefix_length=4, prefix_dropout=0.2,
                                                base_model_path="/m", mlm_head_untrained=True)


def test_only_methods_that_ask_a_question_record_a_template(tiny_udpos):
    from topro.config import TrainConfig
    from topro.train import method_spec

    for name, prompted in (("vanilla", False), ("prompt_tuning", False), ("topro", True), ("topro_soft", True)):
        meta = method_spec(TrainConfig(method=name, model=tiny_udpos), tiny_udpos).meta()
        assert (meta["template"] is not None) == prompted and (meta["verbalizer"] is not None) == prompted
        assert meta["base_model_path"] == tiny_udpos and "extra" not in meta
