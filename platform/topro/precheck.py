"""Checks that run before any work starts: before Ray starts, a model loads or a folder is written.

``train``, ``evaluate``, ``sweep`` and ``eval-llm`` call these first, so a mistake (a data folder that
is not there, a language without the split it needs, a model path or hub id that does not resolve,
an unknown method, template or verbalizer) costs seconds and leaves nothing behind, instead of
failing after the model was built or after the first languages were evaluated. Every failure is a
``ConfigError`` with a one-line message naming what to fix. Values of the right type that no run can
use (``epochs=0``, ``learning_rate=nan``) are refused by ``TrainConfig.problems`` when the config loads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from topro.config import ConfigError, TrainConfig
from topro.data.loading import DATA_DIR_ENV, hub_offline, resolve_data_dir, split_path
from topro.data.tasks import Task, get_task
from topro.method_registry import METHOD_REGISTRY, method_names
from topro.models import TINY
from topro.sweep_config import checked_combinations, trial_train_config



def data_root(task: Task, data_dir: str | None) -> Path | None:
    """The local data folder for ``task``, checked; ``None`` means the hub (only when it is reachable)."""
    root = resolve_data_dir(data_dir)
    given = "--data-dir" if data_dir else f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV) else "../shared"
    if root is None:
        if task.hub is None or hub_offline():
            why = "the Hugging Face hub is offline (HF_HUB_OFFLINE=1)" if task.hub else \
                f"task {task.name!r} has no hub source"
            raise ConfigError(f"no data folder given (none at ../shared/data/xtreme) and {why}: pass --data-dir or set {DATA_DIR_ENV} "
                              f"to a folder holding {task.name}/{{train,dev}}-<lang>.tsv")
        return None
    if not root.is_dir():
        raise ConfigError(f"data folder {str(root)!r} ({given}) does not exist")
    if not (root / task.name).is_dir():
        raise ConfigError(f"data folder {str(root)!r} ({given}) has no {task.name}/ folder "
                          f"(expected {root / task.name / task.file_pattern.format(split='train', lang='en')})")
    return root


def check_languages(task: str | Task, needs: dict[str, Iterable[str]], data_dir: str | None,
                    what: str = "languages") -> None:
    """Every ``lang -> splits`` in ``needs`` has its files (a language of the task, with data)."""
    task = get_task(task)
    root = data_root(task, data_dir)
    unknown = [lang for lang in needs if lang not in task.languages]
    if unknown:
        raise ConfigError(f"{what}: {unknown} {'is not a language' if len(unknown) == 1 else 'are not languages'} "
                          f"of task {task.name!r}; its languages: {','.join(task.languages)}")
    if root is None:
        return
    missing: dict[str, list[str]] = {}
    for lang, splits in needs.items():
        for split in splits:
            if not split_path(task, lang, split, root).is_file():
                missing.setdefault(split, []).append(lang)
    if missing and task.hub is not None and not hub_offline():
        return  # load_split takes what the folder lacks from the hub, or names the file it looked for
    if missing:
        split, langs = next(iter(missing.items()))
        have = [lang for lang in task.languages if split_path(task, lang, split, root).is_file()]
        raise ConfigError(f"{what}: no {split} split for {','.join(langs)} of task {task.name!r} in "
                          f"{root / task.name}; languages with a {split} split: {','.join(have) or 'none'}")


def expand_languages(task: str | Task, langs: list[str] | str, split: str, data_dir: str | None) -> list[str]:
    """``all`` -> every language of the task with ``split`` data (refused when that is none); else as given."""
    task = get_task(task)
    if isinstance(langs, str):
        langs = [x.strip() for x in langs.split(",") if x.strip()]
    if langs != ["all"]:
        return list(langs)
    root = data_root(task, data_dir)
    if root is None:
        return list(task.languages)
    have = [lang for lang in task.languages if split_path(task, lang, split, root).is_file()]
    if not have:
        raise ConfigError(f"no language of task {task.name!r} has a {split} split in {root / task.name}")
    return have


def check_model(model: str, *, allow_url: bool = False, what: str = "model") -> None:
    """``model`` resolves: ``tiny``, a local model folder, or a hub id (cached, or found on the hub)."""
    if model == TINY:
        return
    if allow_url and model.startswith(("http://", "https://")):
        return
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{what} {model!r} is a file, not a model folder")
        if not (path / "config.json").is_file() and not (path / "topro.json").is_file():
            raise ConfigError(f"{what} {model!r}: the folder has no config.json (not a Hugging Face model folder)")
        return
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise ConfigError(f"{what} {model!r}: no such folder")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except HFValidationError:
        raise ConfigError(f"{what} {model!r}: no such folder, and not a valid Hugging Face hub id") from None
    if isinstance(cached, str):
        return
    if hub_offline():
        raise ConfigError(f"{what} {model!r}: no such folder, and not in the Hugging Face cache; the hub is "
                          f"not reachable (HF_HUB_OFFLINE=1): give a local folder or 'tiny'")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(model, timeout=10)
    except RepositoryNotFoundError:
        raise ConfigError(f"{what} {model!r}: no such folder, and the Hugging Face hub knows no such model "
                          f"(or it is private: log in with `hf auth login`)") from None
    except Exception as err:  # no network, proxy, timeout
        raise ConfigError(f"{what} {model!r}: no such folder, and the Hugging Face hub is not reachable "
                          f"({type(err).__name__}); give a local folder or 'tiny'") from None


def check_llm_classification(task: Task, fmt) -> None:
    """LLM evaluation of a ``kind: classification`` task asks one question per text: only a ``topro``-style
    format does (the ``sentence`` style has the model write a tag after every word)."""
    if task.kind == "classification" and fmt.style != "topro":
        raise ConfigError(f"format {fmt.name!r}: task {task.name!r} is a classification task (one label per "
                          f"text); it takes a topro-style format (one question per text), not {fmt.style!r}")


def check_classification(cfg: TrainConfig) -> None:
    """A ``kind: classification`` task: the method has a classification form (the registry's
    ``classification_cls``) and asks one question per text (no packing)."""
    if get_task(cfg.task).kind != "classification":
        return
    entry = METHOD_REGISTRY.get(cfg.method)
    if entry is not None and not entry.classification_cls:
        takes = [n for n, e in METHOD_REGISTRY.items() if e.classification_cls]
        raise ConfigError(f"method {cfg.method!r} has no classification form; task {cfg.task!r} "
                          f"(one label per text) takes {', '.join(takes)}")
    if cfg.prompt_packing != "per_word":
        raise ConfigError(f"prompt_packing={cfg.prompt_packing!r}: task {cfg.task!r} asks one question per text, "
                          f"so there is nothing to pack; use per_word")


def check_names(cfg: TrainConfig) -> None:
    """Task, selection metric, method, template and verbalizer exist (what was found only after building the model)."""
    from topro.prompts import get_template, get_verbalizer

    if cfg.selection_metric is not None:  # topro.metrics imports seqeval (and sklearn): seconds on a busy box
        from topro.metrics import resolve_selection_metric

        resolve_selection_metric(get_task(cfg.task), cfg.selection_metric)
    if cfg.method not in METHOD_REGISTRY:  # register_method adds third-party methods to it
        raise ConfigError(f"unknown method {cfg.method!r}; known methods: {', '.join(sorted(method_names()))}")
    get_template(cfg.task, cfg.template)
    get_verbalizer(cfg.task, cfg.verbalizer)
    from topro.unseen import expand_unseen_labels

    expand_unseen_labels(cfg.task, cfg.unseen_labels)
    check_classification(cfg)
    if cfg.method == "topro" and cfg.llm_format != "topro":
        from topro.prompts.formats import FormatError, load_format

        try:
            load_format(cfg.llm_format).for_task(get_task(cfg.task).name)
        except (FormatError, OSError) as err:
            raise ConfigError(f"llm_format: {err}") from None


def check_train(cfg: TrainConfig, eval_split: str = "dev") -> None:
    """Everything ``topro train`` needs, before it starts: names, data of every language, the model."""
    check_names(cfg)
    check_languages(cfg.task, {cfg.train_lang: ["train", "dev"]}, cfg.data_dir, "train_lang")
    if cfg.eval_langs:
        langs = expand_languages(cfg.task, cfg.eval_langs, eval_split, cfg.data_dir)
        check_languages(cfg.task, {lang: [eval_split] for lang in langs}, cfg.data_dir, "eval_langs")
    check_model(cfg.model)
    check_backbone(cfg)
    check_lora_targets(cfg)
    check_shots(cfg)
    check_knn_k(cfg)


def check_shots(cfg: TrainConfig) -> None:
    """``shots_per_label``: the English training data gives every seen label that many words (the same
    seeded sample training takes; reading the split costs about a second)."""
    if cfg.shots_per_label is None:
        return
    from topro.data import load_split
    from topro.data.sampling import few_shot_sentences
    from topro.unseen import expand_unseen_labels

    task = get_task(cfg.task)
    unseen = set(expand_unseen_labels(task, cfg.unseen_labels))
    sentences = load_split(task, cfg.train_lang, "train", cfg.data_dir, limit=cfg.max_train_sentences)
    few_shot_sentences(sentences, [label for label in task.labels if label not in unseen], cfg.shots_per_label,
                       cfg.seed)


def check_knn_k(cfg: TrainConfig) -> None:
    """``knn_k`` at most the vocabulary, where the model's ``config.json`` is at hand without building anything
    (a local folder, the hub cache, an already built ``tiny``); otherwise the method refuses it when the
    model loads, still before training."""
    if cfg.method != "rosprompt" or cfg.verbalizer_expansion != "knn":
        return
    config = _local_model_config(cfg)
    vocab = (config or {}).get("vocab_size")
    if isinstance(vocab, int) and cfg.knn_k > vocab:
        raise ConfigError(f"field 'knn_k': {cfg.knn_k} is more than the {vocab} tokens of {cfg.model!r}'s vocabulary")


def _local_model_config(cfg: TrainConfig) -> dict | None:
    if cfg.model == TINY:
        from topro.models import tiny_model_dir, tiny_vocabulary_words

        folder = tiny_model_dir(cfg.task, cfg.data_dir, tiny_vocabulary_words(cfg.task))
    else:
        folder = Path(cfg.model).expanduser()
        if not folder.is_dir():
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(cfg.model, "config.json")
            except Exception:
                return None
            folder = Path(cached).parent if isinstance(cached, str) else None
    path = folder / "config.json" if folder else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


ADAPTABLE_LAYERS = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv1D")
"""Layer classes PEFT's LoRA can adapt (``Conv1D``: GPT-2's linear layer)."""


def adaptable_module_names(model: str) -> list[str]:
    """Dotted names of the layers LoRA could adapt in ``model``'s backbone, read off the architecture built
    on the meta device from its config (no weights are loaded)."""
    import torch
    from transformers import AutoConfig, AutoModel, BertConfig

    if model == TINY:  # the built-in tiny model is a BERT (topro.models.build_tiny_model); names need no sizes
        config = BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=16)
    else:
        config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        backbone = AutoModel.from_config(config)
    return [name for name, module in backbone.named_modules() if type(module).__name__ in ADAPTABLE_LAYERS]


def check_lora_targets(cfg: TrainConfig) -> None:
    """``adapter: lora``: every name in ``lora_targets`` matches a layer of the backbone (as PEFT matches: the
    whole dotted name or its end)."""
    if cfg.adapter != "lora" or not cfg.lora_targets or list(cfg.lora_targets) == ["all-linear"]:
        return
    names = adaptable_module_names(cfg.model)
    missing = [t for t in cfg.lora_targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        known = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"lora_targets: {missing} match no linear, embedding or convolution layer of model "
                          f"{cfg.model!r}; its layer names: {', '.join(known)} (or [all-linear])")


def check_backbone(cfg: TrainConfig) -> None:
    """The method has a class for the backbone's kind (``method_registry``), a label-word method's ``model``
    has an LM head it can score label words with (masked, causal or seq2seq), and a causal LM's positions
    hold ``max_length``: all read from the model's config, before any weights load or Ray starts."""
    if cfg.model == TINY:
        return
    from transformers import AutoConfig

    from topro.method_registry import method_entry, methods_for
    from topro.models import model_kind

    entry = method_entry(cfg.method)
    try:
        kind = model_kind(cfg.model)
        config = AutoConfig.from_pretrained(cfg.model)
    except ValueError as err:
        if entry.head == "pretrained_mlm":
            raise ConfigError(str(err)) from None
        return  # no LM head: a method with a new head takes the bare encoder
    except OSError:
        return  # a hub id not cached here: the model's own load says what is wrong
    if not entry.runs_on(kind):
        raise ConfigError(f"method {cfg.method!r} has no implementation for {kind} LMs ({config.model_type}, "
                          f"model {cfg.model!r}); the methods that run on {kind} LMs: {', '.join(methods_for(kind))}")
    if get_task(cfg.task).kind == "classification" and kind != "masked":
        raise ConfigError(f"task {cfg.task!r} is a classification task: its methods run on masked LMs only so far; "
                          f"model {cfg.model!r} is a {kind} LM ({config.model_type})")
    if kind == "causal" and cfg.prompt_packing != "per_word":
        from topro.llm.scoring import takes_tree_masks

        if not takes_tree_masks(config):
            raise ConfigError(f"prompt_packing={cfg.prompt_packing!r}: model {cfg.model!r} ({config.model_type}) "
                              "takes ALiBi position biases from a 2-D padding mask, which cannot hold a packed "
                              "row's questions; use prompt_packing=per_word")
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if kind == "causal" and limit and cfg.max_length > limit:
        raise ConfigError(f"max_length={cfg.max_length} exceeds the {limit} positions of {cfg.model}; "
                          f"set max_length <= {limit}")


