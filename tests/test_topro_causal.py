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


def _scores_and_grads(method, model, sents):
    model.zero_grad()
    batch = method.collate(method.encode(sents))
    scores = method.label_scores(model, batch)
    method.loss(model, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return scores.detach(), grads


@pytest.mark.parametrize("kind", KINDS)
def test_packed_rows_give_per_word_scores_and_gradients(kind, data_dir):
    """One row per sentence (each question seeing the sentence and itself, at its own prompt's positions)
    is the per-word computation: the same label scores and loss gradients in float64. Gemma 3's rows are
    far longer than its tiny sliding window (8), so the local layers' windows are crossed."""
    sents = sentences(data_dir, 2)
    per_word, model, _ = causal_method(kind)
    packed, _, _ = causal_method(kind, "sentence")
    model.train()  # dropout is 0 in these configs: train mode, as in a training step
    rows = packed.encode(sents)
    assert len(rows) == len(sents) and len(per_word.encode(sents)) == sum(len(s) for s in sents)
    if kind == "gemma3":
        assert min(r.length for r in rows) > 4 * model.config.sliding_window
    want_scores, want_grads = _scores_and_grads(per_word, model, sents)
    got_scores, got_grads = _scores_and_grads(packed, model, sents)
    torch.testing.assert_close(got_scores, want_scores, atol=1e-9, rtol=1e-9)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 5
    # The models' attention softmax runs in float32 even for float64 inputs (transformers' eager path; SDPA
    # the same on this CPU): a sentence token's gradient is one sum in the packed row and a sum of per-word
    # parts otherwise, rounded to float32 at different points. Measured: up to 1.3e-7 on gradients of
    # magnitude ~3 (layer 0; the last layer, where no sentence output is read, agrees to 1e-16).
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6 * float(grad.abs().max()), rtol=1e-6,
                                   msg=name)


def test_packed_rows_respect_max_packed_length_and_questions(data_dir):
    sents = sentences(data_dir, 2)
    method, _, _ = causal_method("llama", "sentence", max_packed_length=200, max_questions_per_row=3)
    rows = method.encode(sents)
    assert all(len(r.words) <= 3 for r in rows)
    assert sorted((r.sentence, w) for r in rows for w in r.words) == [
        (i, w) for i, s in enumerate(sents) for w in range(len(s))]


def test_long_sentence_prompt_is_trimmed_to_max_length(data_dir):
    """A prompt longer than max_length keeps the widest window of words around its word that fits."""
    sents = sentences(data_dir, 3)
    method, model, _ = causal_method("llama", max_length=140)  # full prompts: 114-116, 164-170, 188-194 tokens
    rows = method.encode(sents)
    assert [r.trimmed_context for r in rows if r.sentence == 0] == [False] * len(sents[0])
    assert all(r.trimmed_context for r in rows if r.sentence > 0)
    assert all(max(r.position_ids) < 140 for r in rows)


@pytest.mark.slow
def test_train_save_load_evaluate_round_trip(tmp_path, data_dir, capsys):
    from topro.cli import main

    path = str(tiny_model_dir("gemma3"))
    out = tmp_path / "run"
    code = main(["train", "--config", "configs/train/udpos-topro.yaml", "--data-dir", str(data_dir),
                 "--output", str(out), f"model={path}", "max_train_sentences=6", "max_dev_sentences=4",
                 "epochs=1", "eval_langs=[]", "progress=false", "learning_rate=1e-3", "max_length=512",
                 "batch_size=16", "prompt_packing=sentence"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "checkpoint" / "topro.json").read_text())
    assert meta["architecture"] == "causal" and meta["prompt_packing"] == "sentence"
    result = tmp_path / "eval.json"
    code = main(["evaluate", "--checkpoint", str(out / "checkpoint"), "--langs", "de", "--data-dir", str(data_dir),
                 "--max-sentences", "4", "--output", str(result)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(result.read_text())
    assert record["languages"]["de"]["n_sentences"] == 4 and 0.0 <= record["languages"]["de"]["accuracy"] <= 1.0

    from topro.data.readers import Sentence
    from topro.serving import Tagger

    tagger = Tagger.load(str(out / "checkpoint"), device="cpu")
    [tagged] = tagger.tag([Sentence(["Anton", "lives", "in", "Berlin", "."], [], "en", "request")])
    assert [w.word for w in tagged.words] == ["Anton", "lives", "in", "Berlin", "."]
    assert all(w.tag in tagger.method.labels and 0.0 < w.prob <= 1.0 for w in tagged.words)
    assert tagger.info.prompt_packing == "sentence"


def test_tied_lm_head_is_not_flagged_untrained(tmp_path):
    """gemma-3-270m's safetensors has no lm_head.* key: its head is its embedding matrix (tied). A causal
    LM whose untied head is missing is flagged."""
    import shutil

    from safetensors.torch import load_file, save_file

    from topro.models import mlm_head_untrained

    gemma, llama = tiny_model_dir("gemma3"), tiny_model_dir("llama")
    assert not any(k.startswith("lm_head") for k in load_file(gemma / "model.safetensors"))
    assert mlm_head_untrained(str(gemma)) is False and mlm_head_untrained(str(llama)) is False
    headless = tmp_path / "headless"
    shutil.copytree(llama, headless)
    weights = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("lm_head")}, headless / "model.safetensors",
              metadata={"format": "pt"})
    assert mlm_head_untrained(str(headless)) is True


