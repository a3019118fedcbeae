"""The endpoints over real HTTP: real Ray Serve on 127.0.0.1, real checkpoints, a real MLflow registry, real
(tiny) language models.

One Serve instance for the module (start-up is the slow part), with four apps:
- ``tagging`` at /: the trained tiny udpos checkpoint from a path as ``default``,
  an untrained PAN-X vanilla checkpoint as ``panx``, and the registry's
  ``models:/topro-udpos-topro@champion`` by header; at most 2 models per
  replica, so the third one loaded evicts one.
- ``llm`` at /llm: a tiny local Llama (Hugging Face folder), ToPro score mode.
- ``remote-llm`` at /remote-llm: the same model behind an OpenAI-compatible
  server on 127.0.0.1 (tests/llm_server.py), reached over HTTP.
- ``dead-llm`` at /dead-llm: an OpenAI-compatible URL where nothing listens.
"""
import concurrent.futures
import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest
import requests
from net import serve_on_free_port

REPO = Path(__file__).resolve().parent.parent
HEADER = "serve_multiplexed_model_id"


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bad_inputs = _load_module("serve_bad_inputs", REPO / "benchmarks" / "bad_inputs.py")
poison_mix = _load_module("serve_poison_mix", REPO / "benchmarks" / "poison_mix.py")


