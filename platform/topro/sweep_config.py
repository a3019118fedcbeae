"""The sweep configuration: a base training config, a search space and what to do after training (Ray-free).

A sweep YAML looks like::

    name: demo
    base: configs/train/udpos-topro.yaml      # or a TrainConfig mapping
    search_space:
      method: {grid: [topro, vanilla]}
      learning_rate: {grid: [1e-3, 5e-4]}
      seed: {grid: [1]}
    eval_langs: all
    max_sentences: 100

Every search-space key must be a ``TrainConfig`` field and every value must be
valid for it: the whole space is checked (each discrete combination is built
as a ``TrainConfig`` and its task, method, template and verbalizer looked up)
before any trial starts, so a typo fails in a second, not after an hour.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from topro.config import (COMMAND_LINE, ConfigError, TrainConfig, check_ranges, deep_merge, from_dict,
                          parse_overrides, read_yaml, to_dict)
from topro.config import _at_least as at_least

DIMENSION_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
DISCRETE_KINDS = ("grid", "choice")
# Fields the sweep sets for each trial itself, or that belong to the sweep's own evaluation.
NOT_SEARCHABLE = {"output_dir", "run_name", "storage_path", "eval_langs", "max_sentences", "progress",
                  "data_dir"}


@dataclass
class SweepConfig:
    """One sweep: trials of a base training config over a search space, then zero-shot evaluation."""

    RENAMED_KEYS = {"max_eval_sentences": "max_sentences"}  # not a field: old names, refused with the new one

    name: str
    """Sweep name: the Tune experiment folder, the MLflow experiment and the ``topro report --sweep`` key."""
    base: dict[str, Any] | str = field(default_factory=dict)
    """The training config every trial starts from: a ``TrainConfig`` mapping, or the path of a train YAML
    (relative to the working directory, else to the sweep file)."""
    search_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``TrainConfig`` field -> one of ``{grid: [...]}``, ``{choice: [...]}``, ``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (``hi`` exclusive)."""
    seeds: list[int] | None = None
    """Seeds every setting runs under (the same as ``search_space: {seed: {grid: [...]}}``); settings are
    then selected on the mean English dev score over seeds, and the report shows mean ± std and a 95%
    interval over them."""
    search: Literal["grid", "random"] = "grid"
    """``grid``: every combination of the grids (``num_samples`` draws of the other dimensions each);
    ``random``: ``num_samples`` random draws, grids treated as choices."""
    num_samples: int = 1
    """Grid: repetitions of the grid; random: number of trials."""
    scheduler: Literal["fifo", "asha"] = "fifo"
    """``fifo`` runs every trial to the end; ``asha`` stops trials early on the English dev metric."""
    grace_period: int = 1
    """ASHA: evaluations a trial always gets before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: keep the top 1/reduction_factor of trials at each rung."""
    max_t: int | None = None
    """ASHA: most evaluations per trial (default: the largest ``epochs`` in the space times the largest
    ``evals_per_epoch``; set it when ``eval_every_steps`` adds evaluations)."""
    metric: str = "dev_score"
    """Tune metric (mode max). ``dev_score`` is the task's headline English dev metric, whatever the task."""
    select_over: list[str] = field(default_factory=lambda: ["learning_rate"])
    """Searched fields chosen on English dev (mean over seeds) for each compared setting; the other
    searched fields (except ``seed``) are what the report compares."""
    evaluate: Literal["selected", "all"] = "selected"
    """Which finished trials are evaluated on every language: the selected ones (all seeds of the chosen
    setting per compared group), or all."""
    eval_langs: list[str] | None = None
    """Languages evaluated zero-shot (``[all]``: every language of the task with data; default: the base
    config's ``eval_langs``, else all)."""
    max_sentences: int | None = None
    """First N sentences per evaluation language (default: the base config's ``max_sentences``)."""
    eval_split: str = "dev"
    """Split evaluated in each language (the XTREME data here ships train and dev)."""
    eval_max_tokens_per_batch: int | None = None
    """Padded tokens in one forward of the evaluation actors (default: the base's
    ``eval_max_tokens_per_batch``, else 8192). The base's ``max_tokens_per_batch`` is the training budget."""
    eval_workers: int | None = None
    """Parallel evaluation workers, each holding a model (default: what the cluster's CPUs allow)."""
    eval_cpus_per_worker: float = 1.0
    """CPUs (and torch threads) per evaluation worker."""
    max_concurrent_trials: int | None = None
    """Trials running at once (default: the cluster's CPUs / one trial's CPUs)."""
    driver_cpus: float = 0.1
    """CPUs reserved by each trial's driver (it only waits on its TorchTrainer; Tune refuses 0)."""
    max_failures: int = 0
    """Tune retries of a failed trial (Ray Train restarts workers itself, see ``max_failures`` of the base)."""
    storage_path: str = "outputs/sweeps"
    """Folder of Tune experiments (``<storage_path>/<name>``: resumable state, trial checkpoints)."""
    experiment: str | None = None
    """MLflow experiment (default: ``topro-sweep-<name>``)."""
    artifact_location: str | None = None
    """Where a new MLflow experiment keeps its artifacts (checkpoints, reports): a folder every node and
    serving replica reaches, or an object-store URI (``s3://bucket/mlflow``); default: the tracking
    store's own (a server's ``mlflow-artifacts:``, or ``./mlruns`` beside a SQLite store). Checked from
    every node of a multi-node cluster before the sweep starts."""
    register_alias: str | None = "champion"
    """Register the best checkpoint per task and method (English dev) with this alias; ``null``: don't."""

    def problems(self) -> list[tuple[str, str]]:
        return check_ranges(self, {"eval_max_tokens_per_batch": at_least(1, optional=True)})


