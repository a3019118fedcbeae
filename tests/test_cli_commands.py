"""Subcommands never vanish silently; parallel evaluation asks Ray for the GPUs it will use."""
import builtins
import sys

import pytest

from topro.cli import build_parser, main
from topro.cluster.evaluation import gpus_per_actor


def test_a_broken_subcommand_module_fails_loudly(monkeypatch):
    monkeypatch.setitem(sys.modules, "topro.reports_cli", None)  # importing it now fails
    with pytest.raises(ImportError, match="topro.reports_cli"):
        build_parser()


def test_a_missing_optional_dependency_is_named_in_help_and_on_use(monkeypatch, capsys):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "topro.reports_cli":
            raise ModuleNotFoundError("No module named 'plotly'", name="plotly")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert "report" in build_parser().format_help()
    assert "plotly" in build_parser().format_help()
    assert main(["report", "anything"]) == 2
    assert "plotly" in capsys.readouterr().err


def test_parallel_evaluation_requests_a_gpu_per_actor_when_auto_finds_one():
    assert gpus_per_actor("auto", 2.0) == 1
    assert gpus_per_actor("auto", 0.0) == 0
    assert gpus_per_actor("cpu", 4.0) == 0
    assert gpus_per_actor("cuda", 1.0) == 1
    with pytest.raises(ValueError, match="no GPU"):
        gpus_per_actor("cuda", 0.0)
