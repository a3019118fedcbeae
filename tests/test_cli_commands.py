"""Subcommands never vanish silently; parallel evaluation asks Ray for the GPUs it will use."""
import builtins
import importlib
import sys

import pytest

from topro.cli import build_parser, main
from topro.cluster.evaluation import gpus_per_actor


def test_a_broken_subcommand_module_fails_loudly(monkeypatch):
    for name in [n for n in sys.modules if n == "topro.cli" or n.startswith("topro.cli.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.setitem(sys.modules, "topro.cli.report", None)  # importing it now fails
    with pytest.raises(ImportError, match="topro.cli.report"):
        importlib.import_module("topro.cli")


def test_a_missing_optional_dependency_is_named_on_use(monkeypatch, capsys):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "topro.sweep_report":  # what `topro report` imports when it runs
            raise ModuleNotFoundError("No module named 'plotly'", name="plotly")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert "report" in build_parser().format_help()
    assert main(["report", "--sweep", "anything"]) == 2
    err = capsys.readouterr().err
    assert "plotly" in err and "topro report" in err


def test_a_missing_module_of_our_own_is_not_taken_for_an_optional_dependency(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "topro.sweep_report":
            raise ModuleNotFoundError("No module named 'topro.sweep_report'", name="topro.sweep_report")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModuleNotFoundError, match="topro.sweep_report"):
        main(["report", "--sweep", "anything"])


def test_parallel_evaluation_requests_a_gpu_per_actor_when_auto_finds_one():
    assert gpus_per_actor("auto", 2.0) == 1
    assert gpus_per_actor("auto", 0.0) == 0
    assert gpus_per_actor("cpu", 4.0) == 0
    assert gpus_per_actor("cuda", 1.0) == 1
    with pytest.raises(ValueError, match="no GPU"):
        gpus_per_actor("cuda", 0.0)
