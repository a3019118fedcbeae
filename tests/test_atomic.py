"""Atomic state writes (``topro.atomic``): a SIGKILL at every write site leaves the old or the new state,
never a mix; a full disk or a refused write is one line and overwrites nothing; no state file in
``platform/topro`` is written outside the helper."""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from topro import atomic

REPO = Path(__file__).resolve().parent.parent
FOLDER_SITES = {"checkpoint_export", "training_state"}

WRITER = """
import sys
from pathlib import Path
from topro import atomic
site, target, content = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if site in {folder_sites!r}:
    with atomic.staged_folder(target, site) as tmp:
        (tmp / "a.txt").write_text(content)
        (tmp / "b.txt").write_text(content * 1000)
else:
    atomic.write_text(target, content * 1000, site)
""".format(folder_sites=FOLDER_SITES)


def write(site: str, target: Path, content: str, fault: str | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop(atomic.FAULT_ENV, None)
    if fault:
        env[atomic.FAULT_ENV] = f"{site}:{fault}"
    return subprocess.run([sys.executable, "-c", WRITER, site, str(target), content], env=env,
                          capture_output=True, timeout=60).returncode


def read(site: str, target: Path) -> str:
    if site in FOLDER_SITES:
        a, b = (target / "a.txt").read_text(), (target / "b.txt").read_text()
        assert b == a * 1000, f"{site}: a mix of two saves"
        assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
        return a
    text = target.read_text()
    assert len(set(text)) == 1 and len(text) == 1000, f"{site}: a mix of two saves"
    return text[0]


@pytest.mark.parametrize("site", sorted(atomic.SITES))
def test_sigkill_at_each_write_site_leaves_old_or_new_state(tmp_path, site):
    target = tmp_path / ("state" if site in FOLDER_SITES else "state.json")
    assert write(site, target, "o") == 0 and read(site, target) == "o"
    assert write(site, target, "n", fault="kill") == -signal.SIGKILL
    assert read(site, target) == "o"  # the old state, whole
    leftovers = [p.name for p in tmp_path.iterdir() if atomic.TMP_MARK in p.name]
    assert leftovers, "the kill should have left a temporary behind (else the fault hit nothing)"
    atomic.clean_leftovers(tmp_path, names=("state",))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["state", "state.v1"] if site in FOLDER_SITES else ["state.json"])
    assert write(site, target, "n") == 0 and read(site, target) == "n"
    if site in FOLDER_SITES:  # the previous version is gone once the new one is published
        assert target.is_symlink() and os.readlink(target) == "state.v2"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state", "state.v2"]


def test_every_site_is_used_by_the_code():
    source = "\n".join(p.read_text() for p in (REPO / "platform" / "topro").rglob("*.py") if p.name != "atomic.py")
    unused = [s for s in atomic.SITES if f'"{s}"' not in source]
    assert not unused, f"sites nobody writes: {unused}"


