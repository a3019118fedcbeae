"""Load test of the tagging endpoint beside offline batch inference of the same sentences, in one run.

    python benchmarks/serve_load.py --model runs/udpos-topro/checkpoint --clients 1,8,32 --duration 20

1. Offline (while the endpoint idles): the same checkpoint in this process (``topro.serving.Tagger``), every
   sentence in one ``tag`` call, with as many torch threads as a replica gets
   (``--offline-threads``, default 1 = the config's ``num_cpus: 1``): the
   throughput the model allows without HTTP, queueing or request batching.
2. Endpoint: the ``tagging`` app of serve/config.yaml (its batching and limits),
   ``--model`` in place of the config's, a fixed number of replicas (autoscaling
   would make the figures depend on when it scaled), on 127.0.0.1 and a free
   port; or an endpoint already running (``--url``).
3. For each client count N: N closed-loop clients (each sends its next request
   when the last one is answered; one sentence per request by default), for
   ``--duration`` seconds after a short warm-up, at most ``--max-requests``.
   Printed: requests, errors (non-200 answers and transport failures), throughput
   (requests/s, sentences/s, words/s), latency p50/p95/p99, mean requests per
   model call, the share of the window the model ran and its pace while it ran
   (sentences/s over its calls' own time: the gap to offline is model
   efficiency inside the replica; the rest is time the model sat idle), and
   throughput as a fraction of offline.
4. Offline again at the end: the machine is shared, so the offline figure is
   the mean of the two, and both are printed.

Everything binds and talks to 127.0.0.1; the script stops Serve and Ray it started.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def load_sentences(task: str, lang: str, split: str, count: int, data_dir: str | None) -> list[list[str]]:
    from topro.data import load_split

    return [s.words for s in load_split(task, lang, split, data_dir, limit=count)]


def offline_throughput(model: str, sentences: list[list[str]], threads: int, min_seconds: float) -> dict[str, Any]:
    """Sentences/s of one ``Tagger.tag`` call over all sentences (after a warm-up call), repeated for
    at least ``min_seconds``."""
    import torch

    from topro.data.readers import Sentence
    from topro.serving import Tagger

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tagger = Tagger.load(model, device="cpu")
        batch = [Sentence(words, []) for words in sentences]
        tagger.tag(batch[: min(8, len(batch))])  # warm-up
        runs, start = 0, time.perf_counter()
        while True:
            tagger.tag(batch)
            runs += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
    finally:
        torch.set_num_threads(previous)
    n_words = sum(len(s) for s in sentences)
    return {"threads": threads, "runs": runs, "seconds": round(elapsed, 2),
            "sentences_per_s": runs * len(sentences) / elapsed, "words_per_s": runs * n_words / elapsed}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def drive(url: str, sentences: list[list[str]], clients: int, duration: float, warmup: float,
                max_requests: int, per_request: int, model_id: str | None, timeout: float) -> dict[str, Any]:
    """N closed-loop clients; only requests that start after the warm-up and before the deadline count."""
    import aiohttp

    headers = {"serve_multiplexed_model_id": model_id} if model_id else {}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    batch_requests: list[int] = []
    model_calls: dict[tuple[str, int], tuple[int, float]] = {}  # (replica, call id) -> (sentences, seconds)
    counted = {"requests": 0, "sentences": 0, "words": 0}
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    measure_from, deadline = t0 + warmup, t0 + warmup + duration

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        position = index * per_request
        while loop.time() < deadline and counted["requests"] < max_requests:
            body = [sentences[(position + k) % len(sentences)] for k in range(per_request)]
            position += per_request * clients
            started = loop.time()
            measured = started >= measure_from
            try:
                async with session.post(f"{url}/tag", json={"sentences": body}, headers=headers) as response:
                    payload = await response.json(content_type=None)
                    status = response.status
            except Exception as err:  # transport failure or timeout: an error, never a crash
                status, payload = type(err).__name__, None
            finished = loop.time()
            if not measured or finished > deadline:
                continue
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
                continue
            latencies.append(finished - started)
            counted["requests"] += 1
            counted["sentences"] += len(body)
            counted["words"] += sum(len(s) for s in body)
            batch = payload["batch"]
            batch_requests.append(batch["requests"])
            model_calls[(batch["replica"], batch["id"])] = (batch["sentences"], batch["seconds"])

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    window = min(loop.time(), deadline) - measure_from
    model_seconds = sum(seconds for _, seconds in model_calls.values())
    return {"clients": clients, "seconds": round(window, 2), **counted, "errors": sum(errors.values()),
            "error_kinds": errors, "requests_per_s": counted["requests"] / window,
            "sentences_per_s": counted["sentences"] / window, "words_per_s": counted["words"] / window,
            "p50_ms": 1000 * percentile(latencies, 0.50), "p95_ms": 1000 * percentile(latencies, 0.95),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            "mean_batch_requests": statistics.fmean(batch_requests) if batch_requests else float("nan"),
            # Where the time went: the model's own pace inside the replica, and how much of the window it ran.
            "model_calls": len(model_calls), "model_busy": model_seconds / window,
            "model_sentences_per_s": (sum(n for n, _ in model_calls.values()) / model_seconds
                                      if model_seconds else float("nan"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_endpoint(model: str, config_path: Path, replicas: int, num_cpus: int | None) -> str:
    """The config's tagging app with ``model``, ``replicas`` fixed replicas, on 127.0.0.1 and a free port."""
    from topro.cluster.runtime import init_ray
    from topro.cli.serve import build_applications, load_serve_config

    init_ray(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    from ray import serve

    config = load_serve_config(config_path)
    for app in config["applications"]:
        for deployment in app.get("deployments", []):
            if deployment["name"] == "Tagger":
                deployment.pop("autoscaling_config", None)
                deployment["num_replicas"] = replicas
    [(name, prefix, application)] = build_applications(config, model=model, only=["tagging"])
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application, name=name, route_prefix=prefix)
    return f"http://127.0.0.1:{port}"


