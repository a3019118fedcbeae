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
from topro.cli.flags import _scalar, field_docs
from topro.cli.report import ReportConfig

COMMANDS = {"evaluate": EvaluateConfig, "eval-llm": EvalLLMConfig, "report": ReportConfig, "compare": CompareConfig}


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
        if _scalar(hints[field.name])[0] is None or field.name in ("run_a", "run_b"):  # positionals
            continue
        action = actions[field.name]
        assert action.default is None  # not given: the file and key=value stand
        assert docs[field.name].split()[0].strip("`") in action.help, (field.name, action.help)
        if field.default not in (None, True, False):
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
