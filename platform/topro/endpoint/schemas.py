"""Request and response bodies of the tagging endpoint, and the checks that come before any model runs.

Shape and type problems are caught by pydantic (422); size limits, which come
from the application's config, by ``check_limits`` (413). Both say which field
is wrong, e.g. ``sentences[2]: a sentence needs at least one word``.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, model_validator

LANG_PATTERN = r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*$"


class RequestProblem(Exception):
    """A request the endpoint refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class TagRequest(BaseModel):
    """``{"sentences": [["Das", "ist", "gut"], ...]}`` or ``{"text": "Das ist gut"}``, optional ``lang``."""

    model_config = ConfigDict(extra="forbid")

    sentences: list[list[StrictStr]] | None = Field(
        None, description="Pre-tokenised sentences: a list of sentences, each a list of words.")
    text: StrictStr | None = Field(None, description="One sentence as text, split on whitespace.")
    lang: StrictStr | None = Field(None, pattern=LANG_PATTERN, max_length=16,
                                   description="Language code of the input (e.g. 'de'); echoed back.")

    @model_validator(mode="after")
    def _one_input(self) -> "TagRequest":
        if (self.sentences is None) == (self.text is None):
            raise ValueError("send exactly one of 'sentences' (a list of word lists) or 'text' (a string)")
        return self

    def word_lists(self) -> list[list[str]]:
        if self.text is not None:
            return [self.text.split()]
        return [list(words) for words in self.sentences or []]


