"""Typed run configurations loaded from YAML, with ``key=value`` overrides.

Every field carries its own docstring (litgpt style). Loading validates
types and names the offending key, file and value, so a typo in a config or
on the command line fails before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from topro.batching import EVALUATION_MAX_TOKENS_PER_BATCH
from topro.method_registry import METHOD_REGISTRY, method_entry, packable_methods


EVAL_DTYPES = ("fp32", "bf16", "fp64")
"""Evaluation precisions. ``fp64`` is a reference precision, not a fast one: results then agree across
processes, CPUs and thread counts (float32 sums taken in another order can flip a near-tied argmax)."""


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a bad value."""


@dataclass
class TrainConfig:
    """One training run: task, method, model, data, optimisation and scale."""

    RENAMED_KEYS = {"max_eval_sentences": "max_sentences"}  # not a field: old names, refused with the new one

    task: str = "udpos"
    """Task name from the registry (``udpos``, ``panx``, ...)."""
    method: str = "topro"
    """Method name: ``vanilla``, ``topro``, ``prompt_tuning``, ``topro_soft`` or ``rosprompt``."""
    model: str = "tiny"
    """Hugging Face id, local folder, or ``tiny`` (built offline from the task's data)."""
    template: str | None = None
    """ToPro template name; ``None`` takes the task's default."""
    llm_format: str = "topro"
    """ToPro on a causal (decoder-only) LM: the prompt format (``prompts/llm_formats/<name>.yaml`` or a YAML
    path, topro style) that ``topro eval-llm`` scores, so training starts from the same prompt."""
    answer_end_scored: Literal["always", "when_needed", "per_answer"] = "always"
    """ToPro, soft ToPro and RoSPrompt on a causal LM (as ``topro eval-llm --answer_end_scored``): ``always``
    scores each label word with the format's answer end after it (so a label whose tokens start another's
    can lose to it); ``when_needed`` drops the end when the label words' tokenizations are prefix-free
    (checked once from the tokenizer, logged either way): single-token labels then need no label-branch
    tokens and one full-vocabulary logit row per question instead of one per label plus one; ``per_answer``
    scores the end after exactly the words whose tokens start another word's (each score is then the
    probability of its own, disjoint event: "exactly A" or "starts with B"), which keeps that saving for
    word lists with a few prefixes (RoSPrompt's seed words: ' adverb' starts ' adverbio'). A different
    score: ``topro.json`` records it, so evaluation and serving score as trained."""
    verbalizer: str | None = None
    """Verbalizer name; ``None`` takes the task's default."""
    label_word_policy: Literal["strict", "first_subword"] = "strict"
    """How a label word that is several tokens is handled: ``strict`` (default,
    the paper's single-token verbalizers) raises, ``first_subword`` scores its
    first subword (first subwords must differ)."""
    data_dir: str | None = None
    """Folder with ``<task>/{train,dev}-<lang>.tsv``; default ``$TOPRO_DATA_DIR``."""
    train_lang: str = "en"
    """Language trained on and used for checkpoint selection (its dev split)."""
    max_train_sentences: int | None = None
    """Use only the first N training sentences (``None``: all)."""
    max_dev_sentences: int | None = None
    """Use only the first N English dev sentences for model selection."""
    eval_langs: list[str] = field(default_factory=list)
    """Languages evaluated zero-shot on the best checkpoint after training
    (``["all"]``: every language of the task with data)."""
    max_sentences: int | None = None
    """Use only the first N sentences of each evaluation language (the name ``evaluate`` and
    ``eval-llm`` use for the same setting)."""
    max_length: int = 128
    """Maximum tokens per model input; sentences are trimmed, prompts' questions never."""
    long_sentences: Literal["window", "truncate"] = "window"
    """Vanilla and Prompt-Tuning, for a sentence longer than ``max_length``: ``window`` encodes it in
    overlapping windows and labels each word in the window where it has most context (every word is
    predicted, as with ToPro); ``truncate`` cuts it off (later words count as wrong, ``n_truncated_words``)."""
    window_stride: int | None = None
    """Tokens shared by consecutive windows of a long sentence (``None``: half of ``max_length``)."""
    max_tokens_per_batch: int = 4096
    """Token budget of one training micro-batch (padded length x examples); evaluation has its own,
    ``eval_max_tokens_per_batch``."""
    eval_max_tokens_per_batch: int | None = None
    """Token budget of one evaluation forward: the English dev evaluations during training and the
    ``eval_langs`` run after it (``None``: twice ``max_tokens_per_batch`` for dev, 8192 for ``eval_langs``).
    It sets speed and memory only; scores agree up to float rounding."""
    batch_size: int = 32
    """Most examples in one micro-batch (prompts for ToPro, sentences for vanilla)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step on each worker."""
    learning_rate: float = 2e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps with linear warm-up (the paper used none)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    epochs: int = 3
    """Passes over the training set (``rosprompt`` also takes 0: no training, the prompt as initialised is
    scored and exported, i.e. NPPrompt-style zero-shot prompting)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (``None``: run all epochs)."""
    eval_every_steps: int | None = None
    """Also evaluate English dev every N optimizer steps (``None``: once per epoch)."""
    evals_per_epoch: int | None = None
    """Evaluate English dev N times per epoch at evenly spaced steps, the last at the epoch's end
    (``None``: once per epoch). Unlike ``eval_every_steps`` it gives methods with very different step
    counts (vanilla: one example per sentence, ToPro: one per word) the same number of checkpoints to
    select or average from; not together with ``eval_every_steps``."""
    patience: int = 3
    """Early stopping: evaluations without dev gain before training stops."""
    seed: int = 42
    """Seed for initialisation, shuffling and dropout."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Compute precision (bf16 autocast where supported); evaluation also takes ``EVAL_DTYPES``."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for single-process runs (``auto``: CUDA when present)."""
    num_threads: int | None = None
    """torch intra-op threads (``None``: torch's default)."""
    viterbi: bool = True
    """For IOB2 tasks, also report scores of the Viterbi-decoded valid sequence."""
    selection: Literal["best", "average_last_k", "average_top_k"] = "best"
    """Which weights are exported: the ``best`` English-dev checkpoint, or the average of the weights of the
    last ``k`` (``average_last_k``) or the best ``k`` (``average_top_k``) English-dev checkpoints
    (Schmidt et al. 2023). Single process, DDP and DeepSpeed ZeRO-0/1/2; not ZeRO-3."""
    k: int = 3
    """Checkpoints averaged by ``selection: average_last_k | average_top_k`` (at most the run's evaluations)."""
    selection_metric: str | None = None
    """English dev score that selects the checkpoint (and ranks sweep trials); ``None``: the task's headline
    (``accuracy`` for UDPOS, ``f1`` = seqeval default-mode span F1 for PAN-X). PAN-X also takes ``f1_strict``,
    ``viterbi_f1`` or ``accuracy``; UDPOS ``xtreme_seqeval_f1``. Named in ``metrics.json``, MLflow and the report."""
    output_dir: str = "outputs/run"
    """Run folder: ``checkpoint/`` (a link to the current ``checkpoint.vN/``), ``metrics.json``, ``eval.json``,
    and while a local run is unfinished ``state/`` (what rerunning the same command resumes from)."""
    shutdown_grace_s: float = 20.0
    """SIGTERM/SIGINT on the local loop: the current step is finished or abandoned and a resumable state
    written to ``output_dir/state/``; a save that ends later than this many seconds after the signal is
    logged as late (Kubernetes kills after its ``terminationGracePeriodSeconds``, 30 s by default; the
    KubeRay manifests set it to this plus a margin). The exit status is 128 + the signal."""
    save_state_every_steps: int | None = None
    """Local loop: also write the resumable state ``output_dir/state/`` every this many optimizer steps (it
    survives a SIGKILL or a crash; ``None``: only on SIGTERM/SIGINT). It holds model, optimizer, scheduler
    and every RNG state (about 3x the model's size) and is removed when the run finishes."""
    progress: bool = True
    """Show progress bars (``false`` silences every bar, model loading included)."""
    progress_every_s: float = 10.0
    """Without bars (``progress: false``, and in Ray Train workers and sweep trials), log one line
    ``epoch, step, loss, examples/s`` at the first optimizer step and then every this many seconds
    (0: never)."""
    freeze_embeddings: bool | None = None
    """Keep the input word-embedding matrix fixed. ``None`` (auto): frozen for pretrained models, trained
    for the randomly initialised ``tiny``. Freezing it keeps English fine-tuning from moving English
    token vectors away from the other languages' (Wu & Dredze 2019; Artetxe et al. 2020), and with a
    250k-word vocabulary (XLM-R, e5) it is most of the work of a step: measured 3.7x faster ToPro
    steps for multilingual-e5-small on 2 CPU cores (benchmarks/topro_training_speed.py)."""
    unseen_labels: list[str] = field(default_factory=list)
    """Generalized zero-shot: labels held out of training, for IOB2 tasks also entity types (``LOC`` =
    ``B-LOC`` + ``I-LOC``). Their label words leave the training softmax, their gold words carry no loss,
    and English-dev selection scores the seen labels only; evaluation scores the full label set and also
    reports seen / unseen / harmonic-mean scores per language. Label-word methods only (``topro`` on masked
    LMs, ``topro_soft``, ``rosprompt``): a classification head has no trained row for a label it never saw.
    Checked against the task's labels before anything starts; at least two labels must stay seen."""
    # Method-specific settings (ignored by methods that do not use them).
    prefix_length: int = 16
    """Prompt-Tuning / soft ToPro: number of trainable prompt vectors."""
    prefix_dropout: float = 0.1
    """Prompt-Tuning: dropout on the prefix key/values."""
    freeze_backbone: bool = True
    """Soft ToPro: keep the backbone frozen and train only the prompt vectors (``false``: fine-tune both).
    Prompt-Tuning always freezes it."""
    soft_prompt_placement: Literal["replace", "prefix"] = "replace"
    """Soft ToPro: ``replace`` the template's text by the ``prefix_length`` soft vectors (split over its
    text spans, word and mask kept in place), or put them in front of the hand-written question (``prefix``)."""
    prompt_packing: Literal["per_word", "sentence"] = "per_word"
    """ToPro / soft ToPro on masked LMs, ToPro on causal LMs: ``per_word`` is the paper's one prompt per word
    (each holding the whole sentence); ``sentence`` packs a sentence's questions into one input with a block attention mask
    (the sentence sees only itself, each question the sentence and itself, at its single-prompt positions),
    so a sentence costs about sentence + n x question tokens instead of n x (sentence + question). A
    different computation on a masked LM: a checkpoint is trained and served in one mode (``topro.json``
    records it). On a causal LM each question sees the sentence before it either way: the same scores.
    ``batch_size`` counts questions in both modes."""
    max_packed_length: int = 512
    """``prompt_packing: sentence``: most tokens in one packed row (a longer sentence is split over rows,
    each with its own sentence window); every question still sees at most ``max_length`` positions."""
    packed_word_bias: float = 0.0
    """``prompt_packing: sentence``: added to each question token's attention scores at the sentence
    tokens of the word it asks about, in every layer and head. In a per-word prompt the sentence reads the
    question and so knows which word is asked; a packed sentence cannot, and this points the question at its
    word instead. 0 (the default): plain block attention."""
    label_subword: Literal["auto", "first", "last"] = "auto"
    """Vanilla and Prompt-Tuning: which subword's hidden state labels a word. ``auto``: ``last`` for
    decoder-only LMs (a causal model's state at a position has read only what lies to its left, so only
    the last subword has read the whole word), ``first`` for encoders (XTREME's convention)."""
    adapter: Literal["none", "lora"] = "none"
    """``lora``: freeze the backbone's pretrained weights and train low-rank adapters on it (LoRA, Hu et al.
    2021, through PEFT) plus the parts the pretrained checkpoint lacks (a classification head) and anything
    outside the backbone (a soft prompt). The checkpoint then holds only those tensors and finds its backbone
    by fingerprint; ``topro export --merge`` writes a full one. Any method that trains its backbone (not
    ``prompt_tuning``, nor ``topro_soft`` or ``rosprompt`` with ``freeze_backbone``)."""
    lora_r: int = 8
    """LoRA rank (at least 1; 4 to 64 usual)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the update is ``lora_alpha / lora_r x B A`` (positive; commonly 2 x ``lora_r``)."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input, in [0, 1)."""
    lora_targets: list[str] | None = None
    """Names of the modules that get adapters, matched against the end of each module's dotted name
    (``[q_proj, v_proj]``, ``[query, value]``), or ``[all-linear]``. ``None``: PEFT's default for the
    architecture (attention query and value; every linear layer where it has none). A name matching no
    module is refused before training."""
    gradient_checkpointing: bool = False
    """Recompute each transformer layer's activations in the backward pass instead of keeping them: less
    memory, about a third more compute. Any backbone (its Hugging Face model's ``gradient_checkpointing_enable``)."""
    shots_per_label: int | None = None
    """Few-shot training: a seeded sampler (``seed``) takes English training sentences in a shuffled order,
    keeping each one that labels a word of a seen label still short of K, until every seen label has at
    least K labelled words (the pool: the first ``max_train_sentences``, or all). Refused, naming how many
    words of each short label it found, when the data holds fewer. ``None``: every sentence."""
    # RoSPrompt (method: rosprompt); its formulas are in methods/rosprompt.py and the README.
    verbalizer_expansion: Literal["none", "knn"] = "none"
    """RoSPrompt: ``none`` scores each label's seed words (a verbalizer's YAML list gives several, in several
    languages); ``knn`` (NPPrompt) scores the ``knn_k`` vocabulary tokens nearest (cosine, input embeddings)
    to the label's seed words. The chosen words are written to ``topro.json`` and shown by ``topro evaluate``."""
    knn_k: int = 8
    """RoSPrompt ``verbalizer_expansion: knn``: tokens per label (at most the vocabulary less special tokens)."""
    knn_aggregate: Literal["mean", "max", "logsumexp"] = "mean"
    """RoSPrompt: a label's score from its words' MLM logits: their ``mean``, ``max`` or ``logsumexp`` (minus
    log of their number: the log of their mean probability)."""
    label_smoothing: float = 0.0
    """RoSPrompt: probability mass eps moved from the gold label to the other seen labels (0: plain
    cross-entropy)."""
    label_smoothing_kind: Literal["uniform", "contrastive"] = "contrastive"
    """RoSPrompt: ``uniform`` spreads eps evenly; ``contrastive`` in proportion to
    ``exp(cos(label, gold) / label_smoothing_temperature)`` over the labels' mean word embeddings."""
    label_smoothing_temperature: float = 0.1
    """RoSPrompt contrastive smoothing: temperature of the softmax over label similarities (smaller: the mass
    goes to the nearest labels)."""
    prompt_drift_penalty: float = 0.0
    """RoSPrompt robustness penalty weight lambda: adds ``lambda * ||P - P0||^2 / ||P0||^2``, the soft prompt's
    squared drift from its initialisation relative to that initialisation's squared norm (0: off)."""
    # Scale-out (used by the Ray layer).
    workers: int = 1
    """Ray Train workers (1 runs in-process without Ray unless ``strategy`` says otherwise).
    The global batch does not change with it: each optimizer step sees
    ``batch_size`` x ``grad_accum`` examples, split across the workers."""
    strategy: Literal["local", "ddp", "deepspeed"] = "local"
    """``local``: single process, no Ray (with ``workers`` > 1 it means ``ddp``);
    ``ddp`` or ``deepspeed``: Ray Train workers."""
    deepspeed_config: str | None = "configs/deepspeed/zero2.yaml"
    """DeepSpeed JSON/YAML config used when ``strategy: deepspeed``: a path (relative to
    the working directory or the repository) or a bare name such as ``zero3``;
    its ``auto`` values are filled from this config."""
    use_gpu: bool = False
    """Give each Ray Train worker a GPU."""
    cpus_per_worker: float = 1.0
    """CPUs reserved by each Ray Train worker."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers on a cluster's nodes: ``PACK`` fills as few nodes as possible,
    ``SPREAD`` puts them on different nodes where it can (``STRICT_*``: must)."""
    max_failures: int = 2
    """Ray Train restarts of the worker group after a worker dies."""
    fault_step: int | None = None
    """Testing aid: the rank-1 (or only) worker kills itself at this optimizer
    step in the first attempt, to exercise fault tolerance."""
    fault_node: str | None = None
    """Testing aid, with ``fault_step``: the worker killed is the (first) one on the Ray node of this
    name (``ray start --node-name``) instead of rank 1."""
    run_name: str | None = None
    """Name of the Ray Train run (defaults to the output folder's name)."""
    storage_path: str | None = None
    """Ray Train storage for checkpoints (default: ``<output_dir>/ray``): a local folder on one node; on a
    multi-node cluster a folder every node mounts at the same path, or an object-store URI that pyarrow
    opens (``s3://bucket/prefix``). Checked from every node before training starts."""
    keep_checkpoints: int = 1
    """Ray Train checkpoints kept, best first (the best holds the export); the latest is always kept too."""

    def dev_max_tokens_per_batch(self) -> int:
        """The English dev evaluations' token budget: ``eval_max_tokens_per_batch``, else twice the training
        budget (an evaluation keeps no activations for a backward pass)."""
        if self.eval_max_tokens_per_batch is not None:
            return self.eval_max_tokens_per_batch
        return self.max_tokens_per_batch * 2

    def eval_langs_max_tokens_per_batch(self) -> int:
        """The ``eval_langs`` run's token budget: ``eval_max_tokens_per_batch``, else evaluation's default."""
        if self.eval_max_tokens_per_batch is not None:
            return self.eval_max_tokens_per_batch
        return EVALUATION_MAX_TOKENS_PER_BATCH

    def problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong) for every value no run could use; checked whenever a config is loaded."""
        both = ([("evals_per_epoch", "set either evals_per_epoch or eval_every_steps, not both")]
                if self.evals_per_epoch and self.eval_every_steps else [])
        return (check_ranges(self, TRAIN_RANGES) + self._packing_problems() + self._adapter_problems() + both
                + self._unseen_problems() + self._rosprompt_problems())

    def _adapter_problems(self) -> list[tuple[str, str]]:
        if self.adapter == "none":
            return []
        if self.method == "prompt_tuning" or (self.method in ("topro_soft", "rosprompt") and self.freeze_backbone):
            why = " with freeze_backbone: true" if self.method != "prompt_tuning" else ""
            return [("adapter", f"adapter: lora needs a method that trains its backbone; method {self.method!r}"
                                f"{why} trains only a prompt on a frozen one (use adapter: none)")]
        if self.lora_targets is not None and not self.lora_targets:
            return [("lora_targets", "give at least one module name, or null for the architecture's default")]
        return []

    def _rosprompt_problems(self) -> list[tuple[str, str]]:
        lowest = 0 if method_entry(self.method).zero_step else 1  # epochs: 0 is zero-shot prompting
        message = _at_least(lowest)(self.epochs)
        if message:
            return [("epochs", message)]
        if self.method == "rosprompt":
            return []
        changed = [name for name, off in ROSPROMPT_OFF.items() if getattr(self, name) != off]
        return [(changed[0], f"applies to method 'rosprompt' only (method is {self.method!r})")] if changed else []

    def _unseen_problems(self) -> list[tuple[str, str]]:
        if self.unseen_labels and not method_entry(self.method).unseen_labels:
            return [("unseen_labels", f"method {self.method!r} labels words with a classification head, which has "
                                      "no trained output row for a label never seen in training (it could only "
                                      "score 0 on it); use a label-word method: "
                                      f"{', '.join(n for n, e in METHOD_REGISTRY.items() if e.unseen_labels)}")]
        return []

    def _packing_problems(self) -> list[tuple[str, str]]:
        if self.prompt_packing != "per_word" and not method_entry(self.method).packable:
            return [("prompt_packing", f"method {self.method!r} cannot pack prompts ({self.prompt_packing!r}); "
                                       f"only {packable_methods()} (on masked or causal LMs) can")]
        if self.prompt_packing == "sentence" and self.max_packed_length < self.max_length:
            return [("max_packed_length", f"must be at least max_length={self.max_length}, "
                                          f"got {self.max_packed_length}")]
        if self.packed_word_bias and self.prompt_packing != "sentence":
            return [("packed_word_bias", "applies to packed questions only; set prompt_packing: sentence "
                                         f"(got {self.prompt_packing!r})")]
        return []


ROSPROMPT_OFF = {"verbalizer_expansion": "none", "label_smoothing": 0.0, "prompt_drift_penalty": 0.0}
"""RoSPrompt's settings at their "off" values; another method refuses any other value."""


