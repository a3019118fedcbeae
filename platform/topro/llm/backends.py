"""Where the language model runs: a local Hugging Face model, or an
OpenAI-compatible HTTP server. Both meet one small interface:

- `score(context, sentence, questions, continuations) -> ScoreResult`:
  log p(continuation_j | context + sentence + question_i), summed over the
  continuation's tokens, for every pair. `context` (instruction and
  demonstrations) is the same for a whole run, `sentence` for one sentence;
  `score_many` does the same for several sentences at once.
- `generate(prompts, max_new_tokens, stop, context) -> list[str]`: greedy
  completions of context + prompt_i.

Each keeps a `TokenCounts` of the work done.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from topro.llm.backend_config import BackendConfig
from topro.llm.generate import greedy_generate_shared
from topro.llm.scoring import (SharedPrefixCache, ScoringItem, TokenCounts, encode_shared_prefix, score_naive,
                               score_seq2seq_naive, score_seq2seq_shared, score_dtype, score_shared,
                               score_shared_many, takes_tree_masks)

log = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    logprobs: torch.Tensor  # [n_questions, n_continuations], summed over tokens
    continuation_tokens: list[int]  # token count of each continuation (length normalisation)


class BackendError(RuntimeError):
    pass


class Backend(Protocol):
    name: str
    counts: TokenCounts

    def score(self, context: str, sentence: str, questions: list[str],
              continuations: list[str]) -> ScoreResult: ...

    def score_many(self, context: str, sentences: list[tuple[str, list[str]]],
                   continuations: list[str]) -> list[ScoreResult]: ...

    def generate(self, prompts: list[str], max_new_tokens: int, stop: str | None = "\n",
                 context: str = "") -> list[str]: ...


def cut_at_stop(text: str, stop: str | None) -> str:
    if stop and stop in text:
        return text[:text.index(stop)]
    return text


# --- local Hugging Face models ---------------------------------------------------

class PromptTokens:
    """How a causal LM's ToPro prompts become token ids, for scoring here and for training
    (``methods/topro_causal.py``): every piece is tokenized after all the text before it, and BOS is
    prepended by hand when the tokenizer would add it (pieces are tokenized without special tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        probe = tokenizer("a").input_ids
        self.bos = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None
                    and probe[:1] == [tokenizer.bos_token_id] else [])
        self._ids_cache: dict[str, list[int]] = {}
        self._warned_boundary = False

    def ids(self, text: str) -> list[int]:
        """`text` tokenized on its own (no special tokens)."""
        if text not in self._ids_cache:
            if len(self._ids_cache) > 50_000:
                self._ids_cache.clear()
            self._ids_cache[text] = self.tokenizer(text, add_special_tokens=False).input_ids
        return self._ids_cache[text]

    def tail_ids(self, before: str, text: str) -> list[int]:
        """The ids of `text` as it tokenizes after `before`: the whole string is
        encoded and split at the boundary (the lm-evaluation-harness way).
        Tokenizing pieces alone and concatenating differs for tokenizers that add
        a dummy prefix at every call (SentencePiece legacy mode, Llama-2/Mistral):
        a spurious "▁" at every boundary, and other ids than a server sees."""
        if not before:
            return self.ids(text)
        head, whole = self.ids(before), self.ids(before + text)
        if whole[:len(head)] != head and not self._warned_boundary:
            self._warned_boundary = True
            log.warning("a token spans the boundary before %r; its ids are split at the boundary's token "
                        "count (as lm-evaluation-harness does)", text[:40])
        return whole[len(head):]

    def prompt_ids(self, context: str, sentence: str, questions: list[str], continuations: list[str]):
        """(sentence ids, question ids, label ids per question): every piece
        tokenized after all the text before it, so prefix + question + label
        is the whole prompt's tokenization (the prefix: ``bos + ids(context) + sentence ids``)."""
        sent_ids = self.tail_ids(context, sentence)
        base = context + sentence
        q_ids = [self.tail_ids(base, q) for q in questions]
        labels = [[self.tail_ids(base + q, c) for c in continuations] for q in questions]
        for row in labels:
            for c, ids in zip(continuations, row):
                if not ids:
                    raise ValueError(f"continuation {c!r} has no tokens")
        return sent_ids, q_ids, labels


