"""Headless Chromium (the Debian `chromium` package; tests/browser-setup.sh installs it):
screenshots of a report and its rendered DOM, for the README figure and the browser test."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    override = os.environ.get("LLMCBENCH_CHROMIUM")
    if override:
        return override if shutil.which(override) or Path(override).is_file() else None
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def _run(args: list[str], timeout_s: int) -> subprocess.CompletedProcess:
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium not found: install it with tests/browser-setup.sh (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="llmcbench-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               "--hide-scrollbars", f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2000, timeout_s: int = 120) -> Path:
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    proc = _run([f"--screenshot={png}", f"--window-size={width},{height}", Path(page).resolve().as_uri()], timeout_s)
    if not png.is_file() or png.stat().st_size == 0:
        last = next((ln.strip() for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "no message")
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {last[-300:]}")  # one line of its stderr
    return png


def dump_dom(page: Path, timeout_s: int = 120) -> str:
    """The DOM after the page's load event (scripts run, images decoded)."""
    proc = _run(["--virtual-time-budget=5000", "--dump-dom", Path(page).resolve().as_uri()], timeout_s)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"chromium --dump-dom failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout
