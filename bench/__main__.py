"""``python -m bench`` (``make bench``): the interleaved benchmark; ``--quick`` for a short run."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import report
from bench.args import positive_float, positive_int
from bench.contenders import Environment
from bench.run import OPERATIONS, Settings, progress, run_bench

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None) -> tuple[Settings, Path, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="2 rounds of 0.5 s measurements (< 2 min)")
    p.add_argument("--rounds", type=positive_int, help="rounds (default 5; 2 with --quick)")
    p.add_argument("--seconds", type=positive_float,
                   help="seconds per timed measurement (default 2; 0.5 with --quick)")
    p.add_argument("--chords", type=positive_int, help="chords of each size per round and backend (default 3)")
    p.add_argument("--only", help="comma-separated backends, e.g. redis,db+sqlite,'postgresql (raw)'")
    p.add_argument("--ops", help=f"comma-separated operations: {','.join(OPERATIONS)}")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for <date>.json and latest.json")
    a = p.parse_args(argv)
    s = Settings()
    if a.quick:
        s.rounds, s.seconds, s.chords_per_round = 2, 0.5, 2
        s.rebuild_events, s.relay_events = 100_000, 20_000
    s.rounds = a.rounds or s.rounds
    s.seconds = a.seconds or s.seconds
    s.chords_per_round = a.chords or s.chords_per_round
    s.only = set(a.only.split(",")) if a.only else None
    if a.ops:
        unknown = set(a.ops.split(",")) - set(OPERATIONS)
        if unknown:
            p.error(f"unknown operation(s) {', '.join(sorted(unknown))}; choose from {', '.join(OPERATIONS)}")
        s.ops = set(a.ops.split(","))
    return s, a.out, a


def main(argv: list[str] | None = None) -> int:
    settings, out, args = parse(argv)
    started = time.monotonic()
    env = Environment().open()
    try:
        results = run_bench(settings, env)
        meta = {
            "date": report.stamp(),
            "machine": report.machine(env.pg_url),
            "settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(settings).items()},
            "skipped": results.skipped,
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        env.close()
    rs = report.rows(results)
    ts = report.targets(rs)
    m = meta["machine"]
    print(f"\ncelery-ledger bench, {meta['date']}: {m.get('cpus')} CPUs ({m.get('cpu', '?')}), "
          f"{m.get('memory_gb', '?')} GB, PostgreSQL {m.get('postgresql', '?')}, Redis {m.get('redis', '?')}; "
          f"{settings.rounds} rounds x {settings.seconds} s, medians\n")
    print(report.table(rs))
    for name, why in results.skipped.items():
        print(f"  skipped {name}: {why}")
    print("\nTargets (same run):")
    print(report.targets_text(ts))
    print("\nMarkdown:\n")
    print(report.markdown(rs))
    kept = report.kept_rows(RESULTS)
    if kept:
        # Not measured by this run: each row names its own command, date and load.
        print("\nKept from the last 1,000,000-task runs (NOT this run):\n")
        print(report.kept_markdown(kept))
    for path in (out / f"{meta['date']}.json", out / "latest.json"):
        report.write_json(path, rs, ts, meta)
    progress(f"\nwrote {out / 'latest.json'} in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