def checkpoint_meta(checkpoint: str | Path) -> dict:
    """The ``topro.json`` of a checkpoint folder, or a one-line error naming what is missing."""
    folder = Path(checkpoint).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"checkpoint {str(checkpoint)!r}: no such folder")
    meta = folder / "topro.json"
    if not meta.is_file():
        raise ConfigError(f"checkpoint {str(checkpoint)!r}: no topro.json in it (not a folder `topro train` wrote; "
                          f"it writes RUN/checkpoint/)")
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{meta}: not valid JSON ({err})") from None


def _evaluation_languages(task, langs, split: str, data_dir: str | None, max_sentences: int | None) -> list[str]:
    """``--max-sentences`` and ``--langs`` as ``evaluate`` and ``eval-llm`` take them: the languages, each
    with its ``split`` at hand."""
    if max_sentences is not None and max_sentences < 1:
        raise ConfigError(f"--max-sentences must be at least 1, got {max_sentences}")
    languages = expand_languages(task, langs, split, data_dir)
    if not languages:
        raise ConfigError("--langs: no languages given")
    check_languages(task, {lang: [split] for lang in languages}, data_dir, "--langs")
    return languages


def check_evaluate(checkpoint: str | Path, langs: list[str] | str, *, task: str | None, split: str,
                   data_dir: str | None, max_sentences: int | None = None) -> list[str]:
    """What ``topro evaluate`` needs; returns the languages it will evaluate."""
    meta = checkpoint_meta(checkpoint)
    task_name = task or meta.get("task")
    if task and meta.get("task") and task != meta["task"]:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} was trained for task {meta['task']!r}, not {task!r}")
    return _evaluation_languages(task_name, langs, split, data_dir, max_sentences)