def test_disk_full_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic.write_json(target, {"v": 1}, "metrics")
    monkeypatch.setenv(atomic.FAULT_ENV, "metrics:enospc")
    with pytest.raises(atomic.StateWriteError) as err:
        atomic.write_json(target, {"v": 2, "pad": "x" * 5000}, "metrics")
    message = str(err.value)
    assert "\n" not in message and str(target) in message and "no space left" in message
    assert "needs about 4.9 KB" in message and "free on that filesystem" in message
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_permission_error_on_a_folder_keeps_the_previous_version(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint"
    with atomic.staged_folder(target, "checkpoint_export") as tmp:
        (tmp / "w").write_text("old")
    monkeypatch.setenv(atomic.FAULT_ENV, "checkpoint_export:eacces")
    with pytest.raises(atomic.StateWriteError, match="cannot write .*checkpoint: Permission denied"):
        with atomic.staged_folder(target, "checkpoint_export") as tmp:
            (tmp / "w").write_text("new")
    assert (target / "w").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint", "checkpoint.v1"]


def test_a_folder_of_an_older_topro_becomes_version_zero_then_is_replaced(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "w").write_text("legacy")
    with atomic.staged_folder(target, "checkpoint_export") as tmp:
        (tmp / "w").write_text("new")
    assert os.readlink(target) == "checkpoint.v1" and (target / "w").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.v1"]


def test_run_lock_names_the_other_process_and_takes_over_a_stale_one(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / atomic.LOCK_FILE).write_text(json.dumps(
            {"pid": other.pid, "host": __import__("socket").gethostname(), "started": 0, "command": "topro train"}))
        with pytest.raises(atomic.RunLocked, match=f"pid {other.pid} on host .*topro train"):
            atomic.RunLock(tmp_path).acquire()
    finally:
        other.kill()
        other.wait()
    with atomic.RunLock(tmp_path) as lock:  # its process is gone: stale, taken over
        assert lock.owner()["pid"] == os.getpid()
    assert not (tmp_path / atomic.LOCK_FILE).exists()


# --- no state written outside the helper -------------------------------------------------------------

WRITE_CALLS = {"write_text", "write_bytes", "savefig", "to_csv", "save_pretrained", "save_file", "save_model",
               "dump"}
ALLOWED = {
    # Writers into a folder the helper stages (staged_folder) and then publishes whole:
    ("methods/whole_model.py", "save"), ("methods/trained_only.py", "save_trained_only"),
    ("methods/topro_soft.py", "save"), ("methods/lora.py", "save"), ("methods/prompt_tuning.py", "save"),
    ("methods/vanilla_causal.py", "save"), ("methods/topro_soft_causal.py", "save"),
    # Into a temporary path the helper commits (atomic.staged_file / staged_folder):
    ("reports.py", "_save_figure"), ("train.py", "export"),
    ("train.py", "save_state"), ("train.py", "save_resumable"),
    # Into a Ray checkpoint's temporary folder, which ray.train.report commits (Ray's own atomic upload):
    ("cluster/strategies.py", "checkpoint"), ("cluster/strategies.py", "save_model"),
    ("cluster/strategies.py", "save_rank_state"),
    # The tiny model's own atomic publish (mkdtemp + os.replace of the whole folder):
    ("models.py", "build_tiny_model"),
    # Temporary folders handed to MLflow and deleted after upload (not state a later command reads):
    ("tracking/llm_runs.py", "log_llm_run"),
    # The lock file that serialises a new SQLite store's schema creation (empty, not state):
    ("tracking/runs.py", "create_sqlite_store_once"),
    # Ray head/worker log files (append-only logs, not state):
    ("cluster/local_cluster.py", "_ray_start"),
    # The helper's own write into a staged folder (fault injection's partial file):
    ("atomic.py", "staged_folder"),
}


def state_writes() -> list[tuple[str, str, int, str]]:
    found = []
    root = REPO / "platform" / "topro"
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if not isinstance(node, ast.Call):
                    continue
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                owner = node.func.value if isinstance(node.func, ast.Attribute) else None
                if isinstance(owner, ast.Name) and owner.id == "atomic":
                    continue  # the helper itself
                if name == "save" and isinstance(owner, ast.Name) and owner.id == "torch":
                    name = "torch.save"
                elif name == "dump" and not (isinstance(owner, ast.Name) and owner.id in ("json", "yaml", "pickle")):
                    continue
                elif name == "open":
                    modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)] + [
                        k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
                    if not any(isinstance(m, str) and set(m) & set("wax") for m in modes):
                        continue
                elif name not in WRITE_CALLS and name != "torch.save":
                    continue
                found.append((rel, func.name, node.lineno, name))
    return found


def test_no_state_file_is_written_outside_the_helper():
    # A nested function counts under each enclosing function; allowed if any of them is.
    writes = {}
    for rel, func, line, name in state_writes():
        writes.setdefault((rel, line, name), set()).add(func)
    bad = [f"{rel}:{line} {name}() in {sorted(funcs)}" for (rel, line, name), funcs in sorted(writes.items())
           if not any((rel, f) in ALLOWED for f in funcs) and not (rel == "atomic.py")]
    assert not bad, "state written outside topro.atomic (route it through the helper or allowlist it):\n" + \
        "\n".join(bad)