def _at_least(lo: float, optional: bool = False):
    def check(value):
        if value is None and optional:
            return None
        if value is None or not value >= lo:  # also catches nan
            return f"must be at least {lo:g}{' (or null)' if optional else ''}, got {value!r}"
        return None
    return check


def _positive(value):
    if value is None or not math.isfinite(value) or value <= 0:
        return f"must be a positive finite number, got {value!r}"
    return None


def _fraction(value):
    if value is None or not 0 <= value < 1:
        return f"must be in [0, 1), got {value!r}"
    return None


def _finite_non_negative(value):
    if value is None or not math.isfinite(value) or value < 0:
        return f"must be a finite number >= 0, got {value!r}"
    return None


TRAIN_RANGES: dict[str, Any] = {
    "grad_accum": _at_least(1), "batch_size": _at_least(1),
    "max_tokens_per_batch": _at_least(1), "eval_max_tokens_per_batch": _at_least(1, optional=True),
    "max_length": _at_least(8), "patience": _at_least(1),
    "workers": _at_least(1), "keep_checkpoints": _at_least(1), "max_failures": _at_least(0),
    "prefix_length": _at_least(1),
    "max_steps": _at_least(1, optional=True), "eval_every_steps": _at_least(1, optional=True),
    "evals_per_epoch": _at_least(1, optional=True),
    "max_train_sentences": _at_least(1, optional=True), "max_dev_sentences": _at_least(1, optional=True),
    "max_sentences": _at_least(1, optional=True), "num_threads": _at_least(1, optional=True),
    "shots_per_label": _at_least(1, optional=True), "knn_k": _at_least(1),
    "label_smoothing": _fraction, "label_smoothing_temperature": _positive,
    "prompt_drift_penalty": _finite_non_negative,
    "learning_rate": _positive, "adam_eps": _positive, "cpus_per_worker": _positive,
    "weight_decay": _finite_non_negative, "max_grad_norm": _finite_non_negative,
    "progress_every_s": _finite_non_negative, "shutdown_grace_s": _finite_non_negative,
    "save_state_every_steps": _at_least(1, optional=True), "packed_word_bias": _finite_non_negative,
    "warmup_ratio": _fraction, "prefix_dropout": _fraction,
    "lora_r": _at_least(1), "lora_alpha": _positive, "lora_dropout": _fraction,
}