def _searchable_fields() -> dict[str, Any]:
    return {k: v for k, v in typing.get_type_hints(TrainConfig).items() if k not in NOT_SEARCHABLE}


@dataclass(frozen=True)
class Dimension:
    """One searched field: a kind and its values (grid/choice) or bounds (ranges)."""

    field: str
    kind: str
    values: tuple[Any, ...]

    @property
    def discrete(self) -> bool:
        return self.kind in DISCRETE_KINDS


def parse_dimension(name: str, spec: Any, where: str) -> Dimension:
    """Validate one search-space entry against the ``TrainConfig`` field it names."""
    hints = _searchable_fields()
    where = f"{where}: search_space.{name}"
    if name not in hints:
        if name in NOT_SEARCHABLE:
            raise ConfigError(f"{where}: {name!r} is set by the sweep itself and cannot be searched")
        close = difflib.get_close_matches(name, list(hints), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: {name!r} is not a TrainConfig field{hint}")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DIMENSION_KINDS:
        raise ConfigError(f"{where}: expected one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [lo, hi]}}, "
                          f"{{loguniform: [lo, hi]}}, {{randint: [lo, hi]}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
    coerced = [from_dict(TrainConfig, {name: v}, f"{where}.{kind}[{i}]").__dict__[name]
               for i, v in enumerate(values)]
    if kind in DISCRETE_KINDS:
        if len({repr(v) for v in coerced}) != len(coerced):
            raise ConfigError(f"{where}.{kind}: repeated values in {values!r}")
        return Dimension(name, kind, tuple(coerced))
    if len(coerced) != 2:
        raise ConfigError(f"{where}.{kind}: expected [lo, hi], got {values!r}")
    lo, hi = coerced
    numeric = (int,) if kind == "randint" else (int, float)
    if not all(isinstance(v, numeric) and not isinstance(v, bool) for v in coerced):
        raise ConfigError(f"{where}.{kind}: field {name!r} is not {'an integer' if kind == 'randint' else 'numeric'}")
    if not lo < hi:
        raise ConfigError(f"{where}.{kind}: lo must be below hi, got {values!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}.{kind}: bounds must be positive, got {values!r}")
    return Dimension(name, kind, (lo, hi))


def dimensions(cfg: SweepConfig) -> list[Dimension]:
    return [parse_dimension(k, v, cfg.name) for k, v in cfg.search_space.items()]


def base_train_dict(cfg: SweepConfig) -> dict[str, Any]:
    """The base as a plain mapping (already loaded from its file by ``load_sweep_config``)."""
    if not isinstance(cfg.base, dict):
        raise ConfigError(f"sweep {cfg.name!r}: base {cfg.base!r} was not loaded")
    return dict(cfg.base)


def trial_train_config(cfg: SweepConfig, params: dict[str, Any], **fixed: Any) -> TrainConfig:
    """The ``TrainConfig`` of one trial: base, then the sampled ``params``, then ``fixed`` (output folders...)."""
    data = {**base_train_dict(cfg), **params, **fixed}
    return from_dict(TrainConfig, data, f"sweep {cfg.name!r} trial {params}")


def evaluation_max_tokens_per_batch(cfg: SweepConfig) -> int:
    """The evaluation actors' token budget: the sweep's ``eval_max_tokens_per_batch``, else the base's
    ``eval_langs`` budget (its ``eval_max_tokens_per_batch``, else 8192)."""
    if cfg.eval_max_tokens_per_batch is not None:
        return cfg.eval_max_tokens_per_batch
    return trial_train_config(cfg, {}).eval_langs_max_tokens_per_batch()


MAX_CHECKED_COMBINATIONS = 10_000


def checked_combinations(cfg: SweepConfig) -> Iterator[dict[str, Any]]:
    """The parameters of every combination of the discrete dimensions (at most ``MAX_CHECKED_COMBINATIONS``),
    continuous dimensions at their lower bound: what loading and the pre-check try before any trial runs."""
    dims = dimensions(cfg)
    discrete = [d for d in dims if d.discrete]
    continuous = {d.field: d.values[0] for d in dims if not d.discrete}
    for combo in itertools.islice(itertools.product(*[d.values for d in discrete]), MAX_CHECKED_COMBINATIONS):
        yield {**continuous, **{d.field: v for d, v in zip(discrete, combo)}}


def validate(cfg: SweepConfig) -> None:
    """Check the whole search space before any trial runs; errors name the key."""
    if cfg.num_samples < 1:
        raise ConfigError(f"{cfg.name}: num_samples must be at least 1")
    if cfg.scheduler == "asha" and (cfg.grace_period < 1 or cfg.reduction_factor <= 1):
        raise ConfigError(f"{cfg.name}: asha needs grace_period >= 1 and reduction_factor > 1")
    if cfg.evaluate == "selected":
        hints = _searchable_fields()
        for key in cfg.select_over:
            if key not in hints:
                raise ConfigError(f"{cfg.name}: select_over: {key!r} is not a TrainConfig field")
    if not cfg.name or any(c in cfg.name for c in "/\\ ") or cfg.name.startswith("."):
        raise ConfigError(f"sweep name {cfg.name!r}: use letters, digits, '-', '_' or '.' (it names a folder)")
    trial_train_config(cfg, {})
    for params in checked_combinations(cfg):  # values as their fields take them; names: precheck.check_sweep_names
        trial_train_config(cfg, params)


def grid_size(cfg: SweepConfig) -> int:
    """Number of trials the sweep will run."""
    if cfg.search == "random":
        return cfg.num_samples
    return math.prod(len(d.values) for d in dimensions(cfg) if d.kind == "grid") * cfg.num_samples


def _resolve_base(base: Any, sweep_file: Path | None) -> dict[str, Any]:
    if isinstance(base, dict):
        return base
    if not isinstance(base, str):
        raise ConfigError(f"{sweep_file or 'sweep'}: base: expected a mapping or a train config path, got {base!r}")
    path = Path(base).expanduser()
    if not path.is_file() and sweep_file is not None and (sweep_file.parent / base).is_file():
        path = sweep_file.parent / base
    return read_yaml(path)


def load_sweep_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      flags: dict[str, Any] | None = None, **extra: Any) -> SweepConfig:
    """Load a sweep YAML, then ``key=value`` overrides, then ``flags`` (sweep fields) and ``extra`` (base
    fields) from the command line; ``None`` values are not given.

    Overrides name sweep fields (``num_samples=2``), nested entries (``search_space.seed.grid=[1,2]``),
    base fields (``base.max_train_sentences=100``) or, as a shorthand, base fields directly
    (``max_train_sentences=100``) when the key is a training field and not a sweep field.
    """
    file = Path(path) if path else None
    data = read_yaml(file) if file else {}
    where = str(file) if file else "sweep"
    if "base" in data:
        data["base"] = dict(_resolve_base(data["base"], file))
    sweep_fields = {f.name for f in dataclasses.fields(SweepConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    parsed = parse_overrides(overrides or [])
    check_override_keys(parsed, sweep_fields, train_fields)
    base_from_command_line = set(parsed["base"]) if isinstance(parsed.get("base"), dict) else set()
    for key in list(parsed):
        if key not in sweep_fields and key in train_fields:
            parsed.setdefault("base", {})[key] = parsed.pop(key)
            base_from_command_line.add(key)
    if isinstance(parsed.get("base"), str):
        parsed["base"] = dict(_resolve_base(parsed["base"], None))
    given = {key: value for key, value in (flags or {}).items() if value is not None}
    data = deep_merge(deep_merge(data, parsed), given)
    for key, value in extra.items():  # e.g. data_dir from the command line goes into the base
        if value is not None:
            data.setdefault("base", {})[key] = value
            base_from_command_line.add(key)
    cfg = from_dict(SweepConfig, data, where, {key: COMMAND_LINE for key in [*parsed, *given]})
    apply_seeds(cfg, where)
    # Freeze every base field (defaults included): a resumed sweep must see the same trials.
    cfg.base = to_dict(from_dict(TrainConfig, cfg.base, f"{where}: base",
                                 {key: f"{COMMAND_LINE}: base" for key in base_from_command_line}))
    validate(cfg)
    # Values as their fields' types ("1e-3" read by YAML 1.1 as a string becomes 0.001).
    cfg.search_space = {d.field: {d.kind: list(d.values)} for d in dimensions(cfg)}
    # Trials run in their own working folders: relative paths mean what they mean here, on the driver.
    if cfg.base.get("data_dir"):
        cfg.base["data_dir"] = str(Path(cfg.base["data_dir"]).expanduser().resolve())
    cfg.base["model"] = _local_folder_absolute(cfg.base["model"])
    if "model" in cfg.search_space:
        cfg.search_space["model"] = {kind: [_local_folder_absolute(m) for m in values]
                                     for kind, values in cfg.search_space["model"].items()}
    return cfg


def check_override_keys(parsed: dict[str, Any], sweep_fields: set[str], train_fields: set[str]) -> None:
    """Unknown override keys are named as typed on the command line, with the nearest field a sweep takes
    (its own fields and, as a shorthand for ``base.<field>``, every training field)."""
    def unknown(key: str, choices: set[str], prefix: str = "") -> ConfigError:
        close = difflib.get_close_matches(key, sorted(choices), n=1)
        hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
        return ConfigError(f"{COMMAND_LINE}: unknown key {prefix + key!r}{hint}")

    for key, value in parsed.items():
        if key == "base" and isinstance(value, dict):
            for sub in value:
                if sub not in train_fields:
                    raise unknown(sub, train_fields, "base.")
        elif key == "search_space" and isinstance(value, dict):
            continue  # parse_dimension names these, with the searchable fields
        elif key not in sweep_fields and key not in train_fields:
            raise unknown(key, sweep_fields | train_fields)


def apply_seeds(cfg: SweepConfig, where: str) -> None:
    """``seeds: [...]`` becomes the ``seed`` grid of the search space; an empty list or a clash is refused."""
    if cfg.seeds is None:
        return
    if not cfg.seeds:
        raise ConfigError(f"{where}: seeds: the list is empty; give at least one seed (e.g. seeds: [1, 2, 3]) "
                          f"or leave the field out")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"{where}: seeds: repeated values in {cfg.seeds}")
    existing = cfg.search_space.get("seed")
    wanted = {"grid": list(cfg.seeds)}
    if existing is not None and existing != wanted:
        raise ConfigError(f"{where}: seeds {cfg.seeds} and search_space.seed {existing} both set the seeds; "
                          f"keep one")
    cfg.search_space = {**cfg.search_space, "seed": wanted}


def _local_folder_absolute(model: str) -> str:
    """A model given as an existing local folder, as an absolute path; hub ids and ``tiny`` unchanged."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def sweep_to_dict(cfg: SweepConfig) -> dict[str, Any]:
    return to_dict(cfg)
