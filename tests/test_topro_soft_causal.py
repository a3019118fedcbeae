"""Soft ToPro and RoSPrompt on causal LMs (tiny random Llama and Gemma 3, float64 where numerical): a soft
prompt at the template's embeddings scores as causal ToPro, only the prompt trains, checkpoints hold only
the prompt and reload to the same scores, RoSPrompt's word sets are causal continuations."""
from __future__ import annotations

import json

import pytest
import torch

from llm_tiny import tiny_model_dir
from topro.data import get_task, load_split
from topro.methods import MethodSpec, build_method, load_checkpoint

KINDS = ["llama", "gemma3"]
TEMPLATE_TOKENS = 21  # "Part-of-speech tag of the word" + "in the sentence is" with the tiny BPE (asserted below)


def method_on(kind: str, method: str = "topro_soft", **spec):
    task = get_task("udpos")
    path = str(tiny_model_dir(kind))
    fields = dict(method=method, task="udpos", labels=list(task.labels), base_model=path, base_model_path=path,
                  verbalizer=task.default_verbalizer, max_length=1024, max_packed_length=2048,
                  prefix_length=TEMPLATE_TOKENS)
    return build_method(MethodSpec(**{**fields, **spec}), path), path


def model_of(method, path, dtype=torch.float64):
    torch.manual_seed(0)
    return method.build_model(path).to(dtype)


def sentences(data_dir, n=2):
    return load_split("udpos", "en", "dev", str(data_dir), limit=n)