@pytest.fixture(scope="module")
def ray_for_serve(ray_local):
    """The session's local Ray, shared on purpose: a second Ray cannot start in this process, and starting
    one per module costs ~15 s. What sharing could hide is checked instead: no actor or trial of an earlier
    test still holds CPUs (all of them are free within a minute), and Serve is shut down at the module's end.

    Replicas import ``topro`` (the apps: ``topro.endpoint``) from this checkout: its folders go on the
    replicas' PYTHONPATH through this runtime_env."""
    import time

    deadline = time.monotonic() + 60
    while ray_local.available_resources().get("CPU", 0) < ray_local.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ("an earlier test left CPUs held on the shared Ray",
                                             ray_local.available_resources(), ray_local.cluster_resources())
        time.sleep(1)
    yield {"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "platform")])}}


@pytest.fixture(scope="module")
def closed_port():
    """A port bound by this process but not listening: a connection there is refused, and no other process
    can take it while the module runs (a probed 'free' port could be taken and answer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def openai_upstream():
    """An OpenAI-compatible server over the tiny Llama, on 127.0.0.1, in this process."""
    from llm_server import TinyOpenAIServer
    from llm_tiny import tiny_model

    model, tok = tiny_model("llama")
    with TinyOpenAIServer(model, tok, name="tiny-llama") as server:
        yield server


@pytest.fixture(scope="module")
def serve_url(ray_for_serve, tiny_topro_checkpoint, untrained_checkpoint, model_registry, openai_upstream,
              closed_port):
    from llm_tiny import tiny_model_dir
    from ray import serve as ray_serve

    from topro.endpoint.llm import make_app as make_llm_app
    from topro.endpoint.tagging import make_app

    actor_options = {"num_cpus": 1}
    if ray_for_serve:
        actor_options["runtime_env"] = ray_for_serve
    llm_options = {"LLMTagger": {"num_replicas": 1, "ray_actor_options": {**actor_options, "num_cpus": 0.3}}}
    llm_limits = {"max_sentences": 2, "max_words": 12, "max_batch_size": 4, "threads": 1}
    tagging = make_app({"model": str(tiny_topro_checkpoint),
                    "models": {"panx": str(untrained_checkpoint("panx", "vanilla"))},
                    "tracking_uri": model_registry["uri"], "max_batch_size": 16, "batch_wait_timeout_s": 0.05,
                    "max_sentences": 4, "max_words": 20, "max_word_chars": 30, "max_models_per_replica": 2,
                    "max_call_words": 20, "body_timeout_s": 2,
                    "allow_registry_ids": ["models:/topro-udpos-topro@*"]},
                   {"Tagger": {"num_replicas": 1, "max_ongoing_requests": 32, "ray_actor_options": actor_options}})
    apps = {
        "tagging": ("/", tagging),
        "llm": ("/llm", make_llm_app({"model": str(tiny_model_dir("llama")), **llm_limits}, llm_options)),
        "remote-llm": ("/remote-llm", make_llm_app({"model": openai_upstream.url + "/v1", "api_model": "tiny-llama",
                                                          **llm_limits}, llm_options)),
        "dead-llm": ("/dead-llm", make_llm_app({"model": f"http://127.0.0.1:{closed_port}/v1", "retries": 0,
                                                      "timeout": 5, **llm_limits}, llm_options)),
    }
    # All four deploy together (run_many), and this returns once every app is RUNNING (or raises).
    url = serve_on_free_port(lambda port: ray_serve.run_many([ray_serve.RunTarget(app, name=name, route_prefix=prefix)
                                                              for name, (prefix, app) in apps.items()]))
    yield url
    ray_serve.shutdown()


@pytest.fixture(scope="module")
def endpoint(serve_url):
    return serve_url


from topro.endpoint.schemas import TagResponse  # noqa: E402  (the repository root is on pytest's pythonpath)


def tag(url, body, model_id=None, timeout=120):
    headers = {HEADER: model_id} if model_id else {}
    return requests.post(f"{url}/tag", json=body, headers=headers, timeout=timeout)


def test_health_and_models(endpoint):
    health = requests.get(f"{endpoint}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = requests.get(f"{endpoint}/models", timeout=30).json()
    assert {m["id"] for m in models["available"]} == {"default", "panx"}
    assert models["header"] == HEADER and models["max_models_per_replica"] == 2
    loaded = {m["id"]: m for m in models["loaded"]}
    assert loaded["default"]["task"] == "udpos" and loaded["default"]["method"] == "topro"
    assert loaded["default"]["template"] and loaded["default"]["verbalizer"] and len(loaded["default"]["labels"]) == 17
    assert models["limits"]["max_words"] == 20
    # ids, registry versions and runs; no path on the server (the checkpoints live under pytest's tmp)
    text = requests.get(f"{endpoint}/models", timeout=30).text
    assert "pytest-of" not in text and "/tmp/" not in text, text
    assert {m["id"]: m["uri"] for m in models["available"]} == {"default": None, "panx": None}
    assert models["registry_ids_allowed"] == ["models:/topro-udpos-topro@*"]


def test_tag_sentences_and_text(endpoint):
    r = tag(endpoint, {"sentences": [["Das", "ist", "gut", "."], ["Berlin"]], "lang": "de"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["id"] == "default" and body["model"]["task"] == "udpos"
    labels = {m["id"]: m for m in requests.get(f"{endpoint}/models", timeout=30).json()["loaded"]}["default"]["labels"]
    TagResponse.model_validate(body)  # the documented response schema
    first, second = body["sentences"]
    assert [w["word"] for w in first["words"]] == ["Das", "ist", "gut", "."] and first["lang"] == "de"
    assert [w["word"] for w in second["words"]] == ["Berlin"]
    for w in first["words"] + second["words"]:
        assert w["tag"] in labels and 0.0 < w["prob"] <= 1.0
    r = tag(endpoint, {"text": "  The cat\tsat \n on the mat . "})
    assert r.status_code == 200
    assert [w["word"] for w in r.json()["sentences"][0]["words"]] == "The cat sat on the mat .".split()
    assert r.json()["sentences"][0]["lang"] is None


def test_registry_model_by_header_and_multiplexing_with_a_cap(endpoint, model_registry):
    registry_id = model_registry["model"]
    r = tag(endpoint, {"text": "Das ist gut"}, registry_id)
    assert r.status_code == 200, r.text
    assert r.json()["model"]["id"] == registry_id and r.json()["model"]["run_id"] == model_registry["run_id"]
    r = tag(endpoint, {"sentences": [["Angela", "Merkel", "besuchte", "Paris"]]}, "panx")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == {"id": "panx", "uri": None, "task": "panx", "method": "vanilla", "run_id": None,
                                 "registered_model": None, "version": None}  # a checkpoint folder: no path shown
    assert all(w["tag"] == "O" or w["tag"][:2] in ("B-", "I-") for w in r.json()["sentences"][0]["words"])
    # Three ids used, two allowed per replica: the least recently used (default) was evicted.
    models = requests.get(f"{endpoint}/models", timeout=30).json()
    loaded = {m["id"]: m for m in models["loaded"]}
    assert set(loaded) == {registry_id, "panx"}
    assert loaded[registry_id]["registered_model"] == "topro-udpos-topro"
    assert loaded[registry_id]["version"] == str(model_registry["version"])
    # ... and comes back on demand.
    r = tag(endpoint, {"text": "Das ist gut"})
    assert r.status_code == 200 and r.json()["model"]["id"] == "default"
    assert len(requests.get(f"{endpoint}/models", timeout=30).json()["loaded"]) == 2


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(endpoint):
    tag(endpoint, {"text": "warm up"})
    bodies = [{"sentences": [[f"w{i}", "ist", "gut"]] * (1 + i % 3)} for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(lambda b: tag(endpoint, b), bodies))
    assert [r.status_code for r in responses] == [200] * 24
    for body, r in zip(bodies, responses):  # no answer went to the wrong request
        assert [[w["word"] for w in s["words"]] for s in r.json()["sentences"]] == body["sentences"]
    batch_sizes = [r.json()["batch"]["requests"] for r in responses]
    assert max(batch_sizes) > 1, batch_sizes
    batched = next(r.json()["batch"] for r in responses if r.json()["batch"]["requests"] > 1)
    assert batched["sentences"] >= batched["requests"]


def test_requests_that_arrive_while_the_model_runs_form_the_next_batch_together(ray_for_serve, serve_url):
    """Behind ``BatchGate``, the requests that arrive while the model runs go in one batch. Load-proof: in
    the gated run the first request is sent alone and the other 15 only once the model has started on it,
    and that first call holds until all 16 have arrived (counted on entry), so "arrived while the model
    ran" is a fact, not a timing; then the first request ran alone and the 15 others form the next batch
    (two that passed the free gate together may pair off: at most 3 batches, one of >= 14). Sending all 16
    at once let a loaded machine pass 3 through the free gate before the model started (CI: [3, 13]).
    ``@serve.batch`` alone (Ray 2.60) forms a batch of whatever is queued the moment the last one was
    handed on: the ungated half (0.3 s calls, requests 15 ms apart) makes more, smaller batches than the
    gated one in the same run; if that ever changes, the gate may no longer be needed."""
    import asyncio
    import contextlib
    import time

    from ray import serve as ray_serve

    from topro.endpoint.tagging import BatchGate

    options = {"num_cpus": 0, **({"runtime_env": ray_for_serve} if ray_for_serve else {})}

    @ray_serve.deployment(max_ongoing_requests=64, ray_actor_options=options)
    class SlowModel:
        def __init__(self, gated: bool, hold_until_arrived: int):
            self.gate = BatchGate() if gated else None
            self.hold_until_arrived = hold_until_arrived
            self.arrived = 0
            self.batch_sizes = []

        @ray_serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
        async def run(self, items: list[int]) -> list[int]:
            with self.gate.model_busy() if self.gate else contextlib.nullcontext():
                self.batch_sizes.append(len(items))
                if self.hold_until_arrived and len(self.batch_sizes) == 1:
                    for _ in range(6000):  # at most 60 s
                        if self.arrived >= self.hold_until_arrived:
                            break
                        await asyncio.sleep(0.01)
                else:
                    await asyncio.sleep(0.3)
            return items

        async def __call__(self, item: int) -> int:
            self.arrived += 1
            if self.gate:
                await self.gate.wait_until_free()
            return await self.run(item)

        def sizes(self) -> list[int]:
            return self.batch_sizes

    sizes = {}
    for gated in (True, False):
        name = f"gate-{str(gated).lower()}"
        handle = ray_serve.run(SlowModel.bind(gated, 16 if gated else 0), name=name, route_prefix=None)
        pending = []
        for i in range(16):
            pending.append(handle.remote(i))
            if gated and i == 0:
                deadline = time.monotonic() + 60
                while not handle.sizes.remote().result(timeout_s=30) and time.monotonic() < deadline:
                    time.sleep(0.01)
            time.sleep(0.015)
        assert [r.result(timeout_s=120) for r in pending] == list(range(16))
        sizes[gated] = handle.sizes.remote().result(timeout_s=30)
        ray_serve.delete(name)
    assert sizes[True][0] == 1 and sum(sizes[True]) == 16 and len(sizes[True]) <= 3, sizes
    assert max(sizes[True]) >= 14, sizes
    assert len(sizes[False]) > len(sizes[True]) and sum(sizes[False]) == 16, sizes


def test_unknown_model_id_evicts_nothing(endpoint):
    def loaded():
        return {m["id"] for m in requests.get(f"{endpoint}/models", timeout=30).json()["loaded"]}

    before = loaded()
    for model_id in ("no-such-model", "models:/no-such-model@champion", "models:/topro-udpos-topro@nope"):
        r = tag(endpoint, {"text": "Das ist gut"}, model_id)
        assert r.status_code == 404 and "unknown model id" in r.json()["detail"]
    assert loaded() == before


def test_bad_input_gets_4xx_with_a_message_and_the_replica_lives_on(endpoint):
    rows, alive = bad_inputs.run(endpoint)
    wrong = [row for row in rows if not row["ok"]]
    assert not wrong, wrong
    assert all(400 <= row["status"] < 500 for row in rows)
    assert len(rows) >= 20
    assert alive  # same replica as before, and it tagged a good request afterwards
    assert requests.get(f"{endpoint}/healthz", timeout=30).status_code == 200


def test_a_poison_sender_fails_no_good_request(endpoint):
    """6 clients send good requests for 6 s while one sends a lone surrogate every 0.3 s (the issue's mix:
    before, 177 of 1,101 good requests got 500 from the batch the poison shared)."""
    result = poison_mix.run(endpoint, clients=6, seconds=6, poison_every=0.3)
    assert result["good_failed"] == 0, result
    assert result["good"]["ok"] >= 6 and sum(result["poison"].values()) >= 3, result
    assert all(k.startswith("422 sentences[0][1]: character 0 (U+D800)") for k in result["poison"]), result


def test_a_small_request_behind_maximal_ones_is_answered_between_their_chunks(endpoint):
    """Three maximal requests (4 sentences x 20 words: 4 model calls each at max_call_words=20), then a small
    one: it goes into the next model call with their next chunks, so it is answered before they finish."""
    import time

    big = {"sentences": [[f"w{i}" for i in range(20)] for _ in range(4)]}
    tag(endpoint, {"text": "warm up"})
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        bigs = [pool.submit(lambda: (tag(endpoint, big), time.perf_counter())) for _ in range(3)]
        time.sleep(0.05)
        sent = time.perf_counter()
        small, small_done = pool.submit(lambda: (tag(endpoint, {"text": "Das ist gut"}), time.perf_counter())).result()
        answered = [f.result() for f in bigs]
    assert small.status_code == 200 and all(r.status_code == 200 for r, _ in answered)
    assert all(r.json()["batch"]["chunks"] == 4 and r.json()["batch"]["sentences"] <= 4 for r, _ in answered)
    assert small.json()["batch"]["id"] < max(r.json()["batch"]["id"] for r, _ in answered)
    last_big = max(done for _, done in answered)
    print(f"small request: {small_done - sent:.3f}s; maximal ones done {last_big - sent:.3f}s after it was sent")
    assert small_done < last_big


def _raw_request(endpoint: str, head: str, body_parts, wait_s: float = 60.0) -> tuple[int, str, int, float]:
    """Send ``head`` and then ``body_parts`` over a plain socket, stopping as soon as the server answers:
    (status, body, bytes of body sent, seconds until the answer)."""
    import select
    import time

    host, port = endpoint.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=wait_s)
    start = time.perf_counter()
    sent = 0
    try:
        sock.sendall(head.encode())
        for part in body_parts:
            if select.select([sock], [], [], 0)[0]:
                break  # answered already
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(part)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        seconds = time.perf_counter() - start
    finally:
        sock.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1].decode(errors="replace"), sent, seconds


def test_a_chunked_body_over_the_cap_is_cut_off_and_a_stalled_body_dropped(endpoint):
    limit = requests.get(f"{endpoint}/models", timeout=30).json()["limits"]["max_body_bytes"]
    chunk = b"a" * 65536
    parts = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(480))  # 30 MB if all were sent
    head = ("POST /tag HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    status, body, sent, seconds = _raw_request(endpoint, head, parts)
    print(f"chunked body: {status} after {sent} bytes sent, {seconds:.2f}s; limit {limit}")
    # Answered although the body never ended (no last chunk is sent): the bytes were counted as they came.
    assert status == 413 and f"the limit is {limit}" in body, body
    head = ("POST /tag HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n")
    status, body, sent, seconds = _raw_request(endpoint, head, [b'{"text": "Das'])
    print(f"stalled body: {status} after {seconds:.2f}s")
    # At or after body_timeout_s (2 s), never before; a lower bound that no load can break.
    assert status == 408 and "the body stopped arriving" in body and seconds >= 2.0, (status, body, seconds)
    assert tag(endpoint, {"text": "Das ist gut"}).status_code == 200


# --- POST /llm/tag --------------------------------------------------------------------------------

UDPOS_TAGS = {"ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
              "SCONJ", "SYM", "VERB", "X"}


def test_llm_tag_with_a_local_model_matches_the_library(serve_url):
    from llm_tiny import tiny_model_dir
    from topro.data.readers import Sentence
    from topro.llm.backends import HFBackend
    from topro.llm.evaluate import LLMEvalConfig, predict_sentences, prepare

    info = requests.get(f"{serve_url}/llm/models", timeout=30).json()
    assert info["ready"] and info["task"] == "udpos" and info["format"] == "topro" and info["mode"] == "score"
    assert info["method"] == "llm-topro-score-0shot"
    words = ["Das", "ist", "gut", "."]
    r = requests.post(f"{serve_url}/llm/tag", json={"sentences": [words], "lang": "de"}, timeout=120)
    assert r.status_code == 200, r.text
    [sentence] = r.json()["sentences"]
    assert [w["word"] for w in sentence["words"]] == words and sentence["lang"] == "de"
    assert all(w["tag"] in UDPOS_TAGS and 0.0 < w["prob"] <= 1.0 and not w["format_failed"]
               for w in sentence["words"])
    # The endpoint is the library, not a copy of it: the same tags as topro.llm in this process.
    cfg = LLMEvalConfig(task="udpos", model=str(tiny_model_dir("llama")))
    [expected] = predict_sentences(HFBackend(cfg.model, threads=1), prepare(cfg), cfg, [Sentence(words, [])])
    assert [w["tag"] for w in sentence["words"]] == expected.tags


def test_llm_tag_through_an_openai_compatible_upstream(serve_url, openai_upstream):
    before = openai_upstream.requests
    r = requests.post(f"{serve_url}/remote-llm/tag", json={"text": "Das ist gut"}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["backend"].endswith("#tiny-llama") and openai_upstream.requests > before
    assert [w["word"] for w in body["sentences"][0]["words"]] == ["Das", "ist", "gut"]
    assert all(w["tag"] in UDPOS_TAGS and w["prob"] is not None for w in body["sentences"][0]["words"])
    local = requests.post(f"{serve_url}/llm/tag", json={"text": "Das ist gut"}, timeout=120).json()
    assert [w["tag"] for w in local["sentences"][0]["words"]] == [w["tag"] for w in body["sentences"][0]["words"]]


def test_llm_bad_input_and_an_unreachable_upstream_get_messages_not_500(serve_url):
    for body, status, message in [({"sentences": [["a"], []]}, 422, "sentences[1]: a sentence needs at least one word"),
                                  ({"sentences": [["a"]] * 3}, 413, "the limit is 2"),
                                  ({"text": " ".join(["x"] * 13)}, 413, "the limit is 12 words"),
                                  ({"sentence": "a"}, 422, "unknown field")]:
        r = requests.post(f"{serve_url}/llm/tag", json=body, timeout=60)
        assert r.status_code == status and message in r.json()["detail"], (body, r.status_code, r.text)
    r = requests.post(f"{serve_url}/llm/tag", data="{oops", headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]
    r = requests.post(f"{serve_url}/dead-llm/tag", json={"text": "Das ist gut"}, timeout=120)
    assert r.status_code == 503 and "is not available" in r.json()["detail"], r.text
    health = requests.get(f"{serve_url}/dead-llm/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["llm"] == "unavailable" and health["detail"]
    assert requests.post(f"{serve_url}/llm/tag", json={"text": "gut"}, timeout=120).status_code == 200


def test_a_moved_alias_is_followed_with_zero_errors(ray_for_serve, serve_url, model_registry, untrained_checkpoint):
    """``models:/<name>@live`` served with a 0.5 s alias refresh, two clients tagging without pause: the alias
    moves from version 1 (trained) to version 2 (untrained, other tags); the answers switch to version 2,
    each client's answers go 1...1 2...2 (never back), the tags are each version's own, and no request fails."""
    import threading
    import time

    import mlflow
    from mlflow import MlflowClient
    from ray import serve as ray_serve

    from topro.endpoint.tagging import make_app
    from topro.tracking import register_checkpoint

    client = MlflowClient(model_registry["uri"])
    name = "topro-alias-follow"
    first = str(register_checkpoint(model_registry["run_id"], name, "live"))
    experiment = client.get_run(model_registry["run_id"]).info.experiment_id
    with mlflow.start_run(experiment_id=experiment, run_name="untrained-udpos-topro") as run:
        mlflow.log_artifacts(str(untrained_checkpoint("udpos", "topro")), "checkpoint")
    second = str(register_checkpoint(run.info.run_id, name, alias=None))
    # num_cpus 0: the module's four apps hold 1.9 of the 2 CPUs of its Ray
    options = {"num_cpus": 0, **({"runtime_env": ray_for_serve} if ray_for_serve else {})}
    app = make_app({"model": f"models:/{name}@live", "tracking_uri": model_registry["uri"], "alias_refresh_s": 0.5,
                    "max_batch_size": 4},
                   {"Tagger": {"num_replicas": 1, "max_ongoing_requests": 8, "ray_actor_options": options}})
    ray_serve.run(app, name="alias", route_prefix="/alias")
    url = f"{serve_url}/alias"
    body = {"sentences": [["Das", "ist", "ein", "gutes", "Haus", "."]], "lang": "de"}
    stop = threading.Event()
    seen: list[list[tuple[int, str | None, tuple]]] = [[], []]

    def client_loop(out):
        while not stop.is_set():
            r = tag(url, body, timeout=60)
            answer = r.json() if r.status_code == 200 else {}
            out.append((r.status_code, answer.get("model", {}).get("version"),
                        tuple(w["tag"] for w in answer["sentences"][0]["words"]) if answer else ()))

    threads = [threading.Thread(target=client_loop, args=(out,)) for out in seen]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while not all(seen) and time.time() < deadline:
            time.sleep(0.1)
        client.set_registered_model_alias(name, "live", second)
        moved = time.time()
        while not all(out and out[-1][1] == second for out in seen) and time.time() < moved + 90:
            time.sleep(0.1)
        followed = time.time() - moved
        time.sleep(1.0)  # more answers after the switch
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    switches = requests.get(f"{url}/models", timeout=30).json()["alias_switches"]
    ray_serve.delete("alias")
    by_first = [sum(v == first for _, v, _ in out) for out in seen]
    print(f"alias @live moved v{first} -> v{second}: every client answered by v{second} {followed:.1f}s later; "
          f"answers per client {[len(out) for out in seen]}, by v{first} {by_first}; "
          f"not 200: {sum(status != 200 for out in seen for status, _, _ in out)}")
    for out in seen:
        assert [status for status, _, _ in out] == [200] * len(out)  # zero errors, before, during and after
        versions = [version for _, version, _ in out]
        assert versions[0] == first and versions[-1] == second, versions
        switched_at = versions.index(second)
        assert set(versions[:switched_at]) == {first} and set(versions[switched_at:]) == {second}, versions
        # each version answered with its own model's tags
        assert {t for _, v, t in out if v == first} == {out[0][2]} and {t for _, v, t in out if v == second} == {out[-1][2]}
    assert [(s["from_version"], s["to_version"]) for s in switches] == [(first, second)]


def test_the_tagging_page_is_self_contained_and_puts_api_text_on_the_page_as_text():
    """No CDN or other outside address, and no HTML built from answers (textContent only)."""
    page = (REPO / "platform" / "topro" / "endpoint" / "page.html").read_text()  # what tagging.TAGGING_PAGE serves
    assert "://" not in page and " src=" not in page and "href=" not in page
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page
    assert "textContent" in page


@pytest.mark.slow
def test_the_tagging_page_in_a_browser(endpoint):
    """Headless Chromium on GET /: a German sentence gets a tag per word (probability on hover), a PAN-X
    model's answer is drawn as entity spans, a word `<script>...` shows as text and runs nothing, and an
    over-long input shows the API's own 4xx message."""
    from browser import chromium_page, screenshot_dir

    shots = screenshot_dir("tagging-page")
    front = requests.get(f"{endpoint}/", timeout=30)
    assert front.status_code == 200 and front.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in front.headers["content-security-policy"]
    udpos_tags = set(__import__("topro.data", fromlist=["get_task"]).get_task("udpos").labels)
    with chromium_page(width=1200, height=800) as page:
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{endpoint}/")
        page.locator("#model option[value=panx]").wait_for(state="attached")
        assert page.locator("#model option").all_inner_texts() == ["default", "panx"]

        sentence = "Die Kinder spielen heute im Garten ."
        page.fill("#text", sentence)
        page.fill("#lang", "de")
        page.click("#go")
        page.locator("#result .w").first.wait_for()
        words = page.locator("#result .w")
        assert words.count() == 7
        tags = page.locator("#result .w .t").all_inner_texts()
        assert set(tags) <= udpos_tags, tags
        title = words.first.get_attribute("title")
        assert title.startswith(tags[0]) and " p=" in title  # the probability, on hover
        assert all(f" {t} " in f" {c} " for t, c in zip(tags, [words.nth(i).get_attribute("class")
                                                              for i in range(7)]))  # POS colour classes
        page.screenshot(path=shots / "1-german-sentence-udpos.png")

        page.select_option("#model", "panx")
        page.fill("#text", "Angela Merkel besuchte gestern Paris .")
        page.click("#go")
        page.get_by_text("(panx, vanilla").wait_for()
        panx_tags = page.locator("#result .w .t").all_inner_texts()
        # one box per entity span (a B-X, or an I-X that does not continue an X, starts one), holding its words
        starts = [i for i, t in enumerate(panx_tags) if t != "O" and (
            t.startswith("B-") or i == 0 or panx_tags[i - 1] == "O" or panx_tags[i - 1][2:] != t[2:])]
        assert page.locator("#result .span").count() == len(starts)
        assert page.locator("#result .span .w").count() == sum(t != "O" for t in panx_tags)
        for k, i in enumerate(starts):
            assert page.locator("#result .span").nth(k).get_attribute("class") == f"span {panx_tags[i][2:]}"
        page.screenshot(path=shots / "2-panx-spans.png")

        page.select_option("#model", "default")
        page.fill("#text", "<script>alert(1)</script> ist <b>gut</b>")
        page.click("#go")
        page.locator("#result .w").first.wait_for()
        assert page.locator("#result .w").first.inner_text().startswith("<script>alert(1)</script>")
        assert page.locator("#result script, #result b").count() == 0 and dialogs == []
        page.screenshot(path=shots / "3-escaped.png")

        too_long = " ".join(["Wort"] * 25)  # the app's limit is 20 words
        api = tag(endpoint, {"text": too_long, "lang": "de"})
        assert 400 <= api.status_code < 500
        page.fill("#text", too_long)
        page.click("#go")
        page.locator("#error").filter(has_text=str(api.status_code)).wait_for()
        assert page.inner_text("#error") == f"{api.status_code}: {api.json()['detail']}"
        page.screenshot(path=shots / "4-over-long-input.png")
