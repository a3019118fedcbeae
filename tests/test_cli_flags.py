"""Flags derived from the config dataclasses (``topro.cli.flags``): name, type, help and default from the field."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from topro.cli import build_parser
from topro.cli.compare import CompareConfig
from topro.cli.compare import config_from_args as compare_config
from topro.cli.eval_llm import EvalLLMConfig
from topro.cli.eval_llm import config_from_args as eval_llm_config
from topro.cli.evaluate import EvaluateConfig
from topro.cli.evaluate import config_from_args as evaluate_config
from topro.cli.export import ExportConfig
from topro.cli.flags import _collection, _scalar, field_docs
from topro.cli.report import ReportConfig
from topro.cli.serve import ServeConfig
from topro.cli.serve import config_from_args as serve_config
from topro.cli.sweep import SweepRunOptions, load_sweep
from topro.sweep_config import SweepConfig

COMMANDS = {"evaluate": EvaluateConfig, "eval-llm": EvalLLMConfig, "report": ReportConfig, "compare": CompareConfig,
            "sweep": SweepConfig, "serve": ServeConfig, "export": ExportConfig}


def _subparser(command: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_field_a_flag_can_take_has_one_with_its_docstring_and_default(command):
    cls = COMMANDS[command]
    actions = {a.dest: a for a in _subparser(command)._actions}
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    assert {"config"} <= set(actions) and ("overrides" in actions or "runs" in actions)
    for field in dataclasses.fields(cls):
        if field.name in ("run_a", "run_b"):  # positionals
            continue
        if _scalar(hints[field.name])[0] is None and _collection(hints[field.name]) is None:
            assert field.name not in actions, field.name  # a mapping of mappings (search_space): key=value only
            continue
        action = actions[field.name]
        assert action.default is None  # not given: the file and key=value stand
        assert " ".join(docs[field.name].replace("``", "").split()[:3]) in action.help, (field.name, action.help)
        if field.default not in (None, True, False, dataclasses.MISSING):
            assert f"(default: {field.default})" in action.help


def test_flags_set_their_fields_and_leave_the_rest_to_the_file(tmp_path):
    config = tmp_path / "evaluate.yaml"
    config.write_text("checkpoint: ck\noutput: out.json\nlangs: de,fr\nmax_sentences: 7\n")
    parse = build_parser().parse_args
    cfg = evaluate_config(parse(["evaluate", "--config", str(config), "--no-viterbi", "--parallel",
                                 "--max-tokens-per-batch", "2048", "max_sentences=9"]))
    assert (cfg.langs, cfg.max_sentences, cfg.viterbi, cfg.parallel, cfg.max_tokens_per_batch) == \
        ("de,fr", 9, False, True, 2048)
    cfg = eval_llm_config(parse(["eval-llm", "--task", "udpos", "--model", "m", "--no-ray", "--no-mlflow",
                                 "--length-norm", "--timeout", "5", "--dtype", "bf16"]))
    assert (cfg.ray, cfg.mlflow, cfg.length_norm, cfg.calibrate, cfg.timeout, cfg.dtype) == \
        (False, False, True, False, 5.0, "bf16")
    cfg = compare_config(parse(["compare", "a.json", "b.json", "seed=3", "--resamples", "20"]))
    assert (cfg.run_a, cfg.run_b, cfg.resamples, cfg.seed) == ("a.json", "b.json", 20, 3)


def test_a_flag_of_the_wrong_type_or_choice_is_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--max-sentences", "many"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval-llm", "--dtype", "fp8"])


def test_report_and_compare_take_a_config_file(tmp_path):
    from topro.cli.report import cmd_report
    from topro.config import ConfigError

    config = tmp_path / "compare.yaml"
    config.write_text("run_a: x.json\nrun_b: y.json\nalpha: 0.01\n")
    cfg = compare_config(build_parser().parse_args(["compare", "--config", str(config)]))
    assert (cfg.run_a, cfg.run_b, cfg.alpha) == ("x.json", "y.json", 0.01)
    with pytest.raises(ConfigError, match="field 'sweep': required"):
        cmd_report(build_parser().parse_args(["report", "--no-log"]))


SWEEP_FLAGS_IN_USE = ["--config", "C", "--data-dir", "D", "--tracking-uri", "sqlite:///m.db", "--address", "auto",
                      "--fresh", "--summary", "s.json"]
"""Every flag of ``topro sweep`` that README, scripts, k8s and tests use (before its flags came from fields)."""
SERVE_FLAGS_IN_USE = ["--config", "configs/serve/local.yaml", "--serve-config", "serve/config.yaml", "--model", "m",
                      "--models", "a=models:/x@champion", "b=ck", "--llm-model", "http://127.0.0.1:8001/v1",
                      "--port", "8001", "--host", "127.0.0.1", "--apps", "tagging,llm", "--address", "auto",
                      "--num-cpus", "2", "--startup-timeout", "20", "--startup-attempts", "2"]


def test_the_sweep_and_serve_flags_users_have_keep_working():
    args = build_parser().parse_args(["sweep", *SWEEP_FLAGS_IN_USE, "num_samples=2"])
    assert (args.config, args.data_dir, args.tracking_uri, args.address, args.fresh, args.summary, args.overrides) == \
        ("C", "D", "sqlite:///m.db", "auto", True, "s.json", ["num_samples=2"])
    assert {f.name for f in dataclasses.fields(SweepRunOptions)} <= set(vars(args))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "--data-dir", "D"])  # --config is required
    cfg = serve_config(build_parser().parse_args(["serve", *SERVE_FLAGS_IN_USE, "port=9000"]))
    assert cfg == ServeConfig(serve_config="serve/config.yaml", model="m",
                              models={"a": "models:/x@champion", "b": "ck"}, llm_model="http://127.0.0.1:8001/v1",
                              host="127.0.0.1", port=8001, apps=["tagging", "llm"], address="auto", num_cpus=2,
                              startup_timeout=20.0, startup_attempts=2)  # a flag beats key=value, as for every command


def test_serve_flags_key_value_and_file_agree_and_bad_pairs_are_named(tmp_path):
    from topro.config import ConfigError

    parse = build_parser().parse_args
    by_flags = serve_config(parse(["serve", "--models", "a=x", "--apps", "tagging", "--num-cpus", "3"]))
    by_overrides = serve_config(parse(["serve", "models={a: x}", "apps=[tagging]", "num_cpus=3"]))
    config = tmp_path / "serve.yaml"
    config.write_text("models: {a: x}\napps: [tagging]\nnum_cpus: 3\n")
    assert by_flags == by_overrides == serve_config(parse(["serve", "--config", str(config)]))
    assert serve_config(parse(["serve", "--config", str(config), "--models"])).models == {"a": "x"}  # bare: file's
    with pytest.raises(ConfigError, match="--models 'a': expected KEY=VALUE"):
        serve_config(parse(["serve", "--models", "a"]))


def test_sweep_flags_set_sweep_fields_and_data_dir_the_bases(tmp_path, data_dir):
    config = tmp_path / "s.yaml"
    config.write_text("name: t\nbase: {task: udpos, model: tiny, epochs: 1, max_tokens_per_batch: 1024}\n"
                      "search_space: {learning_rate: {grid: [1e-3, 3e-4]}}\nnum_samples: 1\n")
    parse = build_parser().parse_args
    sweep = load_sweep(parse(["sweep", "--config", str(config), "--data-dir", str(data_dir), "--seeds", "1,2",
                              "--eval-langs", "de,fr", "--eval-max-tokens-per-batch", "2048", "--num-samples", "3",
                              "num_samples=2", "max_sentences=5"]))
    assert (sweep.num_samples, sweep.eval_langs, sweep.seeds, sweep.eval_max_tokens_per_batch, sweep.max_sentences) \
        == (3, ["de", "fr"], [1, 2], 2048, 5)
    assert sweep.search_space["seed"] == {"grid": [1, 2]}
    assert sweep.base["data_dir"] == str(data_dir.resolve()) and sweep.base["max_tokens_per_batch"] == 1024
    assert "eval_max_tokens_per_batch" not in {k for k, v in sweep.base.items() if v is not None}
    with pytest.raises(SystemExit):
        parse(["sweep", "--config", str(config), "--seeds", "1,x"])


def test_the_export_and_verify_flags_users_have_keep_working():
    from topro.cli.export import config_from_args as export_config

    parse = build_parser().parse_args
    assert export_config(parse(["export", "--merge", "ck", "--output", "out", "--overwrite"])) == \
        ExportConfig(merge="ck", output="out", overwrite=True)
    args = parse(["verify", "models:/m@champion", "--sizes-only", "--tracking-uri", "sqlite:///m.db"])
    assert (args.checkpoint, args.hashes, args.tracking_uri) == ("models:/m@champion", False, "sqlite:///m.db")
    assert parse(["verify", "ck"]).hashes is None  # not given: the file and key=value stand