def log_probs(method, model, sents):
    with torch.no_grad():
        return method.label_log_probs(model.eval(), method.collate(method.encode(sents)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("packing", ["per_word", "sentence"])
def test_soft_prompt_at_template_embeddings_scores_as_causal_topro(kind, packing, data_dir):
    """With one soft vector per template token, each started at that token's input embedding (Gemma's
    scaled one), the inputs are causal ToPro's: the same label log-probs (float64, 1e-9), per word and packed."""
    sents = sentences(data_dir)
    hard, path = method_on(kind, "topro", prompt_packing=packing)
    soft, _ = method_on(kind, prompt_packing=packing)
    assert type(soft).__name__ == "CausalToProSoft"
    assert len(soft.before) + len(soft.after) == soft.n_slots == TEMPLATE_TOKENS
    rows = soft.encode(sents)
    # The template is all soft; a packed row runs the text before the word once for all its questions.
    assert all(sum(t < 0 for t in r.input_ids) == len(soft.before) + len(soft.after) * len(r.words) for r in rows)
    want = log_probs(hard, model_of(hard, path), sents)
    got = log_probs(soft, model_of(soft, path), sents)
    assert got.shape == (sum(len(s) for s in sents), 17)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_soft_topro_on_bloom_per_word_scores_as_causal_topro(data_dir):
    """ALiBi: the prompt trees are unfolded per label, the soft vectors with them (float64, 1e-9)."""
    sents = sentences(data_dir, 1)
    hard, path = method_on("bloom", "topro")
    soft, _ = method_on("bloom")
    torch.testing.assert_close(log_probs(soft, model_of(soft, path), sents),
                               log_probs(hard, model_of(hard, path), sents), atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_soft_prompt_receives_gradient_and_moves_the_scores(kind, data_dir):
    sents = sentences(data_dir, 1)
    method, path = method_on(kind)
    model = model_of(method, path).train()
    batch = method.collate(method.encode(sents))
    method.loss(model, batch).backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad == ["soft_prompt"] and [n for n, p in model.named_parameters() if p.requires_grad] == with_grad
    assert float(model.soft_prompt.grad.abs().max()) > 0
    before = log_probs(method, model, sents)
    with torch.no_grad():
        model.soft_prompt -= 0.5 * model.soft_prompt.grad / model.soft_prompt.grad.norm()
    assert float((log_probs(method, model, sents) - before).abs().max()) > 1e-6


def test_prefix_placement_keeps_the_question_and_prepends_the_vectors(data_dir):
    sents = sentences(data_dir, 1)
    hard, _ = method_on("llama", "topro")
    soft, _ = method_on("llama", soft_prompt_placement="prefix", prefix_length=4)
    [q_hard], [q_soft] = hard.question_ids([[5, 6, 7]]), soft.question_ids([[5, 6, 7]])
    assert q_soft == [-1, -2, -3, -4] + q_hard
    assert soft.init_token_ids == soft.before[:4]
    rows = soft.encode(sents)
    assert len(rows) == len(sents[0]) and all(sum(t < 0 for t in r.input_ids) == 4 for r in rows)


def test_checkpoint_holds_only_the_prompt_and_reloads_to_the_same_scores(tmp_path, data_dir):
    from safetensors.torch import load_file

    sents = sentences(data_dir, 1)
    method, path = method_on("gemma3")
    model = model_of(method, path, torch.float32)
    with torch.no_grad():
        model.soft_prompt.add_(0.1 * torch.randn_like(model.soft_prompt))  # as if trained
    method.save(model, tmp_path)
    assert set(load_file(tmp_path / "trained.safetensors")) == {"soft_prompt"}
    assert not list(tmp_path.glob("model*.safetensors"))
    meta = json.loads((tmp_path / "topro.json").read_text())
    assert meta["method"] == "topro_soft" and meta["architecture"] == "causal"
    assert meta["n_trainable_params"] == TEMPLATE_TOKENS * 64 and meta["soft_prompt"]["n_vectors"] == TEMPLATE_TOKENS
    loaded_method, loaded = load_checkpoint(tmp_path)
    assert type(loaded_method).__name__ == "CausalToProSoft"
    torch.testing.assert_close(loaded.soft_prompt, model.soft_prompt)
    torch.testing.assert_close(log_probs(loaded_method, loaded, sents), log_probs(method, model, sents),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("packing", ["per_word", "sentence"])
def test_rosprompt_with_the_verbalizer_words_and_mean_is_soft_topro(packing, data_dir):
    """One seed word per label, ``mean`` over it: RoSPrompt's label log-probs are soft ToPro's, per word
    and packed."""
    sents = sentences(data_dir, 1)
    soft, path = method_on("llama", prompt_packing=packing)
    ros, _ = method_on("llama", "rosprompt", prompt_packing=packing)
    assert type(ros).__name__ == "CausalRoSPrompt" and ros.n_scored == 17
    torch.testing.assert_close(log_probs(ros, model_of(ros, path), sents),
                               log_probs(soft, model_of(soft, path), sents), atol=1e-9, rtol=0)


def test_rosprompt_knn_on_a_causal_lm_trains_the_prompt_and_reloads_its_words(tmp_path, data_dir):
    sents = sentences(data_dir, 1)
    method, path = method_on("llama", "rosprompt", verbalizer_expansion="knn", knn_k=3, knn_aggregate="logsumexp",
                             label_smoothing=0.1, prompt_drift_penalty=0.5, prefix_length=8)
    assert len(method.word_sets) == 17 and all(len(w) == 3 for w in method.word_sets)
    assert 17 <= method.n_scored <= 51 and all(1 <= len(t) <= 3 for t in method.label_texts)
    model = model_of(method, path).train()
    batch = method.collate(method.encode(sents))
    scores = method.label_scores(model, batch)
    assert scores.shape == (len(sents[0]), 17) and torch.isfinite(scores).all()
    assert float(method.drift_penalty(model).detach()) == 0.0  # at its initialisation
    loss = method.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and [n for n, p in model.named_parameters() if p.grad is not None] == ["soft_prompt"]
    with torch.no_grad():
        model.soft_prompt -= 0.1 * model.soft_prompt.grad
    assert float(method.drift_penalty(model).detach()) > 0
    method.save(model, tmp_path)
    meta = json.loads((tmp_path / "topro.json").read_text())
    assert meta["label_token_sets"] == method.word_sets and list(meta["label_word_sets"]) == method.labels
    loaded_method, loaded = load_checkpoint(tmp_path)
    assert loaded_method.word_texts == method.word_texts
    torch.testing.assert_close(log_probs(loaded_method, loaded, sents), log_probs(method, model.float(), sents),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_rosprompt_knn_packed_scores_and_gradients_as_per_word(kind, data_dir):
    """A decoder sees only the left context, so packing a sentence's questions changes no score: RoSPrompt
    with kNN word sets (several continuations per label, logsumexp), packed == per word in label log-probs
    and in the soft prompt's gradient (float64)."""
    sents = sentences(data_dir, 2)
    settings = dict(verbalizer_expansion="knn", knn_k=3, knn_aggregate="logsumexp", prefix_length=8)
    per_word, path = method_on(kind, "rosprompt", **settings)
    packed, _ = method_on(kind, "rosprompt", prompt_packing="sentence", label_token_sets=per_word.word_sets,
                          **settings)
    rows = packed.encode(sents)
    assert len(rows) == len(sents)
    grads, scores = [], []
    for method, batch in ((per_word, per_word.collate(per_word.encode(sents))), (packed, packed.collate(rows))):
        model = model_of(method, path).eval()
        out = method.label_log_probs(model, batch)
        weights = torch.arange(out.numel(), dtype=out.dtype).sin().view_as(out)  # any fixed function of them
        (weights * out).sum().backward()
        scores.append(out.detach())
        grads.append(model.soft_prompt.grad.clone())
    torch.testing.assert_close(scores[1], scores[0], atol=1e-9, rtol=0)
    # The attention softmax runs in float32 even on float64 inputs (see test_topro_causal's packed test): the
    # prompt's gradient sums the same parts in another order. Measured here: 4e-6 on a gradient of max ~73.
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6 * float(grads[0].abs().max()), rtol=1e-6)


def test_rosprompt_knn_loads_the_backbone_once_per_run(monkeypatch):
    """kNN reads the input embeddings before the model is built: build_model takes that backbone instead of
    loading it a second time (a second build loads afresh, so the first model is never shared)."""
    from topro.methods.topro_soft_causal import CausalToProSoft

    loads = []
    real = CausalToProSoft._load_lm

    def counted(path):
        loads.append(path)
        return real(path)

    monkeypatch.setattr(CausalToProSoft, "_load_lm", staticmethod(counted))
    method, path = method_on("llama", "rosprompt", verbalizer_expansion="knn", knn_k=3, prefix_length=8)
    first = method.build_model(path)
    assert loads == [path]
    second = method.build_model(path)
    assert loads == [path, path] and second.lm is not first.lm


@pytest.mark.slow
@pytest.mark.parametrize("method", ["topro_soft", "rosprompt"])
def test_train_and_evaluate_through_the_cli(method, tmp_path, data_dir, capsys):
    from topro.cli import main

    path = str(tiny_model_dir("gemma3"))
    out = tmp_path / "run"
    code = main(["train", "--config", "configs/train/udpos-topro.yaml", "--data-dir", str(data_dir),
                 "--output", str(out), f"model={path}", f"method={method}", "max_train_sentences=4",
                 "max_dev_sentences=2", "epochs=1", "eval_langs=[]", "progress=false", "learning_rate=1e-2",
                 "max_length=512", "batch_size=16", f"prefix_length={TEMPLATE_TOKENS}"])
    assert code == 0, capsys.readouterr().err
    checkpoint = out / "checkpoint"
    meta = json.loads((checkpoint / "topro.json").read_text())
    assert meta["method"] == method and meta["architecture"] == "causal" and not meta["backbone_in_checkpoint"]
    assert (checkpoint / "trained.safetensors").is_file() and not list(checkpoint.glob("model*.safetensors"))
    result = tmp_path / "eval.json"
    code = main(["evaluate", "--checkpoint", str(checkpoint), "--langs", "de", "--data-dir", str(data_dir),
                 "--max-sentences", "2", "--output", str(result)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(result.read_text())
    assert record["languages"]["de"]["n_sentences"] == 2 and 0.0 <= record["languages"]["de"]["accuracy"] <= 1.0


def test_fine_tuned_backbone_is_saved_whole_beside_the_prompt(tmp_path, data_dir):
    """``freeze_backbone: false``: the decoder trains with the prompt, and the checkpoint holds both."""
    sents = sentences(data_dir, 1)
    method, path = method_on("gemma3", freeze_backbone=False)
    model = model_of(method, path, torch.float32).train()
    method.loss(model, method.collate(method.encode(sents))).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert "soft_prompt" in with_grad and any(n.startswith("lm.model.layers.") for n in with_grad)
    with torch.no_grad():
        model.lm.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # as if trained
        model.soft_prompt.add_(0.1)
    method.save(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "topro.json").read_text())["backbone_in_checkpoint"] is True
    loaded_method, loaded = load_checkpoint(tmp_path)
    torch.testing.assert_close(loaded.lm.model.layers[0].mlp.down_proj.weight, model.lm.model.layers[0].mlp.down_proj.weight)
    torch.testing.assert_close(log_probs(loaded_method, loaded, sents), log_probs(method, model, sents), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,packing,fmt,setting", [("topro_soft", "sentence", "topro-tags", "when_needed"),
                                                         ("rosprompt", "per_word", "topro-tags", "when_needed"),
                                                         ("topro_soft", "sentence", "topro", "per_answer")])
def test_answer_end_setting_soft_prompt_at_template_scores_as_causal_topro(method, packing, fmt, setting, data_dir):
    """``answer_end_scored: when_needed`` with prefix-free label words (``topro-tags``): soft ToPro and
    RoSPrompt drop the answer end too; ``per_answer`` with the default words (" verb" starts " verbal"):
    soft ToPro scores the end after the same words as causal ToPro. Started at the template's embeddings,
    each scores as causal ToPro with the same setting (float64, 1e-9)."""
    sents = sentences(data_dir, 1)
    spec = dict(llm_format=fmt, answer_end_scored=setting, prompt_packing=packing)
    hard, path = method_on("llama", "topro", **spec)
    probe, _ = method_on("llama", method, prefix_length=0, **spec)
    soft, _ = method_on("llama", method, prefix_length=len(probe.before) + len(probe.after), **spec)
    assert hard.answer_ends == soft.answer_ends
    assert hard.answer_ends == [""] * hard.n_scored if setting == "when_needed" else "\n" in hard.answer_ends
    torch.testing.assert_close(log_probs(soft, model_of(soft, path), sents),
                               log_probs(hard, model_of(hard, path), sents), atol=1e-9, rtol=0)
