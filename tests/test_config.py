from pathlib import Path

import pytest

from topro.config import ConfigError, TrainConfig, load_config, parse_overrides
from topro.data import get_task, list_tasks
from topro.prompts import get_template, get_verbalizer, list_templates, list_verbalizers

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_train_config_loads(path):
    cfg = load_config(TrainConfig, path)
    get_task(cfg.task)
    get_template(cfg.task, cfg.template)
    get_verbalizer(cfg.task, cfg.verbalizer)


def test_unknown_key_is_named_with_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: udpos\nlerning_rate: 1e-3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        load_config(TrainConfig, path)


def test_bad_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'epochs': expected an integer"):
        load_config(TrainConfig, None, ["epochs=three"])
    with pytest.raises(ConfigError, match=r"field 'strategy': 'mpi' is not one of"):
        load_config(TrainConfig, None, ["strategy=mpi"])


def test_overrides_parse_yaml_scalars_and_lists():
    cfg = load_config(TrainConfig, None, ["learning_rate=5e-4", "eval_langs=de,fr", "max_steps=null"])
    assert cfg.learning_rate == 5e-4 and cfg.eval_langs == ["de", "fr"] and cfg.max_steps is None
    assert parse_overrides(["a.b=1"]) == {"a": {"b": 1}}


def test_tasks_and_prompts_registry():
    assert {"udpos", "panx"} <= set(list_tasks())
    assert len(get_task("udpos").labels) == 17
    assert get_task("panx").scheme == "iob2"
    for task in ("udpos", "panx"):
        assert len(list_templates(task)) >= 3  # the paper's plus at least two alternatives
        for name in list_verbalizers(task):
            assert set(get_verbalizer(task, name).words) == set(get_task(task).labels)
    assert get_verbalizer("udpos").words["NOUN"] == "thing"