def test_no_pad_token_pads_with_eos(caplog):
    from transformers import AutoTokenizer

    path = str(tiny_model_dir("llama"))
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = None
    task = get_task("udpos")
    with caplog.at_level("INFO", logger="topro.methods.topro_causal"):
        method = build_method(MethodSpec("topro", "udpos", list(task.labels), path), path, tok)
    assert method.tokenizer.pad_token_id == tok.eos_token_id
    assert "no pad token: padding with its eos token" in caplog.text


def test_precheck_refuses_max_length_past_positions_and_headless_model_types(tmp_path):
    from transformers import LlamaConfig, ViTConfig

    from topro.config import ConfigError, TrainConfig
    from topro.precheck import check_backbone

    llama = tmp_path / "llama"
    LlamaConfig(max_position_embeddings=256, architectures=["LlamaForCausalLM"]).save_pretrained(llama)
    check_backbone(TrainConfig(model=str(llama), max_length=256))
    with pytest.raises(ConfigError, match=r"max_length=512 exceeds the 256 positions"):
        check_backbone(TrainConfig(model=str(llama), max_length=512))
    vit = tmp_path / "vit"
    ViTConfig().save_pretrained(vit)
    with pytest.raises(ConfigError, match=r"model .*'vit'.* neither a masked-LM nor a causal-LM head"):
        check_backbone(TrainConfig(model=str(vit)))
    check_backbone(TrainConfig(model=str(vit), method="vanilla"))  # a plain encoder is fine for vanilla


def test_bloom_alibi_per_word_scores_equal_eval_llm_and_packed_is_refused(data_dir):
    """BLOOM's ALiBi biases come from a 2-D padding mask, which cannot hold a prompt tree: per word, each row
    is run as one plain sequence per label, which is what eval-llm's naive scoring (its fallback for ALiBi)
    runs, so the label log-probs are the same (float64, 1e-6) and a loss trains the model. Packed rows
    cannot be unfolded so: refused by name."""
    from topro.llm.backends import HFBackend
    from topro.llm.evaluate import LLMEvalConfig, predict_sentences, prepare

    method, model, path = causal_method("bloom")
    sents = sentences(data_dir, 1)
    batch = method.collate(method.encode(sents))
    model.eval()
    with torch.no_grad():
        ours = method.label_log_probs(model, batch).numpy()
    cfg = LLMEvalConfig(task="udpos", model=path, format="topro", mode="score", shots=0)
    backend = HFBackend(path, threads=1, dtype="fp64")
    assert backend.scoring == "naive"
    reference = np.concatenate([r.log_probs for r in predict_sentences(backend, prepare(cfg), cfg, sents)])
    assert ours.shape == reference.shape == (len(sents[0]), len(method.labels))
    np.testing.assert_allclose(ours, reference, atol=1e-6, rtol=0)
    model.train()
    method.loss(model, batch).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert float(model.transformer.h[0].self_attention.query_key_value.weight.grad.abs().max()) > 0
    with pytest.raises(ValueError, match=r"prompt_packing='sentence'.*bloom.*ALiBi"):
        causal_method("bloom", "sentence")


def test_unseen_labels_leave_the_training_softmax(data_dir):
    """An unseen label's column is out of the loss's softmax (as on masked LMs): the loss is the cross-entropy
    over the seen labels' scores alone, and the unseen words get no gradient from it."""
    from topro.methods.base import hide_unseen_gold

    method, model, _ = causal_method("llama", unseen_labels=["INTJ", "SYM", "X"])
    unseen = method.unseen_index.tolist()
    assert [method.labels[i] for i in unseen] == ["INTJ", "SYM", "X"]
    examples, _ = hide_unseen_gold(method.encode(sentences(data_dir, 1)), unseen)
    batch = method.collate(examples)
    with torch.no_grad():
        scores = method.label_scores(model, batch)
        seen = [i for i in range(len(method.labels)) if i not in unseen]
        position = {label: k for k, label in enumerate(seen)}
        want = torch.nn.functional.cross_entropy(scores[:, seen], torch.tensor([position[int(l)] for l in batch["labels"]]))
        everything = torch.nn.functional.cross_entropy(scores, batch["labels"])
        got = method.loss(model, batch)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert float((got - everything).abs()) > 1e-6