def check_ranges(cfg: Any, ranges: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for name, check in ranges.items():
        message = check(getattr(cfg, name))
        if message:
            out.append((name, message))
    return out


T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert benign cases (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):  # "de,fr" on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config",
              sources: dict[str, str] | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ``ConfigError``.

    ``sources`` names where a key came from when it was not ``where`` (``"command line"`` for an
    override), so the message points at what the user typed. A key listed in the class's ``RENAMED_KEYS``
    (old name -> new name, a plain class attribute) is refused with its new name. A class with a ``problems()`` method
    has its values checked too (a value of the right type that no run could use, e.g. ``epochs=0``).
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    sources = sources or {}
    renamed = getattr(cls, "RENAMED_KEYS", {})
    kwargs = {}
    for key, value in data.items():
        at = sources.get(key, where)
        if key in renamed:  # an old name: refused, naming the new one (never silently taken)
            raise ConfigError(f"{at}: key {key!r} is now called {renamed[key]!r}")
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{at}: unknown key {key!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{at}: field {key!r}")
    obj = cls(**kwargs)
    for name, message in getattr(obj, "problems", lambda: [])():
        raise ConfigError(f"{sources.get(name, where)}: field {name!r}: {message}")
    return obj


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b": {"c": "x"}}``; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: {err}") from err
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


COMMAND_LINE = "command line"


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                **extra: Any) -> T:
    """Load ``cls`` from a YAML file, then apply ``key=value`` overrides and keyword extras.

    An error names the file for keys from the file and the command line for overrides and extras.
    """
    data = read_yaml(path) if path else {}
    where = str(path) if path else "config"
    parsed = parse_overrides(overrides or [])
    given = {k: v for k, v in extra.items() if v is not None}
    sources = {key: COMMAND_LINE for key in [*parsed, *given]}
    data = deep_merge(data, parsed)
    data = deep_merge(data, given)
    return from_dict(cls, data, where, sources)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def replace(cfg: T, **changes: Any) -> T:
    """A validated copy of ``cfg`` with ``changes`` applied."""
    return from_dict(type(cfg), {**to_dict(cfg), **changes}, type(cfg).__name__)
