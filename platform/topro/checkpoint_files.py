"""Verified checkpoints: ``topro.json`` records each weight file's size and sha256 (Ray-free).

``record_weights`` runs on a staged export before it is published (``topro.atomic.staged_folder``);
``verify_checkpoint`` runs on every load (``topro.methods.load_checkpoint``: evaluate, serving, the
registry) and in ``topro verify``. A damaged checkpoint (a truncated or bit-flipped weight file, as a
killed copy or a full disk leaves) stops with one line naming the file, what was expected and what is
there. A checkpoint written by an older topro has no record: it loads, with a note.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from topro import atomic

log = logging.getLogger(__name__)

META_FILE = "topro.json"
RECORD_KEY = "weight_files"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
CHUNK = 8 << 20


class CheckpointDamaged(ValueError):
    """A weight file does not match its record in ``topro.json`` (the message is one line)."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def record_weights(folder: str | Path) -> dict[str, Any]:
    """Add ``{file: {"bytes", "sha256"}}`` of every weight file to ``folder/topro.json``; returns it."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text())
    meta[RECORD_KEY] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in weight_files(folder)}
    atomic.write_json(meta_path, meta, "checkpoint_record")
    return meta[RECORD_KEY]


def verify_checkpoint(folder: str | Path, *, hashes: bool = True) -> str:
    """Check every recorded weight file's size (and, with ``hashes``, its sha256); raises
    ``CheckpointDamaged`` with one line on the first mismatch. Returns what was checked, in words."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not a topro checkpoint (no {META_FILE})")
    try:
        record = json.loads(meta_path.read_text()).get(RECORD_KEY)
    except ValueError as err:
        raise CheckpointDamaged(f"checkpoint {folder} is damaged: {META_FILE} is not valid JSON ({err}); "
                                f"{_remedy()}") from err
    if record is None:
        note = (f"checkpoint {folder}: {META_FILE} records no weight-file sizes and hashes (written by an older "
                f"topro): loaded unverified")
        log.info("%s", note)
        return note
    for name, expected in record.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointDamaged(f"checkpoint {folder} is damaged: {name} is missing ({expected['bytes']} bytes "
                                    f"recorded in {META_FILE}); {_remedy()}")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointDamaged(f"checkpoint {folder} is damaged: {name} has {size} bytes, {META_FILE} records "
                                    f"{expected['bytes']}{' (truncated)' if size < expected['bytes'] else ''}; "
                                    f"{_remedy()}")
        if hashes:
            found = sha256_of(path)
            if found != expected["sha256"]:
                raise CheckpointDamaged(f"checkpoint {folder} is damaged: {name} has sha256 {found[:16]}..., "
                                        f"{META_FILE} records {expected['sha256'][:16]}... (same size: corrupted "
                                        f"bytes); {_remedy()}")
    return (f"checkpoint {folder}: {len(record)} weight file(s) match their recorded size"
            f"{' and sha256' if hashes else ''}")


def _remedy() -> str:
    return ("copy it again from where it came from, or retrain (a run's RUN/state resumes), or point at "
            "another checkpoint")
