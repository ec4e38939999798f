"""Celery's integration suite for the installed Celery, fetched once and patched in a copy.

The suite ships in Celery's sdist (``t/``), not in the wheel. The sdist is
downloaded with pip into ``build/conformance`` (git-ignored) and kept there; each
run gets a fresh copy of ``t/`` with two changes, both made by pattern so a new
Celery version either patches cleanly or stops the run with a clear line:

* the "Requires redis result backend" gates also open for ``ledger+`` backends:
  the behaviours behind them (errbacks, chord errors, frozen chords, ...) do not
  depend on the backend, only the suite's helpers that count calls use Redis;
* the suite's own Redis helper connection (call counters, echo lists, and the
  Redis backend's chord keys in one test) uses the database number in
  ``REDIS_DB`` instead of 0, so concurrent runs on other database numbers do not
  see each other's keys.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "conformance"

#: ``result_backend.startswith('redis')`` / ``.startswith(('redis', 'rpc'))`` at a gate
_GATE = re.compile(r"""result_backend\.startswith\(\(?((?:['"]\w+['"],?\s*)+)\)?\)""")
_HELPER = "StrictRedis(host=host, port=port, "
_HELPER_DB = 'StrictRedis(host=host, port=port, db=int(os.environ.get("REDIS_DB", "0")), '


class SuiteError(RuntimeError):
    """The suite could not be fetched or patched."""


def celery_version() -> str:
    return version("celery")


def sdist(ver: str) -> Path:
    """The sdist of Celery ``ver``, downloaded from the package index on first use."""
    cached = sorted(CACHE.glob(f"celery-{ver}.tar.gz"))
    if cached:
        return cached[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
           "--no-deps", f"celery=={ver}", "-d", str(CACHE)]
    if subprocess.run(cmd).returncode != 0:
        raise SuiteError(f"could not download Celery {ver}'s sdist: {' '.join(cmd)}")
    cached = sorted(CACHE.glob(f"celery-{ver}.tar.gz"))
    if not cached:
        raise SuiteError(f"pip downloaded no celery-{ver}.tar.gz into {CACHE}")
    return cached[0]


def prepare(workdir: Path) -> Path:
    """A patched copy of the installed Celery's ``t/`` in ``workdir``; returns ``workdir``.

    ``workdir`` also gets the sdist's ``pyproject.toml`` (the suite's pytest
    options: markers, ``python_classes``, ``xfail_strict``) but not the sdist's
    ``celery/`` package, which would shadow the installed one.
    """
    ver = celery_version()
    archive = sdist(ver)
    top = f"celery-{ver}"
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(f"{top}/t/") or m.name == f"{top}/pyproject.toml"]
        tar.extractall(workdir, members=members, filter="data")
    for item in (workdir / top).iterdir():
        item.rename(workdir / item.name)
    (workdir / top).rmdir()
    _open_gates(workdir / "t" / "integration")
    _helper_db(workdir / "t" / "integration" / "tasks.py")
    return workdir


def _open_gates(integration: Path) -> None:
    opened = 0
    for path in integration.glob("test_*.py"):
        text = path.read_text()
        new, n = _GATE.subn(_with_ledger, text)
        if n:
            path.write_text(new)
            opened += n
    if not opened:
        raise SuiteError(f"found no 'Requires redis result backend' gate to open in {integration}")


def _with_ledger(match: re.Match) -> str:
    prefixes = [p.strip().strip("'\"") for p in match.group(1).split(",") if p.strip()]
    if "redis" not in prefixes:
        return match.group(0)
    return f"result_backend.startswith({tuple(prefixes + ['ledger+'])!r})"


def _helper_db(tasks: Path) -> None:
    text = tasks.read_text()
    if _HELPER not in text:
        raise SuiteError(f"the suite's Redis helper changed: no {_HELPER!r} in {tasks}")
    tasks.write_text(text.replace(_HELPER, _HELPER_DB, 1))
