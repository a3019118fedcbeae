"""Atomic writes of run state, and one writer per run folder (floor 1: standard library only).

Every file or folder that a later command reads back (``metrics.json``, ``eval.json``, predictions,
reports, the sweep's state and MLflow spool, checkpoint exports, the resumable training state) is
written here, so a kill, a full disk or a write error at any moment leaves either the old or the new
content, never a mix:

- a file is written to a temporary file beside it (``.NAME.tmp-PID-XXXX.SUFFIX``), flushed and
  fsynced, then ``os.replace``d over the target, and the folder is fsynced (the rename survives a crash);
- a folder (``RUN/checkpoint``, ``RUN/state``) is versioned: each save fills a temporary folder,
  fsyncs it, renames it to ``NAME.vN`` and then atomically swaps the symlink ``NAME -> NAME.vN`` (a new
  link ``os.replace``d over the old one). ``RUN/checkpoint`` stays a path that ``topro evaluate``,
  serving and the registry load as before; the previous version stays readable until the new one is
  complete and is removed only after the swap. A folder written by an older topro (a real folder, not
  a link) becomes ``NAME.v0`` at the first save.

Leftovers of an interrupted save (temporary files and folders of dead processes, versions no link
points to) are removed by ``clean_leftovers`` when the next run starts. ``ENOSPC`` and permission errors
while saving become one ``StateWriteError`` line naming the path, the bytes needed and the space left.

Object stores (``s3://`` ``storage_path``) have no rename and no lock: there Ray Train's checkpoints are
the state, and what applies instead is a commit marker written last and read first (Ray's checkpoint
manager snapshot); this module handles local and mounted folders only.

Every call site names itself with a *site* (``SITES`` lists them): the fault tests iterate over the
sites, and ``TOPRO_FAULT_WRITE=SITE:KIND`` (testing aid; KIND ``kill``, ``enospc`` or ``eacces``) makes
the write at SITE die by SIGKILL or fail after writing half of its bytes.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

SITES: dict[str, str] = {
    "metrics": "RUN/metrics.json: a training run's summary (local loop and Ray driver)",
    "loop_state": "loop_state.json in a Ray checkpoint or RUN/state: where the loop resumes",
    "checkpoint_export": "RUN/checkpoint -> checkpoint.vN: the best model's export (local loop, Ray copy)",
    "checkpoint_record": "topro.json's weight-file record, written into a staged export",
    "training_state": "RUN/state -> state.vN: model, optimizer, scheduler, RNG states (local loop)",
    "eval_results": "eval.json and other results JSON written by topro evaluate / train",
    "eval_predictions": "X.predictions.json: per-sentence predictions beside a results JSON",
    "tracking_eval": "eval.json / predictions in an evaluation's MLflow artifact folder",
    "report_csv": "per-language CSV reports",
    "report_plot": "per-language plots (PNG)",
    "report_text": "report.md / significance.json / compare output",
    "sweep_state": "the sweep's resume state (sweep_state.json)",
    "sweep_summary": "topro sweep --summary FILE",
    "mlflow_spool": "the sweep's MLflow spool of trial records kept during a tracking outage",
    "trial_placement": "a Tune trial's placement record",
    "derived_task_data": "a task's files derived from others (python -m topro.data.classification: panx_type)",
}
"""Every write site: name -> what it writes."""

FAULT_ENV = "TOPRO_FAULT_WRITE"
NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)
TMP_MARK = ".tmp-"
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+")


class StateWriteError(RuntimeError):
    """A save failed for lack of space or permission; the message is one line saying what to do."""


def _check_site(site: str) -> None:
    if site not in SITES:
        raise KeyError(f"unknown write site {site!r}: add it to topro.atomic.SITES")


def _fault(site: str) -> str | None:
    spec = os.environ.get(FAULT_ENV, "")
    name, _, kind = spec.partition(":")
    return kind if name == site else None


def _inject(site: str) -> None:
    """Testing aid: at the worst moment (half the bytes written, nothing committed)."""
    kind = _fault(site)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif kind == "eacces":
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))


def _tmp_path(path: Path) -> Path:
    # The suffix stays last: writers such as matplotlib pick the format from it.
    return path.with_name(f".{path.stem}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}{path.suffix}")


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems cannot open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _errno_of(err: BaseException, target: Path, needed: int | None) -> int | None:
    """The errno behind a failed write. Writers that wrap the OS error (safetensors' ``SafetensorError``,
    torch's ``PytorchStreamWriter`` RuntimeError) lose it: their message, or a filesystem with less free
    space than the save needs, tells."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    text = str(err)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return errno.ENOSPC
    if "Permission denied" in text or "Read-only file system" in text:
        return errno.EACCES
    free = free_bytes(target.parent)
    if needed and free is not None and free < needed:
        return errno.ENOSPC
    return None


def _write_error(err: BaseException, target: Path, needed: int | None) -> BaseException:
    """``err`` as one clear line when it is a lack of space or permission; else ``err`` itself."""
    code = _errno_of(err, target, needed) if isinstance(err, Exception) else None
    if code in NO_SPACE:
        free = free_bytes(target.parent)
        need = f"about {human_bytes(needed)}" if needed else "more space"
        left = f"{human_bytes(free)} free" if free is not None else "free space unknown"
        return StateWriteError(
            f"no space left on device writing {target}: it needs {need}, {left} on that filesystem; "
            f"nothing was overwritten (the last complete export and resumable state are intact): free "
            f"space and rerun the same command to continue")
    if code in REFUSED:
        return StateWriteError(
            f"cannot write {target}: {os.strerror(code)}; nothing was overwritten: make the folder "
            f"writable (or choose another --output) and rerun the same command")
    return err


# --- files ---------------------------------------------------------------------------------------------


@contextmanager
def staged_file(path: str | Path, site: str, needed: int | None = None) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to (by any writer: csv, savefig); on a clean
    exit it is fsynced and renamed over ``path``, else removed."""
    _check_site(site)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        yield tmp
        if _fault(site):
            _inject(site)
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        clear = _write_error(err, path, needed)
        if clear is err:
            raise
        raise clear from err


def write_bytes(path: str | Path, data: bytes, site: str) -> Path:
    """``path`` holds ``data`` or its old content, never part of ``data``."""
    with staged_file(path, site, needed=len(data)) as tmp:
        with open(tmp, "wb") as f:
            if _fault(site):
                f.write(data[:len(data) // 2])
                f.flush()
                _inject(site)
            f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, site: str) -> Path:
    return write_bytes(path, text.encode("utf-8"), site)


def write_json(path: str | Path, data: Any, site: str, **dump_options: Any) -> Path:
    """``json.dumps(data, indent=2, **dump_options)`` written atomically."""
    return write_text(path, json.dumps(data, **{"indent": 2, **dump_options}), site)


# --- versioned folders ---------------------------------------------------------------------------------


def version_of(name: str, entry: str) -> int | None:
    match = re.fullmatch(re.escape(name) + r"\.v(\d+)", entry)
    return int(match.group(1)) if match else None


def versions(target: Path) -> dict[int, Path]:
    """The ``NAME.vN`` folders beside ``target``, by N."""
    if not target.parent.is_dir():
        return {}
    found = {}
    for entry in target.parent.iterdir():
        n = version_of(target.name, entry.name)
        if n is not None and entry.is_dir() and not entry.is_symlink():
            found[n] = entry
    return found


def current_version(target: Path) -> Path | None:
    """The version folder ``target`` points to (``target`` itself for a plain folder), or None."""
    if target.is_symlink():
        resolved = target.parent / os.readlink(target)
        return resolved if resolved.is_dir() else None
    return target if target.is_dir() else None


def folder_bytes(folder: Path | None) -> int:
    if folder is None or not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextmanager
def staged_folder(target: str | Path, site: str, needed: int | None = None) -> Iterator[Path]:
    """A fresh temporary folder to write ``target``'s new version into; on a clean exit it becomes
    ``target.vN`` and ``target`` (a symlink) points to it, the older versions are removed. On an error
    or a kill ``target`` still points to the previous, complete version. ``needed``: the bytes the save
    takes (for the disk-full message; default: the size of the current version)."""
    _check_site(site)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir()
    try:
        yield tmp
        if _fault(site):
            (tmp / "partial").write_bytes(b"\0" * 1024)
            _inject(site)
        for file in tmp.rglob("*"):
            if file.is_file() and not file.is_symlink():
                _fsync_file(file)
        fsync_dir(tmp)
        _publish(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, StateWriteError):
            raise  # a file staged inside this folder already said it
        clear = _write_error(err, target, needed or folder_bytes(current_version(target)))
        if clear is err:
            raise
        raise clear from err


def _publish(tmp: Path, target: Path) -> None:
    if target.exists() and not target.is_symlink():
        # A folder written in place by an older topro: it becomes version 0 (for the moment of this
        # rename, target is absent).
        os.replace(target, target.with_name(f"{target.name}.v0"))
    number = max(versions(target), default=0) + 1
    version = target.with_name(f"{target.name}.v{number}")
    os.replace(tmp, version)
    link = target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}.link")
    os.symlink(version.name, link)  # relative: the run folder can be moved or copied whole
    os.replace(link, target)
    fsync_dir(target.parent)
    for n, old in versions(target).items():
        if n != number:
            shutil.rmtree(old, ignore_errors=True)


def remove_folder(target: str | Path) -> None:
    """Remove a versioned folder: the link first (readers see it gone at once), then its versions."""
    target = Path(target)
    if target.is_symlink():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    for old in versions(target).values():
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(folder: str | Path, names: tuple[str, ...] = ()) -> list[Path]:
    """Remove what interrupted saves left in ``folder``: temporary files and folders of processes that
    are gone, and the ``NAME.vN`` versions of ``names`` that their link does not point to. Returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _TMP_NAME.match(entry.name)
        if match and (int(match.group("pid")) == os.getpid() or not _pid_alive(int(match.group("pid")))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    for name in names:
        target = folder / name
        keep = current_version(target)
        for old in versions(target).values():
            if keep is None or old.resolve() != keep.resolve():
                shutil.rmtree(old, ignore_errors=True)
                removed.append(old)
    return removed


# --- one writer per run ----------------------------------------------------------------------------------

LOCK_FILE = ".topro.lock"


class RunLocked(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """``FOLDER/.topro.lock`` holding the owner's pid, host and command: one writer per run folder.

    Created with ``O_EXCL``; a lock whose process is gone (same host, pid not alive) is stale and taken
    over. A lock of another host cannot be checked: the message says to remove it if that run is over.
    """

    def __init__(self, folder: str | Path, what: str = "run", file_name: str = LOCK_FILE):
        self.path = Path(folder) / file_name
        self.what = what
        self.held = False

    def owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(__import__("sys").argv)[:300]}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self.owner()
                if other is None:  # being written this instant, or garbage: look again
                    time.sleep(0.05)
                    other = self.owner()
                if other is not None and other.get("host") == me["host"] and not _pid_alive(int(other["pid"])):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                if other is None:
                    self.path.unlink(missing_ok=True)
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other.get("started", 0)))
                raise RunLocked(
                    f"{self.path.parent} is in use by another {self.what}: pid {other.get('pid')} on host "
                    f"{other.get('host')} since {since} ({other.get('command', '?')}); wait for it, stop it, or "
                    f"use another folder (if that process is gone, delete {self.path})")
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise RunLocked(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            other = self.owner()
            if other is not None and other.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
