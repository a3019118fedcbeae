"""Slowing a function down in every Python process of a command, Ray workers and actors included, so that a test
can send a signal in the middle of a run: ``$TOPRO_TEST_SLOW`` = ``module:attribute.path=seconds`` makes each
call of that function sleep first. The processes load ``sitecustomize.py`` from a folder on ``PYTHONPATH``
(Ray's workers inherit it); the function is wrapped when its module is imported. The code is otherwise unchanged."""
from __future__ import annotations

import os
from pathlib import Path

SITECUSTOMIZE = '''
import importlib.util, os, sys, time

class Slowdown:
    def __init__(self, spec):
        target, seconds = spec.rsplit("=", 1)
        self.module, self.path = target.split(":")
        self.seconds = float(seconds)

    def find_spec(self, name, path, target=None):
        if name != self.module:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run, owner_path, attribute = spec.loader.exec_module, self.path.split(".")[:-1], self.path.split(".")[-1]
        seconds = self.seconds

        def exec_module(module):
            run(module)
            owner = module
            for part in owner_path:
                owner = getattr(owner, part)
            inner = getattr(owner, attribute)

            def slowed(*args, **kwargs):
                time.sleep(seconds)
                return inner(*args, **kwargs)
            setattr(owner, attribute, slowed)
        spec.loader.exec_module = exec_module
        return spec

if os.environ.get("TOPRO_TEST_SLOW"):
    sys.meta_path.insert(0, Slowdown(os.environ["TOPRO_TEST_SLOW"]))
'''

REPO = Path(__file__).resolve().parent.parent


def slowed_env(hooks: Path, slow: str | None) -> dict[str, str]:
    """The environment for a ``topro`` subprocess: this checkout first on ``PYTHONPATH``, one thread, and
    ``slow`` (``module:attribute.path=seconds``, or ``None``) slowed down; ``hooks`` gets the sitecustomize."""
    hooks.mkdir(parents=True, exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join([str(hooks), str(REPO / "platform"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("TOPRO_TEST_SLOW", None)
    return {**env, "TOPRO_TEST_SLOW": slow} if slow else env