class ClassifyRequest(BaseModel):
    """``{"texts": ["Angela Merkel sprach.", ...]}`` or ``{"text": "Angela Merkel sprach."}``, optional ``lang``:
    texts for a model of a classification task (``POST /classify``)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] | None = Field(None, description="Texts to classify, one label each.")
    text: StrictStr | None = Field(None, description="One text to classify.")
    lang: StrictStr | None = Field(None, pattern=LANG_PATTERN, max_length=16,
                                   description="Language code of the input (e.g. 'de'); echoed back.")

    @model_validator(mode="after")
    def _one_input(self) -> "ClassifyRequest":
        if (self.texts is None) == (self.text is None):
            raise ValueError("send exactly one of 'texts' (a list of strings) or 'text' (a string)")
        return self

    def text_list(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class Limits(BaseModel):
    """Request size limits (from the app's args)."""

    max_sentences: int
    max_words: int
    """Words per sentence."""
    max_word_chars: int


def check_limits(request: TagRequest, limits: Limits) -> list[list[str]]:
    """The request's word lists, or a ``RequestProblem`` naming the first one that breaks a rule."""
    word_lists = request.word_lists()
    where = "text" if request.text is not None else "sentences"
    if not word_lists:
        raise RequestProblem(422, "sentences: send at least one sentence")
    if len(word_lists) > limits.max_sentences:
        raise RequestProblem(413, f"sentences: {len(word_lists)} sentences in one request; "
                                  f"the limit is {limits.max_sentences}")
    for i, words in enumerate(word_lists):
        at = where if request.text is not None else f"sentences[{i}]"
        if not words:
            raise RequestProblem(422, f"{at}: a sentence needs at least one word" +
                                 (" (the text is empty or only whitespace)" if request.text is not None else ""))
        if len(words) > limits.max_words:
            raise RequestProblem(413, f"{at}: {len(words)} words; the limit is {limits.max_words} words "
                                      "per sentence")
        for j, word in enumerate(words):
            problem = unencodable(word)
            if problem:
                raise RequestProblem(422, f"{at}[{j}]: {problem}")
            if not word.strip():
                raise RequestProblem(422, f"{at}[{j}]: empty or whitespace-only word")
            if len(word) > limits.max_word_chars:
                raise RequestProblem(413, f"{at}[{j}]: a word of {len(word)} characters; the limit is "
                                          f"{limits.max_word_chars}")
    return word_lists


def check_text_limits(request: ClassifyRequest, limits: Limits) -> list[str]:
    """The request's texts, or a ``RequestProblem`` naming the first one that breaks a rule: the tagging
    route's limits read per text (``max_sentences`` texts, ``max_words`` words of at most ``max_word_chars``
    characters each)."""
    texts = request.text_list()
    if not texts:
        raise RequestProblem(422, "texts: send at least one text")
    if len(texts) > limits.max_sentences:
        raise RequestProblem(413, f"texts: {len(texts)} texts in one request; the limit is {limits.max_sentences}")
    for i, text in enumerate(texts):
        at = "text" if request.text is not None else f"texts[{i}]"
        problem = unencodable(text)
        if problem:
            raise RequestProblem(422, f"{at}: {problem}")
        words = text.split()
        if not words:
            raise RequestProblem(422, f"{at}: empty or whitespace-only text")
        if len(words) > limits.max_words:
            raise RequestProblem(413, f"{at}: {len(words)} words; the limit is {limits.max_words} words per text")
        longest = max(words, key=len)
        if len(longest) > limits.max_word_chars:
            raise RequestProblem(413, f"{at}: a word of {len(longest)} characters; the limit is "
                                      f"{limits.max_word_chars}")
    return texts


def unencodable(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (JSON lets a lone surrogate such as ``"\\ud800"`` through,
    and the tokenizer then fails the whole model call), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"character {err.start} (U+{ord(text[err.start]):04X}) cannot be encoded as UTF-8 "
                "(a lone UTF-16 surrogate); send valid Unicode text")
    return None


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """pydantic/FastAPI errors as one line: ``sentences[0][1]: Input should be a valid string; ...``."""
    parts = []
    for error in errors[:5]:
        loc = [p for p in error.get("loc", ()) if p != "body"]
        path = ""
        for p in loc:
            path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
        message = str(error.get("msg", "invalid"))
        if error.get("type") == "extra_forbidden":
            message = "unknown field (expected 'sentences' or 'text' (POST /tag), 'texts' or 'text' (POST /classify), " \
                      "and optionally 'lang')"
        elif error.get("type") == "missing" and not loc:
            message = "the body is missing: send a JSON object"
        elif error.get("type") in ("model_attributes_type", "dict_type", "model_type") and not loc:
            message = "the body must be a JSON object such as {\"sentences\": [[\"Das\", \"ist\", \"gut\"]]}"
        elif error.get("type") == "string_pattern_mismatch" and loc and loc[-1] == "lang":
            message = "expected a language code such as 'de' or 'pt-BR'"
        parts.append(f"{path or 'body'}: {message}" if path else message)
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    return "; ".join(parts)


class TaggedWordOut(BaseModel):
    word: str
    tag: str
    prob: float | None = Field(description="Probability of the tag; null if the model never saw the word.")


class TaggedSentenceOut(BaseModel):
    words: list[TaggedWordOut]
    lang: str | None = None
    n_truncated_words: int = 0
    n_trimmed_prompts: int = 0


class ModelRef(BaseModel):
    id: str
    uri: str | None = Field(None, description="The registry URI of the model (null for a checkpoint folder: "
                                              "server paths are not shown).")
    task: str
    method: str
    run_id: str | None = None
    registered_model: str | None = None
    version: str | None = Field(None, description="The registered version that tagged this request (for "
                                                  "models:/<name>@<alias>, the one the alias named then).")


class BatchInfo(BaseModel):
    """How the request was served (for observing batching)."""

    id: int = Field(description="The model call's number on its replica: requests with the same replica and "
                                "id shared one model call.")
    requests: int = Field(description="Requests answered by the same model call as this one.")
    sentences: int = Field(description="Sentences in that model call.")
    replica: str
    seconds: float = Field(description="Time of that model call.")
    chunks: int = Field(1, description="Model calls this request was split into (max_call_words); the other "
                                       "fields describe the last of them.")


class TagResponse(BaseModel):
    model: ModelRef
    sentences: list[TaggedSentenceOut]
    batch: BatchInfo


class ClassifiedTextOut(BaseModel):
    text: str
    label: str
    prob: float = Field(description="Probability of the label.")
    scores: dict[str, float] = Field(description="Every class's probability.")
    lang: str | None = None
    trimmed: bool = Field(False, description="The text was cut at its end to fit the model's max_length.")


class ClassifyResponse(BaseModel):
    model: ModelRef
    texts: list[ClassifiedTextOut]
    batch: BatchInfo


class LLMTaggedWordOut(BaseModel):
    word: str
    tag: str
    prob: float | None = Field(description="Score mode: the tag's share of the label words' likelihood; "
                                           "generate mode: null.")
    format_failed: bool = Field(description="Generate mode: the answer matched no label (fallback tag).")


class LLMTaggedSentenceOut(BaseModel):
    words: list[LLMTaggedWordOut]
    lang: str | None = None
    n_format_failed: int = 0


class LLMRef(BaseModel):
    backend: str | None
    task: str
    format: str
    mode: str
    shots: int


class LLMBatchInfo(BaseModel):
    requests: int
    sentences: int
    seconds: float


class LLMTagResponse(BaseModel):
    model: LLMRef
    sentences: list[LLMTaggedSentenceOut]
    batch: LLMBatchInfo


class ErrorResponse(BaseModel):
    detail: str


__all__ = ["BatchInfo", "ClassifiedTextOut", "ClassifyRequest", "ClassifyResponse", "ErrorResponse", "LLMTagResponse", "Limits", "ModelRef", "RequestProblem", "TagRequest", "TagResponse",
           "TaggedSentenceOut", "TaggedWordOut", "ValidationError", "check_limits", "check_text_limits", "describe_validation_errors",
           "unencodable"]


def check_lang(lang: str | None, task: str) -> None:
    """A request's ``lang`` must be a language of the model's task: 422 naming the known ones."""
    if not lang:
        return
    from topro.data import get_task

    known = get_task(task).languages
    if lang not in known:
        raise RequestProblem(422, f"lang: {lang!r} is not a language of task {task!r}; known: {', '.join(known)}")
