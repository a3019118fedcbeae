"""Good requests from several clients while one client keeps sending a request the model cannot take.

    python benchmarks/poison_mix.py --url http://127.0.0.1:8000 --clients 16 --seconds 20 --poison-every 0.5

The poison is a word holding a lone UTF-16 surrogate (``"\\ud800"``): JSON carries it, Python decodes it,
and a tokenizer fails on it. Every good request must be answered 200 with its own words, whatever the
poison does to the batch it lands in; the poison itself must get a 4xx. Prints the counts per outcome.
``tests/test_serve_http.py`` runs a short version.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from typing import Any

import requests

POISON = {"sentences": [["Das", "\ud800", "gut"]], "lang": "de"}


def run(url: str, clients: int = 16, seconds: float = 20.0, poison_every: float = 0.5) -> dict[str, Any]:
    url = url.rstrip("/") + "/tag"
    good: Counter = Counter()
    poison: Counter = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def good_client(i: int) -> None:
        n = 0
        with requests.Session() as session:
            while time.monotonic() < deadline:
                words = [f"w{i}x{n}", "ist", "gut", "."][: 1 + n % 4]
                n += 1
                try:
                    r = session.post(url, json={"sentences": [words]}, timeout=120)
                    ok = r.status_code == 200 and [w["word"] for w in r.json()["sentences"][0]["words"]] == words
                    key = "ok" if ok else f"{r.status_code}"
                    detail = "" if ok else r.text[:200]
                except requests.RequestException as err:
                    key, detail = "no answer", f"{type(err).__name__}: {err}"[:200]
                with lock:
                    good[key] += 1
                    if detail and len(failures) < 5:
                        failures.append(f"{key}: {detail}")

    def poison_client() -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline:
                try:
                    r = session.post(url, json=POISON, timeout=120)
                    key = f"{r.status_code} {r.json().get('detail', '')[:90]}"
                except (requests.RequestException, ValueError) as err:
                    key = f"no answer ({type(err).__name__})"
                with lock:
                    poison[key] += 1
                time.sleep(poison_every)

    threads = [threading.Thread(target=good_client, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=poison_client))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"good": dict(good), "good_failed": sum(v for k, v in good.items() if k != "ok"),
            "poison": dict(poison), "first_failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--poison-every", type=float, default=0.5)
    args = parser.parse_args(argv)
    result = run(args.url, args.clients, args.seconds, args.poison_every)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0 if result["good_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
