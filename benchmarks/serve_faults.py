"""Replica faults under load: SIGKILL the replica process of an app while clients keep sending, and count.

    python benchmarks/serve_faults.py [--apps tagging,llm] [--clients 4] [--before 8] [--after 15]

For each app (``tagging``: an untrained tiny ToPro checkpoint unless ``--model``;
``llm``: a tiny local Llama in ToPro score mode), one replica on a local Ray and
Serve on 127.0.0.1 and a free port; ``--clients`` closed-loop clients (each
sends its next request when the last one is answered, 30 s timeout) for
``--before`` seconds, then the replica's process (found among this script's own
descendants by its title ``ray::ServeReplica:<app>:...``) gets SIGKILL, and the
clients go on for ``--after`` seconds after the first good answer. Printed per
app: requests before the kill, errors before it (expected 0), errors from the
kill until the first good answer (by kind), the time from the kill to the first
good answer (from the new replica, for ``tagging``: its id differs), and errors
after it (expected 0).

Everything binds and talks to 127.0.0.1; the script stops the Serve and Ray it started.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # llm_tiny: the tests' tiny random LLM builder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def untrained_topro_checkpoint(data_dir: str | None) -> str:
    from topro.data import get_task
    from topro.methods import MethodSpec, build_method
    from topro.models import build_tiny_model

    model_path = str(build_tiny_model("udpos", data_dir))
    method = build_method(MethodSpec(method="topro", task="udpos", labels=list(get_task("udpos").labels),
                                     base_model="tiny"), model_path)
    folder = Path(tempfile.mkdtemp(prefix="topro-fault-ckpt-"))
    method.save(method.build_model(model_path), folder)
    return str(folder)


def replica_processes(app: str) -> list:
    """This script's descendant processes that run a replica of ``app`` (never anyone else's)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:
            continue
        if f"ServeReplica:{app}:" in title:
            found.append(proc)
    return found


class Load:
    """``clients`` threads posting ``body`` to ``url``; every answer recorded as (start, end, outcome, replica)."""

    def __init__(self, url: str, body: dict, clients: int):
        self.url, self.body = url, body
        self.records: list[tuple[float, float, str, str | None]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        import requests

        session = requests.Session()
        while not self.stop.is_set():
            start = time.time()
            replica = None
            try:
                r = session.post(self.url, json=self.body, timeout=30)
                outcome = str(r.status_code)
                if r.status_code == 200:
                    replica = (r.json().get("batch") or {}).get("replica")
            except Exception as err:  # connection reset, timeout
                outcome = type(err).__name__
            with self.lock:
                self.records.append((start, time.time(), outcome, replica))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def fault_run(app: str, url: str, body: dict, clients: int, before: float, after: float) -> dict:
    with Load(url, body, clients) as load:
        time.sleep(before)
        victims = replica_processes(app)
        if len(victims) != 1:
            raise SystemExit(f"expected one replica process of {app}, found {len(victims)}")
        old_replicas = {r for _, _, o, r in load.records if o == "200"}
        killed_at = time.time()
        os.kill(victims[0].pid, signal.SIGKILL)
        first_good = None
        deadline = killed_at + 300
        while first_good is None and time.time() < deadline:
            time.sleep(0.05)
            with load.lock:
                good = [end for start, end, o, r in load.records
                        if o == "200" and start > killed_at and (r is None or r not in old_replicas)]
            first_good = min(good) if good else None
        if first_good is None:
            raise SystemExit(f"{app}: no good answer within 300 s of the kill")
        time.sleep(after)
    records = load.records
    before_kill = [r for r in records if r[1] < killed_at]
    during = [r for r in records if r[1] >= killed_at and r[0] <= first_good]
    after_recovery = [r for r in records if r[0] > first_good]
    return {
        "app": app, "victim_pid": victims[0].pid,
        "requests_before": len(before_kill), "errors_before": sum(r[2] != "200" for r in before_kill),
        "answered_during_recovery": len(during),
        "errors_during_recovery": Counter(r[2] for r in during if r[2] != "200"),
        "seconds_to_first_good_answer": first_good - killed_at,
        "requests_after": len(after_recovery), "errors_after": Counter(r[2] for r in after_recovery if r[2] != "200"),
        "new_replicas": sorted({r[3] for r in after_recovery if r[3]} - old_replicas),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", default="tagging,llm")
    parser.add_argument("--model", help="tagging checkpoint (default: an untrained tiny ToPro one)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--before", type=float, default=8.0, help="seconds of load before the kill")
    parser.add_argument("--after", type=float, default=15.0, help="seconds of load after the first good answer")
    parser.add_argument("--data-dir", default=os.environ.get("TOPRO_DATA_DIR"))
    args = parser.parse_args(argv)
    from topro.cluster.runtime import init_ray

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    results = []
    try:
        for app in args.apps.split(","):
            one = {"Tagger" if app == "tagging" else "LLMTagger": {"num_replicas": 1,
                                                                   "ray_actor_options": {"num_cpus": 1}}}
            if app == "tagging":
                from topro.endpoint.tagging import make_app

                application = make_app({"model": args.model or untrained_topro_checkpoint(args.data_dir),
                                        "max_batch_size": 8}, one)
                body = {"sentences": [["Das", "ist", "ein", "gutes", "Haus", "."]], "lang": "de"}
            else:
                from llm_tiny import tiny_model_dir
                from topro.endpoint.llm import make_app

                application = make_app({"model": str(tiny_model_dir("llama")), "max_sentences": 2, "max_words": 12,
                                        "max_batch_size": 4, "threads": 1}, one)
                body = {"sentences": [["Das", "ist", "gut"]], "lang": "de"}
            prefix = "/" if app == "tagging" else "/llm"
            serve.run(application, name=app, route_prefix=prefix)
            url = base + ("/tag" if app == "tagging" else "/llm/tag")
            print(f"{app}: up at {url}; {args.clients} clients, kill after {args.before:.0f}s", flush=True)
            result = fault_run(app, url, body, args.clients, args.before, args.after)
            results.append(result)
            print(f"{app}: {result}", flush=True)
            serve.delete(app)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    print("\n| app | requests before | errors before | errors from kill to first good answer | "
          "kill -> first good answer | requests after | errors after |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        during = sum(r["errors_during_recovery"].values())
        kinds = ", ".join(f"{k} x{v}" for k, v in r["errors_during_recovery"].items()) or "-"
        print(f"| {r['app']} | {r['requests_before']} | {r['errors_before']} | {during} ({kinds}) | "
              f"{r['seconds_to_first_good_answer']:.1f} s | {r['requests_after']} | "
              f"{sum(r['errors_after'].values())} |")
    return 0 if all(not r["errors_after"] and not r["errors_before"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