def check_trial_names(train: TrainConfig, where: str) -> None:
    """Look up what a trial needs by name (task, method, template, verbalizer, model folder)."""
    try:
        check_names(train)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    model = train.model
    if model != TINY and model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        raise ConfigError(f"{where}: model folder {model!r} does not exist")


def check_sweep_names(sweep) -> None:
    """The names of the base and of every combination of the discrete search space (up to
    ``sweep_config.MAX_CHECKED_COMBINATIONS``) exist."""
    check_trial_names(trial_train_config(sweep, {}), f"{sweep.name}: base")
    for params in checked_combinations(sweep):
        check_trial_names(trial_train_config(sweep, params), f"{sweep.name}: search_space combination {params}")


def check_sweep(sweep) -> None:
    """A sweep's names, data and models, once on the driver (its keys and values were checked when it loaded)."""
    check_sweep_names(sweep)
    eval_langs = sweep.eval_langs if sweep.eval_langs is not None else (sweep.base.get("eval_langs") or ["all"])
    def searched(field: str) -> list:
        space = sweep.search_space.get(field, {})
        return list(space.get("grid", []) or space.get("choice", [])) or [sweep.base[field]]

    tasks, models = searched("task"), searched("model")
    for task in dict.fromkeys(tasks):
        train = trial_train_config(sweep, {"task": task, "model": models[0]}, eval_langs=eval_langs)
        check_train(train, eval_split=sweep.eval_split)
    for model in dict.fromkeys(models[1:]):
        check_model(model)
    adapters = sweep.search_space.get("adapter", {})
    adapters = list(adapters.get("grid", []) or adapters.get("choice", [])) or [sweep.base.get("adapter", "none")]
    targets = sweep.base.get("lora_targets")
    if targets and "lora" in adapters:  # the targets must name layers of every searched model
        for model in dict.fromkeys(models):
            check_lora_targets(TrainConfig(model=model, adapter="lora", lora_targets=list(targets)))


def check_llm(*, task: str, model: str, format: str, langs: list[str] | str, split: str = "dev",
              data_dir: str | None = None, verbalizer: str | None = None, shots: int = 0,
              max_sentences: int | None = None, demo_lang: str = "en", demo_split: str = "train") -> list[str]:
    """What ``topro eval-llm`` needs, without importing torch; returns the languages it will evaluate."""
    from topro.prompts.formats import load_format

    task = get_task(task)
    try:
        fmt = load_format(format)
        check_llm_classification(task, fmt)
        fmt.for_task(task.name)
    except ValueError as err:
        raise ConfigError(f"--format: {err}") from None
    if fmt.label_words != "tags":
        from topro.prompts import get_verbalizer

        get_verbalizer(task.name, verbalizer or fmt.verbalizer)
    if shots < 0:
        raise ConfigError(f"--shots must be at least 0, got {shots}")
    languages = _evaluation_languages(task, langs, split, data_dir, max_sentences)
    if shots:
        check_languages(task, {demo_lang: [demo_split]}, data_dir, f"--shots {shots} (demonstrations)")
    check_model(model, allow_url=True, what="--model")
    return languages
