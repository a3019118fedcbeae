"""SweepConfig: the search space is validated against TrainConfig before anything runs (no Ray)."""
from pathlib import Path

import pytest

from topro.config import ConfigError, read_yaml
from topro.precheck import check_sweep_names
from topro.sweep_config import grid_size, load_sweep_config

REPO = Path(__file__).resolve().parent.parent
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_config_loads(path):
    overrides = []
    model = read_yaml(path)["base"].get("model", "tiny")
    if model != "tiny" and not Path(model).expanduser().is_dir():
        overrides = ["model=tiny"]  # e.g. the e5 folder, built by ../shared/tools/offline_models.py
    cfg = load_sweep_config(path, overrides)
    assert grid_size(cfg) >= 2


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


BASE = """name: t
base: {task: udpos, model: tiny, epochs: 1}
search_space:
  method: {grid: [topro, vanilla]}
  learning_rate: {grid: [1e-3, 3e-4]}
"""


def test_values_take_their_field_types_and_overrides_reach_the_base(tmp_path):
    cfg = load_sweep_config(_write(tmp_path, BASE), ["max_train_sentences=30", "search_space.seed.grid=[1,2]",
                                                     "num_samples=2"])
    assert cfg.search_space["learning_rate"] == {"grid": [1e-3, 3e-4]}  # YAML 1.1 reads 1e-3 as a string
    assert cfg.base["max_train_sentences"] == 30 and cfg.base["epochs"] == 1
    assert grid_size(cfg) == 2 * 2 * 2 * 2


def test_base_may_be_a_train_config_file(tmp_path):
    cfg = load_sweep_config(_write(tmp_path, BASE.replace("base: {task: udpos, model: tiny, epochs: 1}",
                                                          f"base: {REPO}/configs/train/panx-vanilla.yaml")))
    assert cfg.base["task"] == "panx"


@pytest.mark.parametrize("override,message", [
    ("schedular=asha", r"unknown key 'schedular' \(did you mean 'scheduler'\?\)"),
    ("search_space.lerning_rate.grid=[1]", r"search_space.lerning_rate: 'lerning_rate' is not a TrainConfig field "
                                           r"\(did you mean 'learning_rate'\?\)"),
    ("search_space.learning_rate.grid=[fast]", r"search_space.learning_rate.grid\[0\]: field 'learning_rate': "
                                               r"expected a number"),
    ("search_space.method.grid=[topro,vanila]", r"combination .*'method': 'vanila'.*unknown method 'vanila'"),
    ("search_space.template.choice=[nope]", r"unknown template 'nope' for task 'udpos'"),
    ("search_space.output_dir.grid=[a]", r"'output_dir' is set by the sweep itself"),
    ("search_space.learning_rate.loguniform=[0,1]", r"expected one of|bounds must be positive"),
    ("search_space.weight_decay.loguniform=[0,0.1]", r"search_space.weight_decay.loguniform: bounds must be positive"),
    ("search_space.epochs.range=[1,2]", r"search_space.epochs: expected one of"),
    ("scheduler=hyperband", r"field 'scheduler': 'hyperband' is not one of"),
    ("lerning_rate=1", r"unknown key 'lerning_rate'"),
    ("base.model=/no/such/folder", r"model folder '/no/such/folder' does not exist"),
    ("seeds=[]", r"seeds: the list is empty"),
    ("seeds=[1,1]", r"seeds: repeated values"),
    ("base.selection_metric=f1", r"selection_metric: 'f1' is not a score of task 'udpos'"),
])
def test_bad_keys_and_values_are_named(tmp_path, override, message):
    """Keys and values are refused when the sweep loads; names (methods, templates, folders) by its pre-check."""
    with pytest.raises(ConfigError, match=message):
        check_sweep_names(load_sweep_config(_write(tmp_path, BASE), [override]))


def test_relative_paths_are_resolved_on_the_driver(tmp_path, monkeypatch, data_dir):
    """Trials run in their own working folders: a relative data dir or model folder must not reach them."""
    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    relative = Path("..") / tmp_path.name / "data"
    cfg = load_sweep_config(_write(tmp_path, BASE.replace("model: tiny", "model: models/m")), [],
                            data_dir=str(relative))
    assert cfg.base["data_dir"] == str((tmp_path / "data").resolve())
    assert cfg.base["model"] == str((tmp_path / "models" / "m").resolve())
    cfg = load_sweep_config(_write(tmp_path, BASE), ["search_space.model.grid=[tiny,models/m]"])
    assert cfg.search_space["model"] == {"grid": ["tiny", str((tmp_path / "models" / "m").resolve())]}


def test_seeds_list_becomes_the_seed_dimension(tmp_path):
    cfg = load_sweep_config(_write(tmp_path, BASE), ["seeds=[1,2,3]"])
    assert cfg.search_space["seed"] == {"grid": [1, 2, 3]}


def test_the_evaluation_actors_budget_is_the_sweeps_else_the_bases_evaluation_one_never_the_training_one(tmp_path):
    from topro.sweep_config import evaluation_max_tokens_per_batch

    path = _write(tmp_path, BASE)
    assert evaluation_max_tokens_per_batch(load_sweep_config(path, ["max_tokens_per_batch=1024"])) == 8192
    assert evaluation_max_tokens_per_batch(load_sweep_config(path, ["base.eval_max_tokens_per_batch=4096"])) == 4096
    both = load_sweep_config(path, ["eval_max_tokens_per_batch=2048", "base.eval_max_tokens_per_batch=4096"])
    assert evaluation_max_tokens_per_batch(both) == 2048
    assert both.eval_max_tokens_per_batch == 2048 and both.base["eval_max_tokens_per_batch"] == 4096
    with pytest.raises(ConfigError, match="'eval_max_tokens_per_batch': must be at least 1"):
        load_sweep_config(path, ["eval_max_tokens_per_batch=0"])
