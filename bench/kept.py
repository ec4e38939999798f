"""The outputs of the single-measurement bench commands, kept under ``bench/results/``.

``python -m bench.rebuild_log`` and ``python -m bench.relay`` print what they
measured and keep it as ``bench/results/<name>.json``, with the command line,
the time and the load average it ran at, so that a figure quoted in the README
names a command and a file that hold it.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from ledger.store.engine import safe_url

RESULTS = Path(__file__).resolve().parent / "results"


def keep(name: str, measured: dict, directory: Path = RESULTS) -> Path:
    """Write ``measured`` to ``<directory>/<name>.json`` (``bench/results``); returns the path."""
    path = directory / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None else sys.argv[0]
    # a database URL's password never reaches a kept file
    args = [safe_url(a) if "://" in a else a for a in sys.argv[1:]]
    record = {
        "command": " ".join([program, *args]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "measured": measured,
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path
