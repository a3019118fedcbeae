"""Every shipped config loads through the one loader (``topro.config``) into its typed dataclass."""
from pathlib import Path

import pytest
import yaml

from topro.cli.eval_llm import EvalLLMConfig
from topro.cli.evaluate import EvaluateConfig
from topro.cli.serve import ServeConfig
from topro.config import ConfigError, TrainConfig, from_dict, load_config
from topro.endpoint.args import APP_ARGS, LLMArgs, TaggingArgs, parse_app_args
from topro.sweep_config import SweepConfig, load_sweep_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
SERVE_CONFIGS = [REPO / "serve" / "config.yaml", REPO / "k8s" / "overlays" / "gpu" / "rayservice-serve-config.yaml"]
"""Files whose `applications:` hold the Serve apps' args (the base RayService embeds serve/config.yaml)."""

# Each folder of configs/ and the dataclass its files load into.
LOADERS = {"train": TrainConfig, "llm": EvalLLMConfig, "evaluate": EvaluateConfig, "serve": ServeConfig}


def shipped(folder: str) -> list[Path]:
    return sorted((CONFIGS / folder).glob("*.yaml"))


def test_every_config_folder_has_a_loader():
    assert {p.name for p in CONFIGS.iterdir() if p.is_dir()} == {*LOADERS, "sweeps", "deepspeed"}


@pytest.mark.parametrize("folder,cls", LOADERS.items())
def test_every_shipped_config_loads_into_its_dataclass(folder, cls):
    paths = shipped(folder)
    assert paths, f"configs/{folder}/ ships no config"
    for path in paths:
        assert isinstance(load_config(cls, path), cls), path


@pytest.mark.parametrize("path", shipped("sweeps"), ids=lambda p: p.name)
def test_every_shipped_sweep_loads(path):
    sweep = load_sweep_config(path)
    assert isinstance(sweep, SweepConfig) and isinstance(from_dict(TrainConfig, sweep.base), TrainConfig)


def serve_applications(path: Path) -> list[dict]:
    data = yaml.safe_load(path.read_text())
    if "applications" not in data:  # a kustomize patch: the Serve config is the embedded serveConfigV2
        data = yaml.safe_load(data["spec"]["serveConfigV2"])
    return data["applications"]


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_the_serve_apps_args_load_into_their_dataclasses(path):
    apps = serve_applications(path)
    assert {app["name"] for app in apps} == set(APP_ARGS)
    for app in apps:
        cls = APP_ARGS[app["name"]]
        args = dict(app.get("args") or {})
        if cls is TaggingArgs:
            assert args.get("model"), f"{path}: the tagging app needs a model"
        assert isinstance(parse_app_args(cls, args, app["name"]), cls)


def test_the_thin_serve_modules_build_the_package_apps():
    import serve.llm
    import serve.tagging
    from topro.endpoint import llm, tagging

    assert serve.tagging.build_app is tagging.build_app and serve.llm.build_app is llm.build_app


def test_the_token_budget_has_one_name_and_old_names_say_the_new_one(tmp_path):
    for cls in (TrainConfig, EvalLLMConfig, TaggingArgs):
        assert "max_tokens_per_batch" in cls.__dataclass_fields__, cls
    with pytest.raises(ValueError, match="'max_tokens' is now called 'max_tokens_per_batch'"):
        parse_app_args(TaggingArgs, {"model": "m", "max_tokens": 4096}, "tagging")
    with pytest.raises(ConfigError, match="'batch_tokens' is now called 'max_tokens_per_batch'"):
        load_config(EvalLLMConfig, None, ["task=udpos", "model=m", "batch_tokens=512"])
    from topro.cli import main

    assert main(["eval-llm", "--task", "udpos", "--model", "m", "--batch-tokens", "512"]) == 2


def test_the_evaluation_sentence_cap_is_max_sentences_in_every_command():
    for cls in (TrainConfig, SweepConfig, EvaluateConfig, EvalLLMConfig):
        assert "max_sentences" in cls.__dataclass_fields__, cls
    assert load_config(TrainConfig, None, ["max_sentences=7"]).max_sentences == 7
    with pytest.raises(ConfigError, match="'max_eval_sentences' is now called 'max_sentences'"):
        load_config(TrainConfig, None, ["max_eval_sentences=7"])
    with pytest.raises(ConfigError, match="'max_eval_sentences' is now called 'max_sentences'"):
        from_dict(SweepConfig, {"name": "s", "base": {}, "max_eval_sentences": 7})


def test_llm_evaluation_and_the_llm_app_take_the_backend_settings_from_one_dataclass():
    from topro.llm.backend_config import BackendConfig

    assert issubclass(EvalLLMConfig, BackendConfig) and issubclass(LLMArgs, BackendConfig)
    assert LLMArgs().backend_options() == EvalLLMConfig(task="udpos", model="m").backend_options()
    assert load_config(EvalLLMConfig, None, ["task=udpos", "model=m", "retries=1"]).backend_options()["retries"] == 1
    with pytest.raises(ValueError, match="field 'retries'"):
        parse_app_args(LLMArgs, {"retries": -1}, "llm")
    with pytest.raises(ConfigError, match="field 'timeout'"):
        load_config(EvalLLMConfig, None, ["task=udpos", "model=m", "timeout=0"])


def test_serve_args_are_checked_field_by_field():
    with pytest.raises(ValueError, match=r"serve app 'tagging': bad args: field 'max_batch_size': must be in \[1, 1024\]"):
        parse_app_args(TaggingArgs, {"model": "m", "max_batch_size": 0}, "tagging")
    with pytest.raises(ValueError, match="unknown key 'max_batch' \\(did you mean 'max_batch_size'\\?\\)"):
        parse_app_args(TaggingArgs, {"model": "m", "max_batch": 4}, "tagging")
    with pytest.raises(ValueError, match="'default' is the id of 'model'"):
        parse_app_args(TaggingArgs, {"model": "m", "models": {"default": "x"}}, "tagging")
    with pytest.raises(ValueError, match="field 'mode': 'guess' is not one of"):
        parse_app_args(LLMArgs, {"mode": "guess"}, "llm")


def test_flags_and_overrides_set_the_same_fields(tmp_path):
    from topro.cli import build_parser
    from topro.cli.evaluate import config_from_args

    flags = config_from_args(build_parser().parse_args(
        ["evaluate", "--checkpoint", "c", "--output", "o.json", "--max-sentences", "5", "--no-viterbi"]))
    overrides = config_from_args(build_parser().parse_args(
        ["evaluate", "checkpoint=c", "output=o.json", "max_sentences=5", "viterbi=false"]))
    assert flags == overrides and flags.viterbi is False
    config = tmp_path / "eval.yaml"
    config.write_text("checkpoint: c\noutput: o.json\nmax_sentences: 9\n")
    from_file = config_from_args(build_parser().parse_args(["evaluate", "--config", str(config),
                                                            "--max-sentences", "5", "viterbi=false"]))
    assert from_file == flags
    with pytest.raises(ConfigError, match="'checkpoint': required"):
        config_from_args(build_parser().parse_args(["evaluate", "--output", "o.json"]))