def stop_endpoint() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or models:/ URI")
    parser.add_argument("--url", help="drive this running endpoint instead of starting one")
    parser.add_argument("--model-id", help="serve_multiplexed_model_id header to send (with --url)")
    parser.add_argument("--config", default=str(REPO / "serve" / "config.yaml"))
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrent client counts")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per client count")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each count")
    parser.add_argument("--max-requests", type=int, default=100_000, help="cap per client count")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    parser.add_argument("--per-request", type=int, default=1, help="sentences per request")
    parser.add_argument("--task", default="udpos")
    parser.add_argument("--lang", default="de")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--sentences", type=int, default=256, help="distinct sentences (the offline batch)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--offline-threads", type=int, default=1,
                        help="torch threads offline (default 1: what a replica with num_cpus 1 gets)")
    parser.add_argument("--offline-seconds", type=float, default=10.0, help="least offline time per measure")
    parser.add_argument("--replicas", type=int, default=1, help="Tagger replicas (autoscaling off)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",") if c]

    sentences = load_sentences(args.task, args.lang, args.split, args.sentences, args.data_dir)
    n_words = sum(len(s) for s in sentences)
    print(f"{len(sentences)} {args.task} {args.lang}/{args.split} sentences, {n_words} words "
          f"({n_words / len(sentences):.1f} per sentence); model {args.model}", flush=True)
    # The endpoint starts first (the part that can fail on a busy machine), then offline runs while it idles.
    started_here = args.url is None
    url = args.url or start_endpoint(args.model, Path(args.config), args.replicas, args.num_cpus)
    runs = []
    try:
        offline_before = offline_throughput(args.model, sentences, args.offline_threads, args.offline_seconds)
        print(f"offline (before): {offline_before['sentences_per_s']:.1f} sentences/s", flush=True)
        for clients in counts:
            result = asyncio.run(drive(url, sentences, clients, args.duration, args.warmup, args.max_requests,
                                       args.per_request, args.model_id, args.timeout))
            runs.append(result)
            print(f"{clients} clients: {result['sentences_per_s']:.1f} sentences/s, p50 {result['p50_ms']:.0f} ms, "
                  f"{result['errors']} errors", flush=True)
    finally:
        if started_here:
            stop_endpoint()
    offline_after = offline_throughput(args.model, sentences, args.offline_threads, args.offline_seconds)
    offline = (offline_before["sentences_per_s"] + offline_after["sentences_per_s"]) / 2

    print(f"\noffline batch inference ({args.offline_threads} torch thread(s), {len(sentences)} sentences per "
          f"call): {offline_before['sentences_per_s']:.1f} before, {offline_after['sentences_per_s']:.1f} after, "
          f"mean {offline:.1f} sentences/s ({offline * n_words / len(sentences):.0f} words/s)")
    print(f"endpoint: {url} ({args.per_request} sentence(s) per request, {args.duration:.0f} s per row)\n")
    print("| clients | requests | errors | req/s | sentences/s | words/s | p50 ms | p95 ms | p99 ms "
          "| requests per model call | model busy | model sentences/s | endpoint / offline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.1f} "
              f"| {r['sentences_per_s']:.1f} | {r['words_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
              f"| {r['p99_ms']:.0f} | {r['mean_batch_requests']:.1f} | {r['model_busy']:.0%} "
              f"| {r['model_sentences_per_s']:.1f} | {r['sentences_per_s'] / offline:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "sentences": len(sentences), "words": n_words,
                                               "offline": [offline_before, offline_after],
                                               "offline_sentences_per_s": offline, "runs": runs}, indent=2))
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
