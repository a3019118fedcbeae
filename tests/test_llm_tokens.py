"""LLM scoring on the tokenizers and model families users bring: answers
scored with their terminator, prompts tokenized as whole strings (Llama-style
legacy SentencePiece), ALiBi models (BLOOM)."""
import pytest
import torch

from llm_tiny import corpus_lines, tiny_model, tiny_model_dir
from topro.data import Sentence, get_task
from topro.llm.backends import HFBackend
from topro.llm.evaluate import LLMEvalConfig, RunSetup, predict_sentences
from topro.prompts.formats import load_format, render_context, render_topro

WORDS = ("other thing number verb name place body person location organisation reference symbol punct "
         "condition mode link position functional").split()


def _memorise(model, texts: list[str], tok, steps: int = 60) -> None:
    """A few Adam steps on `texts` (teacher forcing), so the model knows these answers."""
    torch.manual_seed(0)
    batch = [tok(t).input_ids for t in texts]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = sum(model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss for ids in batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_a_label_that_starts_another_label_can_lose_to_it():
    """" thing" is a token prefix of " things": summed over its own tokens only,
    " thing" always scores at least as high. With the line end after each
    answer, a model that answers "things" gets "things"."""
    backend = HFBackend(str(tiny_model_dir("llama")), threads=1)
    model, tok = tiny_model("llama")
    model = type(model).from_pretrained(tiny_model_dir("llama"), dtype=torch.float64).eval()
    backend.model = model
    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    # A word whose plural's tokens start with the word's (the case to show).
    word = next(w for w in ["other", "verb", "name", "place", "thing", "person", "number", "symbol", "mode"]
                if ids(f" {w}s")[:len(ids(f" {w}"))] == ids(f" {w}"))
    task = get_task("udpos")
    label_words = {tag: w for tag, w in zip(task.labels, [w for w in WORDS if w != word])}
    label_words["NOUN"], label_words["ADJ"] = word, word + "s"
    fmt = load_format("topro")
    context = render_context(fmt, task.name, label_words, [])
    sentence = Sentence(["Anton", "lives", "in", "Berlin", "."], ["ADJ"] * 5)
    prompts = render_topro(fmt, task.name, label_words, context, sentence.words)
    _memorise(model, [context + prompts.sentence + q + f" {word}s\n" for q in prompts.questions], tok)
    setup = RunSetup(task, fmt, label_words, context, "X")
    cfg = LLMEvalConfig(task="udpos", model="tiny", format="topro")
    [result] = predict_sentences(backend, setup, cfg, [sentence])
    assert result.tags == ["ADJ"] * 5


@pytest.fixture(scope="module")
def legacy_llama(tmp_path_factory):
    """A tiny random Llama with a Llama-2-style SentencePiece tokenizer (BPE,
    dummy prefix added at every call, as the legacy slow tokenizer does)."""
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    folder = tmp_path_factory.mktemp("legacy-llama")
    (folder / "corpus.txt").write_text("\n".join(corpus_lines()), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=500, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, add_dummy_prefix=True, minloglevel=2)
    tok = LlamaTokenizer.from_pretrained(folder, legacy=True)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    backend = HFBackend(str(folder), threads=1, dtype="fp64")
    pieces = ["Sentence: Anton lives .\n", "Named entity type of the word Anton is"]
    whole = backend.ids("".join(pieces))
    assert whole != backend.ids(pieces[0]) + backend.ids(pieces[1])  # the tokenizer this test is about
    return backend


CONTEXT = "Named entity type: location organisation person place body name other\n"
SENTENCE = "Sentence: Anton lives in Berlin .\n"
QUESTIONS = [f"Named entity type of the word {w} in the sentence is" for w in ["Anton", "Berlin", "."]]
ANSWERS = [" location\n", " person\n", " other\n", " organisation\n"]


def test_legacy_sentencepiece_prompts_score_as_whole_strings(legacy_llama):
    """Local scores equal those of a server that tokenizes each whole prompt
    (the ids a piecewise encoding got had a spurious "▁" at every boundary)."""
    from llm_server import TinyOpenAIServer
    from topro.llm.backends import HTTPSettings, OpenAIBackend

    local = legacy_llama.score(CONTEXT, SENTENCE, QUESTIONS, ANSWERS)
    with TinyOpenAIServer(legacy_llama.model, legacy_llama.tokenizer) as server:
        remote = OpenAIBackend(server.url, settings=HTTPSettings(concurrency=2)).score(
            CONTEXT, SENTENCE, QUESTIONS, ANSWERS)
    torch.testing.assert_close(local.logprobs.float(), remote.logprobs, atol=1e-4, rtol=0)  # the server sums in float32
    assert local.continuation_tokens == remote.continuation_tokens
    legacy_llama.scoring = "naive"
    try:
        naive = legacy_llama.score(CONTEXT, SENTENCE, QUESTIONS, ANSWERS)
    finally:
        legacy_llama.scoring = "shared"
    torch.testing.assert_close(local.logprobs, naive.logprobs, atol=1e-8, rtol=1e-10)
    [many] = legacy_llama.score_many(CONTEXT, [(SENTENCE, QUESTIONS)], ANSWERS)
    torch.testing.assert_close(many.logprobs, local.logprobs, atol=1e-8, rtol=1e-10)


def _reference_scores(model, tok, context, sentence, questions, answers) -> torch.Tensor:
    """log p(answer | prompt) from one plain forward per whole prompt (no padding, no cache)."""
    out = torch.zeros(len(questions), len(answers), dtype=torch.float64)
    for i, q in enumerate(questions):
        prompt = context + sentence + q
        n = len(tok(prompt).input_ids)
        for j, a in enumerate(answers):
            ids = tok(prompt + a).input_ids
            with torch.inference_mode():
                lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            out[i, j] = sum(float(lp[k - 1, ids[k]]) for k in range(n, len(ids)))
    return out


def test_bloom_alibi_falls_back_to_full_prompts_with_equal_scores(tmp_path, caplog):
    """BLOOM's ALiBi bias comes from the 2-D mask: the tree mask cannot carry it.
    The backend says so at start-up and scores every prompt in full."""
    import logging
    import shutil

    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM

    for f in tiny_model_dir("llama").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, tmp_path / f.name)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4, initializer_range=0.2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    BloomForCausalLM(config).save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="topro.llm.backends"):
        backend = HFBackend(str(tmp_path), threads=1, dtype="fp64")
    assert backend.scoring == "naive" and "ALiBi" in caplog.text
    answers = [" location", " person", " other"]
    got = backend.score(CONTEXT, SENTENCE, QUESTIONS, answers).logprobs.double()
    want = _reference_scores(backend.model, tok, CONTEXT, SENTENCE, QUESTIONS, answers)
    # The model runs in float64; scores are returned as float32 (rounding ~1e-6 at these sizes).
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    [many] = backend.score_many(CONTEXT, [(SENTENCE, QUESTIONS)], answers)
    torch.testing.assert_close(many.logprobs.double(), want, atol=1e-5, rtol=0)
    out = backend.generate([SENTENCE + q for q in QUESTIONS], max_new_tokens=3, context=CONTEXT)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