def _eval_llm_log_probs(path, fmt, sents, answer_end_scored):
    from topro.llm.backends import HFBackend
    from topro.llm.evaluate import LLMEvalConfig, predict_sentences, prepare

    cfg = LLMEvalConfig(task="udpos", model=path, format=fmt, mode="score", shots=0,
                        answer_end_scored=answer_end_scored)
    setup = prepare(cfg)
    results = predict_sentences(HFBackend(path, threads=1, dtype="fp64"), setup, cfg, sents)
    return np.concatenate([r.log_probs for r in results]), setup.answer_ends


@pytest.mark.parametrize("kind", KINDS)
def test_answer_end_dropped_for_prefix_free_labels_per_word_packed_and_eval_llm_agree(kind, data_dir, caplog):
    """``answer_end_scored: when_needed`` with label words that tokenize prefix-free (the tag names of
    ``topro-tags``, 2-5 tokens each on the tiny tokenizer): the answer end is not scored, the rows shrink, and
    per-word, packed and eval-llm with the same setting give the same label log-probs (float64, 1e-6), which
    differ from the ``always`` ones."""
    sents = sentences(data_dir, 2)
    spec = dict(llm_format="topro-tags", answer_end_scored="when_needed")
    with caplog.at_level("INFO", logger="topro.llm.backends"):
        per_word, model, path = causal_method(kind, **spec)
        assert per_word.answer_ends == [""] * per_word.n_scored
    assert "prefix-free" in caplog.text and "without the answer end" in caplog.text
    packed, _, _ = causal_method(kind, "sentence", **spec)
    always, _, _ = causal_method(kind, llm_format="topro-tags")
    assert set(always.answer_ends) == {"\n"} and per_word.meta()["answer_end_scored"] == "when_needed"
    rows, rows_always = per_word.encode(sents), always.encode(sents)
    assert sum(r.length for r in rows) < sum(r.length for r in rows_always)
    assert sum(len(r.slots) for r in rows) < sum(len(r.slots) for r in rows_always)
    model.eval()
    with torch.no_grad():
        got = per_word.label_log_probs(model, per_word.collate(rows)).numpy()
        got_packed = packed.label_log_probs(model, packed.collate(packed.encode(sents))).numpy()
    reference, end = _eval_llm_log_probs(path, "topro-tags", sents, "when_needed")
    assert set(end) == {""}
    np.testing.assert_allclose(got, reference, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_packed, reference, atol=1e-6, rtol=0)
    with_end, _ = _eval_llm_log_probs(path, "topro-tags", sents, "always")
    assert np.abs(with_end - reference).max() > 1e-3


