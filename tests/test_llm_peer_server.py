"""The OpenAI-compatible backend against a server written elsewhere: ``transformers serve`` (FastAPI/uvicorn,
``/v1/completions`` and ``/v1/chat/completions``), started as a subprocess on 127.0.0.1 over the tiny Llama
folder, offline. It takes one prompt per request (a list is refused with HTTP 400) and ignores ``echo`` and
``logprobs``, so it can generate but not score: generate mode runs end to end against it, and score mode stops
at its first answer with the message that says why and what to use instead. Fault injection (503s, timeouts)
stays with tests/llm_server.py, where we choose how the server fails.

Full tier: the server process takes about a minute to start on a loaded 2-core machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch

from llm_tiny import DATA_DIR, tiny_model_dir
from net import on_free_port, wait_until_healthy

pytestmark = pytest.mark.slow

SERVER_START_SECONDS = 300  # imports, the model load, uvicorn; ~60-80 s measured on the loaded 2-core machine


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def peer_server(tmp_path_factory):
    """(base URL, model folder) of ``transformers serve`` on 127.0.0.1 only, with the hub unreachable."""
    model_dir = tiny_model_dir("llama")
    log = tmp_path_factory.mktemp("transformers-serve") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    started: list[subprocess.Popen] = []

    def start(port: int) -> str:
        # --host: the default is "localhost", which may also bind ::1; loopback IPv4 only here.
        command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
                   "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"]
        with log.open("a") as out:
            started.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env))
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(f"{url}/health", started[-1], log, timeout_s=SERVER_START_SECONDS, poll_s=0.5,
                           name="transformers serve")
        return url

    try:
        url = on_free_port(start, stop=lambda: stop(started[-1]))
        yield url, model_dir
    finally:
        for proc in started:
            stop(proc)


def first_sentences(lang: str, n: int) -> list:
    from topro.evaluate import load_scored_split

    return load_scored_split("udpos", lang, "dev", str(DATA_DIR), n)


def test_server_lists_the_local_folder_and_binds_loopback(peer_server):
    url, model_dir = peer_server
    models = requests.get(f"{url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == [str(model_dir)]
    assert url.startswith("http://127.0.0.1:")


def test_generate_matches_the_model_run_here(peer_server):
    """Greedy answers over HTTP are those of the same weights run here in float32 (one prompt at a time, as
    the server runs them): the server really ran our folder's model, and the list fallback kept the order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from topro.llm.backends import OpenAIBackend

    url, model_dir = peer_server
    prompts = ["Sentence: the cat sleeps .\nTags:", "Sentence: Anton lives in Berlin .\nTags:",
               "Part-of-speech tag of the word cat in the sentence is"]
    client = OpenAIBackend(url)
    remote = client.generate(prompts, max_new_tokens=5, stop=None)
    assert client._one_prompt_per_request  # the server refused the list of three
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    local = []
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            local.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert remote == local
    assert client.counts.forwards == 3  # one answered request per prompt (the refused list is not counted)


def test_eval_llm_generate_mode_end_to_end(peer_server, tmp_path):
    from topro.cli.eval_llm import EvalLLMConfig, eval_llm

    url, model_dir = peer_server
    output = tmp_path / "generate.json"
    run = EvalLLMConfig(task="udpos", model=f"{url}/v1", langs="en,de", mode="generate", max_sentences=2,
                        data_dir=str(DATA_DIR), max_new_tokens=3, ray=False, mlflow=False, output=str(output),
                        concurrency=2, retries=0)
    assert eval_llm(run) == 0
    record = json.loads(output.read_text())
    assert record["model"] == f"{url}/v1#{model_dir}"
    assert sorted(record["languages"]) == ["de", "en"]
    for lang, result in record["languages"].items():
        sentences = first_sentences(lang, 2)
        n_words = sum(len(s) for s in sentences)
        assert (result["n_sentences"], result["n_words"]) == (2, n_words)
        assert sum(result["predicted_label_counts"].values()) == n_words
        assert result["model_calls"] == n_words  # ToPro asks one question per word: one request each


def test_eval_llm_score_mode_names_what_the_server_lacks(peer_server, tmp_path):
    from topro.cli.eval_llm import EvalLLMConfig, eval_llm
    from topro.llm.backends import BackendError

    url, _ = peer_server
    run = EvalLLMConfig(task="udpos", model=f"{url}/v1", langs="en", mode="score", max_sentences=2,
                        data_dir=str(DATA_DIR), ray=False, mlflow=False, output=str(tmp_path / "score.json"),
                        retries=0)
    with pytest.raises(BackendError) as stopped:
        eval_llm(run)
    assert str(stopped.value) == (
        "score mode needs the prompt's token logprobs (/v1/completions with echo=true and logprobs); "
        f"{url}/v1/completions returned none: use --mode generate with this server, or score with a local model "
        "folder or a server that returns prompt logprobs")
    assert not (tmp_path / "score.json").exists()
