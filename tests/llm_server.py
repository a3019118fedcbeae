"""A tiny OpenAI-compatible server on 127.0.0.1 over a local HF causal LM, for tests.

Implements GET /v1/models, POST /v1/completions (prompt string or list; echo
with prompt logprobs and text offsets; greedy generation with stop strings)
and POST /v1/chat/completions. Fault injection: `plan` is a list of
behaviours consumed one per request ("503": answer 503; "slow": sleep past
the client's timeout before answering); `completions=False` answers 404 on
/v1/completions (a chat-only server); `prompt_lists=False` answers 400 to a
list of prompts. `max_in_flight` records concurrency.

Why a server written here, when tests/test_llm_peer_server.py runs a real one
(`transformers serve`): this one fails when and how a test says (503s,
timeouts, no completions endpoint), counts what is in flight, and returns
prompt logprobs, which score mode needs and `transformers serve` lacks.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class TinyOpenAIServer:
    def __init__(self, model, tokenizer, name: str = "tiny", completions: bool = True,
                 slow_seconds: float = 1.5, request_delay: float = 0.0, prompt_lists: bool = True):
        self.model, self.tok, self.name = model, tokenizer, name
        self.completions = completions
        self.prompt_lists = prompt_lists
        self.slow_seconds, self.request_delay = slow_seconds, request_delay
        self.plan: list[str] = []
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    # model work
    @torch.inference_mode()
    def prompt_logprobs(self, prompt: str) -> dict:
        enc = self.tok(prompt, return_offsets_mapping=True)
        ids, offsets = enc.input_ids, enc.offset_mapping
        with self._model_lock:
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens, values, starts = [], [], []
        for k, (token, (a, b)) in enumerate(zip(ids, offsets)):
            if token == self.tok.bos_token_id:
                continue  # not part of the text
            tokens.append(prompt[a:b])
            starts.append(a)
            values.append(None if k == 0 else float(logprobs[k - 1, token]))
        return {"tokens": tokens, "token_logprobs": values, "text_offset": starts,
                "top_logprobs": None}, len(ids)

    @torch.inference_mode()
    def complete(self, prompt: str, max_tokens: int, stop: list[str]) -> tuple[str, int, int]:
        ids = self.tok(prompt, return_tensors="pt").input_ids
        with self._model_lock:
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=self.tok.pad_token_id)
        new = out[0, ids.shape[1]:]
        text = self.tok.decode(new, skip_special_tokens=True)
        for s in stop:
            if s in text:
                text = text[:text.index(s)]
        return text, ids.shape[1], len(new)

    def handle(self, path: str, body: dict) -> tuple[int, dict]:
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": self.name, "object": "model"}]}
        if path == "/v1/completions" and self.completions:
            if isinstance(body["prompt"], list) and not self.prompt_lists:
                return 400, {"detail": "prompt must be a string."}  # as transformers serve answers
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            stop = body.get("stop") or []
            stop = [stop] if isinstance(stop, str) else stop
            choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
            for i, prompt in enumerate(prompts):
                text, n_prompt, n_new = self.complete(prompt, int(body.get("max_tokens", 16)), stop)
                choice = {"index": i, "text": text, "finish_reason": "stop"}
                if body.get("echo"):
                    lp, _ = self.prompt_logprobs(prompt)
                    # the generated text follows, as real servers append it
                    lp["tokens"].append(text)
                    lp["token_logprobs"].append(-0.5)
                    lp["text_offset"].append(len(prompt))
                    choice.update(text=prompt + text, logprobs=lp)
                choices.append(choice)
                usage["prompt_tokens"] += n_prompt
                usage["completion_tokens"] += n_new
            return 200, {"object": "text_completion", "model": self.name, "choices": choices, "usage": usage}
        if path == "/v1/chat/completions":
            prompt = "\n".join(m["content"] for m in body["messages"])
            stop = body.get("stop") or []
            text, n_prompt, n_new = self.complete(prompt, int(body.get("max_tokens", 16)), stop)
            return 200, {"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new}}
        return 404, {"error": {"message": f"no route {path}"}}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, method: str):
                with server._lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    action = server.plan.pop(0) if server.plan else "ok"
                counted = True
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = json.loads(self.rfile.read(length) or b"{}") if method == "POST" else {}
                    if server.request_delay:
                        time.sleep(server.request_delay)
                    if action == "503":
                        status, payload = 503, {"error": {"message": "overloaded"}}
                    else:
                        if action == "slow":
                            time.sleep(server.slow_seconds)
                        status, payload = server.handle(self.path, body)
                    data = json.dumps(payload).encode()
                    with server._lock:  # done before the client can see the answer
                        server.in_flight -= 1
                        counted = False
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    if counted:
                        with server._lock:
                            server.in_flight -= 1

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

        return Handler
