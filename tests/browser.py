"""Headless Chromium for the browser tests: Debian's ``chromium`` (scripts/install.sh installs it) driven by
Playwright's Python package through ``executable_path``, so no browser is downloaded. Screenshots go to
``$TOPRO_SCREENSHOTS`` (default ``outputs/screenshots/``), a folder the tests print."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("TOPRO_CHROMIUM", "/usr/bin/chromium")


def screenshot_dir(name: str) -> Path:
    folder = Path(os.environ.get("TOPRO_SCREENSHOTS", REPO / "outputs" / "screenshots")) / name
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode} before {url} answered")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


@contextlib.contextmanager
def mlflow_ui(tracking_uri: str, log_file: Path):
    """A real ``mlflow ui`` on 127.0.0.1 (one web worker, no job workers); yields its base URL."""
    port = free_port()
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_file, "w") as log:
        proc = subprocess.Popen([mlflow, "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health", 180, proc)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def chromium_page(width: int = 1600, height: int = 1000):
    """A page of headless Debian chromium (never skipped: a missing browser fails the test, naming it)."""
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: run scripts/install.sh (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()