def test_answer_end_kept_when_labels_are_not_prefix_free(data_dir, caplog):
    """The default verbalizer's " verb" is one token that starts " verbal": ``when_needed`` keeps the end
    (training and eval-llm alike, logged), so the scores are the ``always`` ones."""
    sents = sentences(data_dir, 1)
    with caplog.at_level("INFO", logger="topro.llm.backends"):
        method, model, path = causal_method("llama", answer_end_scored="when_needed")
        assert set(method.answer_ends) == {"\n"}
    assert "not prefix-free" in caplog.text and "' verbal'" in caplog.text
    model.eval()
    with torch.no_grad():
        got = method.label_log_probs(model, method.collate(method.encode(sents))).numpy()
    reference, end = _eval_llm_log_probs(path, "topro", sents, "always")
    assert set(end) == {"\n"}
    np.testing.assert_allclose(got, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_answer_end_per_answer_only_after_the_words_that_start_another(kind, data_dir, caplog):
    """``answer_end_scored: per_answer`` on the default verbalizer, whose " verb" is one token that starts
    " verbal": the answer end after exactly the answers whose tokens start another answer's (logged, naming
    them), none after the rest; per-word, packed and eval-llm with the same setting give the same label
    log-probs (float64, 1e-6), different from ``always``'s, with fewer tokens than ``always``; and every
    score is the probability of its own disjoint event ("exactly A", "starts with B"), so the labels'
    probabilities sum to at most 1."""
    sents = sentences(data_dir, 2)
    with caplog.at_level("INFO", logger="topro.llm.backends"):
        per_word, model, path = causal_method(kind, answer_end_scored="per_answer")
        ends = per_word.answer_ends
    from topro.prompts.formats import render_topro

    setup = per_word.setup
    probe = render_topro(setup.fmt, "udpos", setup.label_words, setup.context, ["word"])
    before = setup.context + probe.sentence + probe.questions[0]
    ids = {t: per_word.tokens.tail_ids(before, probe.answers[t]) for t in per_word.labels}
    starts = {t for t in ids for u in ids if len(ids[t]) < len(ids[u]) and ids[u][:len(ids[t])] == ids[t]}
    assert "' verbal'" in caplog.text and "after those only" in caplog.text
    assert 0 < ends.count("\n") < len(ends) and set(ends) == {"", "\n"}
    assert ends[per_word.labels.index("VERB")] == "\n"
    assert {t for t, e in zip(per_word.labels, ends) if e} == starts
    packed, _, _ = causal_method(kind, "sentence", answer_end_scored="per_answer")
    always, _, _ = causal_method(kind)
    rows = per_word.encode(sents)
    assert sum(r.length for r in rows) < sum(r.length for r in always.encode(sents))
    model.eval()
    with torch.no_grad():
        got = per_word.label_log_probs(model, per_word.collate(rows)).numpy()
        raw = per_word.label_scores(model, per_word.collate(rows))
        got_packed = packed.label_log_probs(model, packed.collate(packed.encode(sents))).numpy()
    assert float(torch.logsumexp(raw, dim=-1).max()) <= 1e-9
    reference, end = _eval_llm_log_probs(path, "topro", sents, "per_answer")
    assert end == ends
    np.testing.assert_allclose(got, reference, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_packed, reference, atol=1e-6, rtol=0)
    with_end, _ = _eval_llm_log_probs(path, "topro", sents, "always")
    assert np.abs(with_end - reference).max() > 1e-3


def test_answers_that_tokenize_identically_are_warned(caplog):
    """Two distinct answers the tokenizer cannot tell apart (the tiny BPE has no byte fallback: ' 中' and
    ' 日' are both ' ' + [unk]) always score the same, with the answer end or without: a warning names them,
    under either setting; answers it does tell apart raise none."""
    from topro.llm.backends import scored_answer_ends

    method, _, _ = causal_method("llama")
    with caplog.at_level("WARNING", logger="topro.llm.backends"):
        scored_answer_ends("always", method.setup, method.tokens, [" noun", " verb"])
        assert "tokenize identically" not in caplog.text
        for setting in ("always", "when_needed"):
            scored_answer_ends(setting, method.setup, method.tokens, [" 中", " 日", " noun"])
    assert caplog.text.count("tokenize identically") == 2 and "' 中', ' 日'" in caplog.text


def test_answer_end_setting_recorded_and_read_back():
    """topro.json records the setting, so evaluation and serving rebuild the method that was trained;
    checkpoints from before the setting read back as ``always``."""
    method, _, _ = causal_method("llama", llm_format="topro-tags", answer_end_scored="when_needed")
    spec = MethodSpec.from_meta(json.loads(json.dumps(method.meta())))
    assert spec.answer_end_scored == "when_needed"
    old = {k: v for k, v in method.meta().items() if k != "answer_end_scored"}
    assert MethodSpec.from_meta(old).answer_end_scored == "always"
    with pytest.raises(ValueError, match="answer_end_scored"):
        causal_method("llama", answer_end_scored="sometimes")[0].answer_ends


def test_checkpoint_scores_with_the_answer_end_setting_it_was_trained_with(tmp_path, data_dir):
    """A saved causal ToPro checkpoint with ``when_needed`` reloads (``load_checkpoint``, as ``topro evaluate``
    and Serve do) dropping the answer end again: the same label log-probs."""
    from topro.methods import load_checkpoint

    sents = sentences(data_dir, 1)
    method, model, _ = causal_method("llama", llm_format="topro-tags", answer_end_scored="when_needed")
    model.eval()
    method.save(model, tmp_path)
    assert json.loads((tmp_path / "topro.json").read_text())["answer_end_scored"] == "when_needed"
    loaded, loaded_model = load_checkpoint(tmp_path)
    assert set(loaded.answer_ends) == {""}
    with torch.no_grad():
        want = method.label_log_probs(model, method.collate(method.encode(sents)))
        got = loaded.label_log_probs(loaded_model.to(torch.float64), loaded.collate(loaded.encode(sents)))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
