"""Send every kind of bad request to a running tagging endpoint and print what each got back.

    python benchmarks/bad_inputs.py --url http://127.0.0.1:8000

Each case must be answered 4xx with a message that names the problem, and the
replica must still answer afterwards (checked at the end: same replica, a good
request tagged). The limits are read from ``GET /models``, so the cases fit any
config. ``tests/test_serve_http.py`` runs the same cases.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import requests

MODEL_ID_HEADER = "serve_multiplexed_model_id"


@dataclass
class Case:
    name: str
    method: str
    path: str
    status: int
    message: str
    """A substring the answer's ``detail`` must contain."""
    json_body: Any = None
    data: bytes | str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def cases(limits: dict[str, int]) -> list[Case]:
    n_sent, n_words, n_chars = limits["max_sentences"], limits["max_words"], limits["max_word_chars"]
    js = {"content-type": "application/json"}
    return [
        Case("malformed JSON", "POST", "/tag", 400, "malformed JSON body", data='{"sentences": [["Das", "ist"]',
             headers=js),
        Case("not JSON (text/plain)", "POST", "/tag", 415, "send application/json", data="Das ist gut",
             headers={"content-type": "text/plain"}),
        Case("empty body", "POST", "/tag", 422, "the body is missing", data=b"", headers=js),
        Case("body is a JSON array", "POST", "/tag", 422, "the body must be a JSON object", json_body=[["Das"]]),
        Case("no sentences nor text", "POST", "/tag", 422, "send exactly one of 'sentences'",
             json_body={"lang": "de"}),
        Case("both sentences and text", "POST", "/tag", 422, "send exactly one of 'sentences'",
             json_body={"sentences": [["a"]], "text": "a"}),
        Case("unknown field", "POST", "/tag", 422, "sentence: unknown field", json_body={"sentence": [["Das"]]}),
        Case("sentences is a string", "POST", "/tag", 422, "sentences: Input should be a valid list",
             json_body={"sentences": "Das ist gut"}),
        Case("a sentence is a string", "POST", "/tag", 422, "sentences[0]: Input should be a valid list",
             json_body={"sentences": ["Das ist gut"]}),
        Case("a word is a number", "POST", "/tag", 422, "sentences[0][1]: Input should be a valid string",
             json_body={"sentences": [["Das", 42]]}),
        Case("a word is null", "POST", "/tag", 422, "sentences[0][0]: Input should be a valid string",
             json_body={"sentences": [[None]]}),
        Case("text is a number", "POST", "/tag", 422, "text: Input should be a valid string",
             json_body={"text": 5}),
        Case("lang is not a language code", "POST", "/tag", 422, "lang: expected a language code",
             json_body={"text": "Das ist gut", "lang": "Deutsch!"}),
        Case("no sentences", "POST", "/tag", 422, "send at least one sentence", json_body={"sentences": []}),
        Case("empty sentence", "POST", "/tag", 422, "sentences[1]: a sentence needs at least one word",
             json_body={"sentences": [["Das"], []]}),
        Case("empty text", "POST", "/tag", 422, "text: a sentence needs at least one word",
             json_body={"text": "   "}),
        Case("empty word", "POST", "/tag", 422, "sentences[0][1]: empty or whitespace-only word",
             json_body={"sentences": [["Das", ""]]}),
        Case("a word with a lone surrogate", "POST", "/tag", 422,
             "sentences[0][1]: character 1 (U+D800) cannot be encoded as UTF-8",
             json_body={"sentences": [["Das", "a\ud800"]]}),
        Case("text with a lone surrogate", "POST", "/tag", 422, "text[2]: character 0 (U+DC80)",
             json_body={"text": "Das ist \udc80 gut"}),
        Case("too many sentences", "POST", "/tag", 413, f"the limit is {n_sent}",
             json_body={"sentences": [["Das", "ist", "gut"]] * (n_sent + 1)}),
        Case("too many words", "POST", "/tag", 413, f"the limit is {n_words} words per sentence",
             json_body={"text": " ".join(["gut"] * (n_words + 1))}),
        Case("word too long", "POST", "/tag", 413, f"the limit is {n_chars}",
             json_body={"sentences": [["Das", "x" * (n_chars + 1)]]}),
        Case("body too large", "POST", "/tag", 413, "bytes; the limit is",
             data=b'{"text": "' + b"a" * limits["max_body_bytes"] + b'"}', headers=js),
        Case("unknown model id", "POST", "/tag", 404, "unknown model id 'no-such-model'",
             json_body={"text": "Das ist gut"}, headers={MODEL_ID_HEADER: "no-such-model"}),
        Case("models:/ id not allowed", "POST", "/tag", 404, "unknown model id 'models:/no-such-model@champion'",
             json_body={"text": "Das ist gut"}, headers={MODEL_ID_HEADER: "models:/no-such-model@champion"}),
        Case("a server path as model id", "POST", "/tag", 404, "unknown model id '/etc/passwd'",
             json_body={"text": "Das ist gut"}, headers={MODEL_ID_HEADER: "/etc/passwd"}),
        Case("model id header in Latin-1", "POST", "/tag", 400, "is not a model id",
             json_body={"text": "Das ist gut"}, headers={MODEL_ID_HEADER: "mod\u00e8le"}),
        Case("model id header in UTF-8", "POST", "/tag", 400, "is not a model id",
             json_body={"text": "Das ist gut"}, headers={MODEL_ID_HEADER: "mod\u00e8le".encode()}),
        Case("model id header of 300 characters", "POST", "/tag", 400, "is not a model id",
             json_body={"text": "Das ist gut"}, headers={MODEL_ID_HEADER: "m" * 300}),
        Case("GET on /tag", "GET", "/tag", 405, "Method Not Allowed"),
        Case("unknown path", "POST", "/tags", 404, "Not Found", json_body={"text": "Das"}),
    ]


def send(url: str, case: Case, timeout: float = 60.0) -> requests.Response:
    kwargs: dict[str, Any] = {"headers": case.headers, "timeout": timeout}
    if case.json_body is not None:
        kwargs["json"] = case.json_body
    elif case.data is not None:
        kwargs["data"] = case.data
    return requests.request(case.method, url.rstrip("/") + case.path, **kwargs)


def detail_of(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)


def run(url: str) -> tuple[list[dict[str, Any]], bool]:
    """(one row per case, whether the replica answered normally afterwards)."""
    info = requests.get(url.rstrip("/") + "/models", timeout=60).json()
    replica = info["replica"]
    rows = []
    for case in cases(info["limits"]):
        response = send(url, case)
        detail = detail_of(response)
        rows.append({"case": case.name, "status": response.status_code, "expected": case.status,
                     "detail": detail, "ok": response.status_code == case.status and case.message in detail})
    after = requests.get(url.rstrip("/") + "/models", timeout=60).json()
    good = requests.post(url.rstrip("/") + "/tag", json={"text": "Das ist gut ."}, timeout=60)
    alive = after["replica"] == replica and good.status_code == 200 and len(good.json()["sentences"][0]["words"]) == 4
    return rows, alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = parser.parse_args(argv)
    rows, alive = run(args.url)
    if args.json:
        print(json.dumps({"cases": rows, "replica_alive_after": alive}, indent=2, ensure_ascii=False))
    else:
        print("| case | status | message |\n|---|---|---|")
        for row in rows:
            flag = "" if row["ok"] else f" (expected {row['expected']})"
            print(f"| {row['case']} | {row['status']}{flag} | {row['detail'].replace('|', '/')} |")
        print(f"\nreplica alive afterwards (same replica, good request tagged): {alive}")
    return 0 if alive and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
