"""A real ``celery-ledger web`` server and a real headless Chromium for the console's tests.

Chromium comes from Debian's packages: installed here when missing (as
conftest starts PostgreSQL), ``apt-get update`` first if the install fails.
Playwright drives that executable (``executable_path``); its own browser
downloads are never used. Every page a test opens records console messages and
uncaught errors; :func:`shoot` keeps a screenshot under ``test-artifacts/web/``
(git-ignored).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.kafka import free_port

CHROMIUM = "/usr/bin/chromium"
CLI = str(Path(sys.executable).parent / "celery-ledger")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "web"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WAIT_MS = 30_000  # a hang guard for what a page must show, not a speed check


def ensure_chromium() -> str:
    """The Chromium executable, installed from Debian's packages when missing."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.fail(f"{CHROMIUM} is missing and apt-get is not available to install it")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"apt-get install chromium failed: {done.stderr.strip().splitlines()[-1:]}")
    return CHROMIUM


class Server:
    """``celery-ledger web`` in its own process, on a free loopback port."""

    def __init__(self, db_url: str, *extra: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(
            [CLI, "web", "--db", db_url, "--port", str(self.port), *extra],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"celery-ledger web exited {self.proc.returncode}: {self.output()}")
            try:
                httpx.get(self.base + "/static/console.css", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        pytest.fail(f"celery-ledger web did not answer within 60 s: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server_for() -> Iterator:
    """``server_for(db_url, *args)`` starts a server; all are stopped after the module."""
    started: list[Server] = []

    def start(db_url: str, *extra: str) -> Server:
        started.append(Server(db_url, *extra))
        return started[-1]

    yield start
    for s in started:
        s.stop()


class Console:
    """Pages of one Chromium profile; ``errors`` collects console errors and page errors."""

    def __init__(self, context) -> None:
        self.context = context
        self.errors: list[str] = []

    def open(self, url: str):
        page = self.context.new_page()
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"{url}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"{url}: {e}"))
        response = page.goto(url)
        assert response is not None and response.ok, f"{url}: {response and response.status}"
        return page


@pytest.fixture(scope="module")
def chromium() -> Iterator[Console]:
    """A headless Chromium with a fresh profile (user data dir) for the module."""
    from playwright.sync_api import sync_playwright

    executable = ensure_chromium()
    profile = tempfile.mkdtemp(prefix="ledger-chromium-")
    with sync_playwright() as pw:
        # launch_persistent_context passes the profile as --user-data-dir.
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(WAIT_MS)
        try:
            yield Console(context)
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def shoot(page, name: str, down_to: str | None = None) -> Path:
    """Keep a screenshot as a test artifact: the full page, or its top down to a selector."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    if down_to is None:
        page.screenshot(path=str(path), full_page=True)
    else:
        box = page.locator(down_to).bounding_box()
        width = page.viewport_size["width"]
        page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": width,
                                              "height": box["y"] + box["height"] + 16})
    return path