ANSWER_END_SCORED = ("always", "when_needed", "per_answer")
"""``answer_end_scored`` settings (eval-llm's score mode, ToPro / soft ToPro / RoSPrompt on causal LMs)."""


def scored_answer_ends(setting: str, prompt, tokens: PromptTokens | None, answers: list[str]) -> list[str]:
    """The text scored after each answer of ``answers`` (each scored continuation without the end).

    The format's answer end is there so an answer whose tokens start another's can lose to it (without it
    p(" adverb") >= p(" adverbio")). ``always``: after every answer. ``when_needed``: after every answer if
    any answer's tokens start another's, else after none. ``per_answer``: after exactly the answers whose
    tokens start another answer's. Under ``per_answer`` each score is the probability of an event of its own,
    and the events are disjoint: "the answer is exactly A" (A's tokens, then the end) for such an A, "the
    answer starts with B's tokens" for every other B; so no answer wins by being a prefix, and a prefix-free
    set is scored exactly as under ``when_needed``. The end costs a logit row and a branch token per scored
    answer and question (a single-token answer without it is read from the question's last logit row alone),
    so with a few prefixes among many words ``per_answer`` keeps almost all of ``when_needed``'s saving.
    ``prompt``: a ``TaskPrompt`` or eval-llm's ``RunSetup`` (task, fmt, label_words, context). Decided once,
    from the answers as the tokenizer splits them after a probe question, and logged with the reason."""
    from topro.prompts.formats import render_topro

    if setting not in ANSWER_END_SCORED:
        raise ValueError(f"answer_end_scored must be one of {ANSWER_END_SCORED}, got {setting!r}")
    end = prompt.fmt.for_task(prompt.task.name).answer_end
    ids = None
    if tokens is not None:
        probe = render_topro(prompt.fmt, prompt.task.name, prompt.label_words, prompt.context, ["word"])
        before = prompt.context + probe.sentence + probe.questions[0]
        ids = {text: tuple(tokens.tail_ids(before, text)) for text in answers}
        # Distinct answers with the same tokens (e.g. words of a script the vocabulary lacks, both [unk])
        # always score the same, with or without the end: say so once.
        same: dict[tuple, list[str]] = {}
        for text, seq in ids.items():
            same.setdefault(seq, []).append(text)
        for texts in (t for t in same.values() if len(t) > 1):
            log.warning("answers %s tokenize identically (%s): they always score the same; use words this "
                        "tokenizer tells apart", ", ".join(map(repr, texts)), list(ids[texts[0]]))
    if setting == "always" or not end:
        return [end] * len(answers)
    if ids is None:
        log.info("answer_end_scored=%s: this backend has no local tokenizer to check the answers with; scoring "
                 "the answer end %r after each", setting, end)
        return [end] * len(answers)
    # Which answer's tokens start which longer one's.
    starts = {a: b for a in ids for b in ids if len(ids[a]) < len(ids[b]) and ids[b][:len(ids[a])] == ids[a]}
    if not starts:
        lengths = "/".join(map(str, sorted({len(v) for v in ids.values()})))
        log.info("answer_end_scored=%s: the %d answers tokenize prefix-free (%s token(s) each): scoring them "
                 "without the answer end %r", setting, len(ids), lengths, end)
        return [""] * len(answers)
    a, b = next(iter(starts.items()))
    if setting == "when_needed":
        log.info("answer_end_scored=when_needed: answer %r %s starts answer %r %s (not prefix-free): scoring "
                 "the answer end %r after each", a, list(ids[a]), b, list(ids[b]), end)
        return [end] * len(answers)
    shown = ", ".join(f"{x!r} (starts {y!r})" for x, y in list(starts.items())[:6])
    log.info("answer_end_scored=per_answer: %d of the %d answers start another answer's tokens: the answer end "
             "%r after those only: %s%s", len(starts), len(ids), end, shown, ", ..." if len(starts) > 6 else "")
    return [end if text in starts else "" for text in answers]


