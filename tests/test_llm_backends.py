"""Backends: a local HF model, and the OpenAI-compatible client against a real
HTTP server on 127.0.0.1 (retries on 503, timeouts, concurrency limit, chat fallback)."""
from collections import OrderedDict

import pytest
import torch

from llm_server import TinyOpenAIServer
from llm_tiny import tiny_model, tiny_model_dir
from topro.llm.backends import BackendError, HFBackend, HTTPSettings, OpenAIBackend, load_backend

CONTEXT = "Named entity type: location organisation person place body name other\n"
SENTENCE = "Sentence: Anton lives in Berlin .\n"
QUESTIONS = [f"Named entity type of the word {w} in the sentence is" for w in ["Anton", "Berlin", "."]]
ANSWERS = [" location", " person", " other", " organisation"]


@pytest.fixture(scope="module")
def hf():
    backend = HFBackend(str(tiny_model_dir("llama")), threads=1)
    backend.model, backend.tokenizer = tiny_model("llama")  # the same weights the server uses
    return backend


@pytest.fixture()
def server():
    model, tok = tiny_model("llama")
    with TinyOpenAIServer(model, tok) as s:
        yield s


def test_hf_shared_and_naive_agree(hf):
    shared = hf.score(CONTEXT, SENTENCE, QUESTIONS, ANSWERS)
    naive_backend = HFBackend.__new__(HFBackend)
    naive_backend.__dict__.update(hf.__dict__, scoring="naive", _contexts=OrderedDict())
    naive = naive_backend.score(CONTEXT, SENTENCE, QUESTIONS, ANSWERS)
    torch.testing.assert_close(shared.logprobs, naive.logprobs, atol=1e-8, rtol=1e-10)
    assert shared.continuation_tokens == [len(hf.ids(a)) for a in ANSWERS]
    assert len(hf._contexts) == 1  # the context was cached for the next sentence


def test_http_scores_match_local_model(hf, server):
    client = OpenAIBackend(server.url, settings=HTTPSettings(concurrency=3, prompts_per_request=4))
    assert client.model == "tiny"
    remote = client.score(CONTEXT, SENTENCE, QUESTIONS, ANSWERS)
    local = hf.score(CONTEXT, SENTENCE, QUESTIONS, ANSWERS)
    torch.testing.assert_close(remote.logprobs, local.logprobs.float(), atol=1e-4, rtol=0)
    assert remote.continuation_tokens == local.continuation_tokens
    assert client.counts.tokens > 0


def test_http_generate_matches_local_model(hf, server):
    client = OpenAIBackend(server.url, settings=HTTPSettings(concurrency=2, prompts_per_request=1))
    prompts = [SENTENCE + q for q in QUESTIONS]
    remote = client.generate(prompts, max_new_tokens=6, stop="\n", context=CONTEXT)
    assert remote == hf.generate(prompts, max_new_tokens=6, stop="\n", context=CONTEXT)


def test_http_retries_a_503(server):
    client = OpenAIBackend(server.url, model="tiny", settings=HTTPSettings(retries=2, backoff=0.01))
    server.plan = ["503", "503"]
    assert len(client.generate(["Sentence: a\nTags:"], max_new_tokens=2)) == 1
    assert server.requests == 3
    server.plan = ["503"] * 3
    client.settings.retries = 1
    with pytest.raises(BackendError, match="gave up after 2 attempts; last: HTTP 503"):
        client.generate(["x"], max_new_tokens=1)


def test_http_timeout_is_retried(server):
    server.slow_seconds = 1.0
    client = OpenAIBackend(server.url, model="tiny",
                           settings=HTTPSettings(timeout=0.3, retries=1, backoff=0.01))
    server.plan = ["slow"]
    assert len(client.generate(["x"], max_new_tokens=1)) == 1
    server.plan = ["slow", "slow"]
    with pytest.raises(BackendError, match="Timeout"):
        client.generate(["x"], max_new_tokens=1)


def test_http_concurrency_limit(server):
    server.request_delay = 0.1
    client = OpenAIBackend(server.url, model="tiny", settings=HTTPSettings(concurrency=2, prompts_per_request=1))
    client.generate([f"p{i}" for i in range(6)], max_new_tokens=1)
    assert server.max_in_flight == 2


def test_server_refusing_prompt_lists_gets_one_prompt_per_request(hf):
    model, tok = tiny_model("llama")
    with TinyOpenAIServer(model, tok, prompt_lists=False) as s:
        settings = HTTPSettings(concurrency=2, prompts_per_request=4, retries=0)
        client = OpenAIBackend(s.url, model="tiny", settings=settings)
        prompts = [SENTENCE + q for q in QUESTIONS]
        assert client.generate(prompts, max_new_tokens=6, context=CONTEXT) == hf.generate(
            prompts, max_new_tokens=6, context=CONTEXT)
        assert client._one_prompt_per_request
        assert (s.requests, client.counts.forwards) == (4, 3)  # the refused list, then one request per prompt
        torch.testing.assert_close(client.score(CONTEXT, SENTENCE, QUESTIONS, ANSWERS).logprobs,
                                   hf.score(CONTEXT, SENTENCE, QUESTIONS, ANSWERS).logprobs.float(), atol=1e-4, rtol=0)
        assert s.requests == 4 + 3 * 4  # no list tried again


def test_chat_only_server_generates_but_cannot_score():
    model, tok = tiny_model("llama")
    with TinyOpenAIServer(model, tok, completions=False) as s:
        client = load_backend(s.url + "/v1", api_model="tiny", retries=0)
        out = client.generate(["Sentence: a\nTags:"], max_new_tokens=3)
        assert client.api == "chat" and len(out) == 1
        with pytest.raises(BackendError) as stopped:
            client.score(CONTEXT, SENTENCE, QUESTIONS, ANSWERS)
        assert str(stopped.value) == (
            "score mode needs the prompt's token logprobs (/v1/completions with echo=true and logprobs); "
            f"{s.url}/v1 is used through /chat/completions (api=chat), which has none: use --mode generate with "
            "this server, or score with a local model folder or a server that returns prompt logprobs")


def test_hf_seq2seq_backend():
    backend = HFBackend(str(tiny_model_dir("t5")), threads=1, dtype="fp64")
    shared = backend.score(CONTEXT, SENTENCE, QUESTIONS, ANSWERS)
    assert shared.logprobs.shape == (3, 4) and bool((shared.logprobs < 0).all())
    backend.scoring = "naive"
    naive = backend.score(CONTEXT, SENTENCE, QUESTIONS, ANSWERS)
    torch.testing.assert_close(shared.logprobs, naive.logprobs, atol=1e-8, rtol=1e-10)
    out = backend.generate([SENTENCE + q for q in QUESTIONS], max_new_tokens=4, context=CONTEXT)
    assert len(out) == 3 and all(isinstance(o, str) and "\n" not in o for o in out)
