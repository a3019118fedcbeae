"""A full disk while ``topro train`` saves, on a real small tmpfs (CI runs as root; skipped where mounting is
not allowed): one line naming the path, the bytes needed and the space left; the last good export intact;
the rerun finishes once space is freed."""
from __future__ import annotations

import json
import subprocess

import pytest

from topro.checkpoint_files import verify_checkpoint
from topro.cli import main


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()

    def mount(size: str, remount: bool = False) -> None:
        options = f"remount,size={size}" if remount else f"size={size}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")

    yield folder, mount
    subprocess.run(["umount", str(folder)], capture_output=True)


def train(out, data_dir) -> int:
    return main(["train", "--config", "configs/train/udpos-vanilla.yaml", "--data-dir", str(data_dir), "--output",
                 str(out), "max_train_sentences=48", "max_dev_sentences=16", "epochs=2", "batch_size=4",
                 "grad_accum=2", "eval_every_steps=4", "eval_langs=[]", "progress=false"])


@pytest.mark.slow
def test_disk_full_at_the_first_save(small_disk, data_dir, tiny_udpos, capsys):
    folder, mount = small_disk
    mount("1m")  # less than one export (2.6 MB)
    out = folder / "run"
    assert train(out, data_dir) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"topro train: error: no space left on device writing {out}/checkpoint: it needs about ")
    assert "free on that filesystem" in line and "rerun the same command" in line
    assert sorted(p.name for p in out.iterdir()) == [".topro.lock"] or sorted(p.name for p in out.iterdir()) == []


@pytest.mark.slow
def test_disk_full_at_a_later_save_keeps_the_previous_export_and_the_rerun_finishes(small_disk, data_dir, tiny_udpos,
                                                                                       capsys):
    folder, mount = small_disk
    mount("4m")  # one export, not two: the second improvement's export cannot be staged beside the first
    out = folder / "run"
    assert train(out, data_dir) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"no space left on device writing {out}/checkpoint: it needs about 2." in line
    assert "MB free on that filesystem; nothing was overwritten" in line
    assert (out / "checkpoint").is_symlink()
    verify_checkpoint(out / "checkpoint")  # the earlier export, whole
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "checkpoint.v1"]  # no leftovers
    mount("32m", remount=True)  # space freed
    assert train(out, data_dir) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    verify_checkpoint(out / "checkpoint")
    # Two epochs, whole: steps per epoch depend on the tiny tokenizer's lengths (its trainer is not
    # deterministic from one build to the next: 6 or 7 here), so they are read, not hard-coded.
    assert metrics["steps"] == 2 * metrics["steps_per_epoch"] > 4 and not (out / "state").exists()