class HFBackend:
    """A local causal or seq2seq LM (folder or hub id), batched, CPU or GPU.

    Causal LMs score with the shared-prefix cache (`scoring="shared"`): the
    run's context is encoded once and kept (LRU of a few); a sentence with all
    its questions x labels then runs as one tree-masked forward against it
    (`score_many`: several sentences per forward, up to `max_tokens_per_batch`).
    `scoring="naive"` runs every prompt in full (the reference). Generation
    decodes all prompts of a call against the cached context."""

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "fp32",
                 scoring: str = "shared", max_tokens_per_batch: int = 4096, generate_batch_size: int = 32,
                 threads: int | None = None, attn_implementation: str = "sdpa"):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        from topro.quiet import quiet_stack

        if scoring not in ("shared", "naive"):
            raise ValueError(f"scoring: {scoring!r} is not 'shared' or 'naive'")
        quiet_stack()
        if threads:
            torch.set_num_threads(threads)
        self.name = model
        self.scoring = scoring
        self.max_tokens_per_batch = max_tokens_per_batch
        self.generate_batch_size = generate_batch_size
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        # fp64 is for reference checks (the equivalence tests), not for speed.
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                       "fp64": torch.float64}[dtype]
        config = AutoConfig.from_pretrained(model)
        self.is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        cls = AutoModelForSeq2SeqLM if self.is_seq2seq else AutoModelForCausalLM
        if not (self.is_seq2seq or takes_tree_masks(config)):
            attn_implementation = "eager"  # BLOOM has no sdpa path (and takes no tree mask either)
        self.model = cls.from_pretrained(model, dtype=torch_dtype,
                                         attn_implementation=attn_implementation).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        # ALiBi models (BLOOM/BLOOMZ, MPT) cannot take the tree masks of
        # shared-prefix scoring: every prompt runs in full instead.
        self.tree_masks = self.is_seq2seq or takes_tree_masks(config)
        if not self.tree_masks and self.scoring == "shared":
            log.info("%s (%s) uses ALiBi attention biases, which shared-prefix scoring cannot build from a tree "
                     "mask: scoring every prompt in full (scoring=naive) and generating with model.generate",
                     model, config.model_type)
            self.scoring = "naive"
        tok = self.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.prompt_tokens = PromptTokens(tok)
        self.bos = self.prompt_tokens.bos
        self.counts = TokenCounts()
        self._contexts: OrderedDict[str, SharedPrefixCache] = OrderedDict()

    def ids(self, text: str) -> list[int]:
        return self.prompt_tokens.ids(text)

    def tail_ids(self, before: str, text: str) -> list[int]:
        return self.prompt_tokens.tail_ids(before, text)

    def _prompt_ids(self, context: str, sentence: str, questions: list[str], continuations: list[str]):
        try:
            return self.prompt_tokens.prompt_ids(context, sentence, questions, continuations)
        except ValueError as e:
            raise BackendError(str(e)) from None

    def _context_state(self, context: str) -> SharedPrefixCache | None:
        ids = self.bos + self.ids(context)
        if not ids:
            return None
        if context not in self._contexts:
            self._contexts[context] = encode_shared_prefix(self.model, ids, counts=self.counts)
            while len(self._contexts) > 4:
                self._contexts.popitem(last=False)
        self._contexts.move_to_end(context)
        return self._contexts[context]

    def score_many(self, context: str, sentences: list[tuple[str, list[str]]],
                   continuations: list[str]) -> list[ScoreResult]:
        """`score` for several (sentence, questions) after the same context;
        causal LMs with shared scoring pack them into as few forwards as fit."""
        if self.is_seq2seq or self.scoring != "shared" or not sentences:
            return [self.score(context, s, q, continuations) for s, q in sentences]
        state = self._context_state(context)
        if state is None:
            return [self.score(context, s, q, continuations) for s, q in sentences]
        results: list[ScoreResult | None] = [None] * len(sentences)
        packed, items, cont_ids = [], [], None
        for i, (s, qs) in enumerate(sentences):
            sent_ids, q_ids, labels = self._prompt_ids(context, s, qs, continuations)
            if not qs:
                results[i] = ScoreResult(torch.zeros(0, len(continuations)), [0] * len(continuations))
                continue
            cont_ids = cont_ids or labels[0]
            if all(row == cont_ids for row in labels):  # the usual case: one label tree for all
                packed.append(i)
                items.append(ScoringItem(sent_ids, q_ids))
            else:
                results[i] = self.score(context, s, qs, continuations)
        if items:
            scores = score_shared_many(self.model, state, items, cont_ids, self.counts,
                                       max_tokens_per_batch=self.max_tokens_per_batch)
            for i, x in zip(packed, scores):
                results[i] = ScoreResult(x, [len(c) for c in cont_ids])
        return results

    def _seq2seq_targets(self, continuations: list[str]) -> list[list[int]]:
        """Decoder targets: the continuation's text (trailing whitespace, such as
        the format's line end, dropped) then end-of-sequence, which terminates
        the answer as the line end does for causal LMs."""
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        targets = [self.ids(c.rstrip()) + eos for c in continuations]
        for c, ids in zip(continuations, targets):
            if not ids:
                raise BackendError(f"continuation {c!r} has no tokens")
        return targets

    def score(self, context: str, sentence: str, questions: list[str],
              continuations: list[str]) -> ScoreResult:
        if self.is_seq2seq:
            cont_ids = self._seq2seq_targets(continuations)
            tok = self.tokenizer
            prompts = [tok(context + sentence + q).input_ids for q in questions]
            fn = score_seq2seq_shared if self.scoring == "shared" else score_seq2seq_naive
            kwargs = {"max_tokens_per_batch": self.max_tokens_per_batch} if self.scoring == "shared" else {}
            scores = fn(self.model, prompts, cont_ids, self.counts, **kwargs)
            return ScoreResult(scores, [len(c) for c in cont_ids])
        sent_ids, q_ids, labels = self._prompt_ids(context, sentence, questions, continuations)
        if not questions:
            return ScoreResult(torch.zeros(0, len(continuations)), [len(self.ids(c)) for c in continuations])
        state = self._context_state(context) if self.scoring == "shared" else None
        if self.scoring == "shared" and state is None:
            sent_ids = self.bos + sent_ids
            if not sent_ids:
                raise BackendError("empty prompt prefix: the format renders no context and no sentence")
        scores = torch.zeros(len(questions), len(continuations), dtype=score_dtype(self.model))
        # Questions whose labels tokenize alike share one label tree (usually all of them).
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(labels):
            groups.setdefault(tuple(map(tuple, row)), []).append(i)
        for key, rows in groups.items():
            cont_ids = [list(c) for c in key]
            group_q = [q_ids[i] for i in rows]
            if self.scoring == "shared":
                part = score_shared(self.model, state, group_q, cont_ids, self.counts, pending=sent_ids,
                                    max_tokens_per_batch=self.max_tokens_per_batch)
            else:
                prefix = self.bos + self.ids(context) + sent_ids
                part = score_naive(self.model, prefix, group_q, cont_ids, self.counts,
                                   max_tokens_per_batch=self.max_tokens_per_batch)
            scores[rows] = part
        return ScoreResult(scores, [len(c) for c in labels[0]])

    def generate(self, prompts: list[str], max_new_tokens: int, stop: str | None = "\n",
                 context: str = "") -> list[str]:
        """Greedy completions of context + prompt_i. Causal LMs encode the
        context once (cached like scoring's) and decode all prompts against it."""
        state = None if self.is_seq2seq or not self.tree_masks else self._context_state(context)
        if state is None:
            return self._generate_hf([context + p for p in prompts], max_new_tokens, stop)
        tok = self.tokenizer
        eos = {t for t in [tok.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)]
               for t in (t if isinstance(t, list) else [t]) if t is not None}
        stop_check = (lambda ids: stop in tok.decode(ids, skip_special_tokens=True)) if stop else None
        new = greedy_generate_shared(self.model, state, [self.tail_ids(context, p) for p in prompts], max_new_tokens,
                                     stop=stop_check, eos_ids=eos, counts=self.counts,
                                     batch_rows=self.generate_batch_size)
        return [cut_at_stop(tok.decode(ids, skip_special_tokens=True), stop) for ids in new]

    @torch.inference_mode()
    def _generate_hf(self, prompts: list[str], max_new_tokens: int, stop: str | None) -> list[str]:
        """Plain batched `model.generate` (seq2seq models, prompts without a context)."""
        tok = self.tokenizer
        tok.padding_side = "right" if self.is_seq2seq else "left"
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.generate_batch_size):
            chunk = order[start:start + self.generate_batch_size]
            batch = tok([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(self.device)
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                          temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
            if stop and not self.is_seq2seq:
                kwargs.update(stop_strings=[stop], tokenizer=tok)
            out = self.model.generate(**batch, **kwargs)
            new = out if self.is_seq2seq else out[:, batch["input_ids"].shape[1]:]
            prompt_tokens = int(batch["attention_mask"].sum())
            generated = int((new != tok.pad_token_id).sum())
            self.counts.add(prompt_tokens + generated, batch["input_ids"].numel() + new.numel())
            for i, row in zip(chunk, new):
                outputs[i] = cut_at_stop(tok.decode(row, skip_special_tokens=True), stop)
        return outputs


# --- OpenAI-compatible HTTP servers ------------------------------------------------

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class HTTPSettings:
    # timeout, retries and concurrency default to what ``BackendConfig`` (the commands' and apps' fields)
    # says, so a backend built without options behaves as a configured one.
    timeout: float = BackendConfig.timeout  # seconds per request
    retries: int = BackendConfig.retries  # further attempts after the first
    backoff: float = 0.5  # seconds, doubled per attempt (or the server's Retry-After)
    concurrency: int = BackendConfig.concurrency  # requests in flight at once
    prompts_per_request: int = 32  # completions take a list of prompts


class OpenAIBackend:
    """An OpenAI-compatible server (vLLM, llama.cpp, TGI, OpenAI, ...).

    Scoring uses `/v1/completions` with `echo` and `logprobs` (the prompt's own
    token log-probabilities), summing the tokens from the continuation's first
    character on; a server without prompt log-probabilities cannot score
    (use generate mode). Generation uses `/v1/completions`, or
    `/v1/chat/completions` when the server has no completions endpoint (or
    `api="chat"`). Requests run `concurrency` at a time with retries on
    connection errors, timeouts and 408/409/429/5xx; prompts go
    `prompts_per_request` to a request, or one at a time to a server that
    refuses a list (`transformers serve`)."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 api: str = "auto", settings: HTTPSettings | None = None):
        import requests

        if api not in ("auto", "completions", "chat"):
            raise ValueError(f"api: {api!r} is not auto, completions or chat")
        url = base_url.rstrip("/")
        self.base_url = url if url.endswith("/v1") else url + "/v1"
        self.settings = settings or HTTPSettings()
        self.api = api
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(self.settings.concurrency, 10))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.counts = TokenCounts()
        self._lock = threading.Lock()
        self._one_prompt_per_request = False  # set when the server refuses a list of prompts
        self.model = model or self._first_model()
        self.name = f"{self.base_url}#{self.model}"

    # transport
    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        import requests

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        url = self.base_url + path
        s = self.settings
        for attempt in range(s.retries + 1):
            wait = s.backoff * (2 ** attempt)
            try:
                resp = self.session.request(method, url, json=payload, headers=headers, timeout=s.timeout)
            except (requests.ConnectionError, requests.Timeout) as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                if resp.status_code < 300:
                    return resp.json()
                problem = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if resp.status_code not in RETRY_STATUS:
                    raise BackendError(f"{method} {url}: {problem}")
                retry_after = resp.headers.get("Retry-After")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = float(retry_after)
            if attempt == s.retries:
                raise BackendError(f"{method} {url}: gave up after {s.retries + 1} attempts; last: {problem}")
            log.warning("%s %s: %s; retry %d/%d in %.1fs", method, url, problem, attempt + 1, s.retries, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _first_model(self) -> str:
        data = self._request("GET", "/models").get("data") or []
        if not data:
            raise BackendError(f"{self.base_url}/models lists no model; pass the model name")
        return data[0]["id"]

    def _count(self, response: dict) -> None:
        usage = response.get("usage") or {}
        tokens = int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
        with self._lock:
            self.counts.add(tokens, tokens)

    def _map(self, fn, items: list) -> list:
        if len(items) <= 1 or self.settings.concurrency <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(self.settings.concurrency) as pool:
            futures = [pool.submit(fn, x) for x in items]
            try:
                return [f.result() for f in futures]
            except BaseException:
                # The first failure (a server that cannot score) stops the run now, not after every queued request.
                for f in futures:
                    f.cancel()
                raise

    def _completions(self, prompts: list[str], check=None, **params) -> list[dict]:
        """Choices for each prompt, in order; prompts go in groups, concurrently. ``check(choice)`` runs on each
        answer as it comes, so a server that lacks what is asked stops the run at its first answer."""
        n = 1 if self._one_prompt_per_request else self.settings.prompts_per_request
        groups = [prompts[i:i + n] for i in range(0, len(prompts), n)]

        def post(group: list[str]) -> list[dict]:
            # One prompt goes as a string: some servers (`transformers serve`) take no list.
            prompt = group[0] if len(group) == 1 else group
            response = self._request("POST", "/completions", {"model": self.model, "prompt": prompt, **params})
            self._count(response)
            choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
            if len(choices) != len(group):
                raise BackendError(f"{self.base_url}/completions returned {len(choices)} choices "
                                   f"for {len(group)} prompts")
            for choice in choices if check else ():
                check(choice)
            return choices

        def run(group: list[str]) -> list[dict]:
            if len(group) == 1 or self._one_prompt_per_request:
                return [c for p in group for c in post([p])]
            try:
                return post(group)
            except BackendError as err:
                if not any(f"HTTP {s}:" in str(err) for s in (400, 422)):
                    raise
                # A list of prompts refused: one prompt per request from now on (a real fault fails again there).
                choices = [c for p in group for c in post([p])]
                if not self._one_prompt_per_request:
                    self._one_prompt_per_request = True
                    log.warning("%s/completions refused a list of prompts (%s); sending one prompt per request",
                                self.base_url, err)
                return choices

        return [c for group in self._map(run, groups) for c in group]

    # interface
    def score(self, context: str, sentence: str, questions: list[str],
              continuations: list[str]) -> ScoreResult:
        return self._score_prompts([context + sentence + q for q in questions], continuations)

    def _cannot_score(self, what_happened: str) -> str:
        return (f"score mode needs the prompt's token logprobs (/v1/completions with echo=true and logprobs); "
                f"{what_happened}: use --mode generate with this server, or score with a local model folder or a "
                f"server that returns prompt logprobs")

    def _has_prompt_logprobs(self, choice: dict) -> None:
        lp = choice.get("logprobs") or {}
        if not lp.get("tokens") or lp.get("token_logprobs") is None or lp.get("text_offset") is None:
            raise BackendError(self._cannot_score(f"{self.base_url}/completions returned none"))

    def _score_prompts(self, base: list[str], continuations: list[str]) -> ScoreResult:
        if self.api == "chat":
            raise BackendError(self._cannot_score(f"{self.base_url} is used through /chat/completions (api=chat), "
                                                 "which has none"))
        prompts = [b + c for b in base for c in continuations]
        boundaries = [len(b) for b in base for _ in continuations]
        choices = self._completions(prompts, check=self._has_prompt_logprobs, max_tokens=1, echo=True, logprobs=1,
                                    temperature=0)
        n_c = len(continuations)
        scores = torch.zeros(len(base), n_c)
        token_counts = [0] * n_c
        for k, (choice, boundary, prompt) in enumerate(zip(choices, boundaries, prompts)):
            lp = choice.get("logprobs") or {}
            tokens, values, offsets = lp["tokens"], lp["token_logprobs"], lp["text_offset"]
            total, count = 0.0, 0
            for tok_text, value, offset in zip(tokens, values, offsets):
                # Continuation tokens: those ending after the boundary and
                # starting before the prompt's end (the generated token is not).
                if offset >= len(prompt) or offset + len(tok_text) <= boundary:
                    continue
                if value is None:
                    raise BackendError(f"no logprob for continuation token {tok_text!r}")
                total += float(value)
                count += 1
            if count == 0:
                raise BackendError(f"no tokens found for continuation {prompt[boundary:]!r}")
            scores[k // n_c, k % n_c] = total
            token_counts[k % n_c] = count
        return ScoreResult(scores, token_counts)

    def score_many(self, context: str, sentences: list[tuple[str, list[str]]],
                   continuations: list[str]) -> list[ScoreResult]:
        """All sentences' prompts go out together, so requests overlap across sentences."""
        if not sentences:
            return []
        flat = [q for _, qs in sentences for q in qs]
        sentence_of = [s for s, qs in sentences for _ in qs]
        if not flat:
            return [ScoreResult(torch.zeros(0, len(continuations)), [0] * len(continuations)) for _ in sentences]
        result = self._score_prompts([context + s + q for s, q in zip(sentence_of, flat)], continuations)
        out, row = [], 0
        for _, qs in sentences:
            out.append(ScoreResult(result.logprobs[row:row + len(qs)], result.continuation_tokens))
            row += len(qs)
        return out

    def generate(self, prompts: list[str], max_new_tokens: int, stop: str | None = "\n",
                 context: str = "") -> list[str]:
        prompts = [context + p for p in prompts]
        if self.api in ("auto", "completions"):
            try:
                params = {"max_tokens": max_new_tokens, "temperature": 0}
                if stop:
                    params["stop"] = [stop]
                choices = self._completions(prompts, **params)
                return [cut_at_stop(c.get("text") or "", stop) for c in choices]
            except BackendError as err:
                if self.api == "completions" or not any(f"HTTP {s}" in str(err) for s in (404, 405)):
                    raise
                log.warning("no /v1/completions at %s; generating through /v1/chat/completions", self.base_url)
                self.api = "chat"

        def chat(prompt: str) -> str:
            payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_new_tokens, "temperature": 0}
            if stop:
                payload["stop"] = [stop]
            response = self._request("POST", "/chat/completions", payload)
            self._count(response)
            message = (response.get("choices") or [{}])[0].get("message") or {}
            return cut_at_stop(message.get("content") or "", stop)

        return self._map(chat, prompts)


def is_http(model: str) -> bool:
    return model.startswith(("http://", "https://"))


def load_backend(model: str, **options) -> Backend:
    """`http(s)://...` -> OpenAIBackend; a folder or hub id -> HFBackend.
    Options not meant for the chosen backend are ignored."""
    if is_http(model):
        settings = HTTPSettings(**{k: options[k] for k in ("timeout", "retries", "backoff", "concurrency",
                                                           "prompts_per_request") if options.get(k) is not None})
        return OpenAIBackend(model, model=options.get("api_model"), api=options.get("api") or "auto",
                             settings=settings)
    keys = ("device", "dtype", "scoring", "max_tokens_per_batch", "generate_batch_size", "threads")
    return HFBackend(model, **{k: options[k] for k in keys if options.get(k) is not None})
