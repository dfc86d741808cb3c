"""Headless Chromium for the tests that look at the HTML report; they skip where there is none."""

from __future__ import annotations

import shutil
import subprocess

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium() -> str:
    """The Chromium binary, else the test is skipped."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        pytest.skip("no headless Chromium here (apt-get install chromium)")
    return found


def run_chromium(url: str, *args: str, profile) -> subprocess.CompletedProcess:
    """One headless Chromium run on `url` with a fresh profile folder (the network is never needed)."""
    return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args, url], capture_output=True,
                          text=True, timeout=120)
