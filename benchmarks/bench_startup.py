"""Start-up cost of the SQLite tables: Alembic migrations against ``create_all``.

``init_app`` on SQLite makes or checks the tables at every start. Since they
evolve through Alembic migrations, that is ``SQLStore.setup()``: a check of
the version table, and Alembic (imported only then) when the tables are
missing or behind. The baseline is what start-up did before, the model's
``metadata.create_all(checkfirst=True)``; both sides also open the engine.

Each figure is the median of fresh processes (imports included, as at a real
start), for a new SQLite file and for one already at the newest revision.

Usage::

    .venv/bin/python benchmarks/bench_startup.py [--runs 15]

A report, not a test: the exit code is 0 whatever the figures are.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_MEASURE = """
import sys, time
from flask_statemanager.config import DEFAULTS, Settings
from flask_statemanager.stores import make_engine
from flask_statemanager.stores.sql import SQLStore

folder, how = sys.argv[1], sys.argv[2]
start = time.perf_counter()
engine = make_engine(f"sqlite:///{folder}/statemanager.sqlite3", Settings.from_mapping(DEFAULTS))
store = SQLStore(engine)
if how == "migrations":
    store.setup([])
else:
    store.metadata.create_all(engine, checkfirst=True)
engine.dispose()
print((time.perf_counter() - start) * 1000)
"""


def _run(folder: Path, how: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(folder), how],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip())


def _median(how: str, fresh: bool, runs: int) -> float:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs + 1):
            folder = Path(tmp, f"run{i}" if fresh else "warm")
            folder.mkdir(exist_ok=True)
            took = _run(folder, how)
            if fresh or i > 0:  # the first warm run only makes the file
                times.append(took)
    return statistics.median(times[:runs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="processes per figure")
    runs = parser.parse_args().runs
    print(f"SQLite start-up, median of {runs} fresh processes (ms, imports included)")
    for label, fresh in (("new file", True), ("at newest revision", False)):
        ours = _median("migrations", fresh, runs)
        baseline = _median("create_all", fresh, runs)
        print(
            f"  {label:<20} migrations {ours:7.1f}   create_all {baseline:7.1f}   "
            f"added {ours - baseline:+7.1f}"
        )


if __name__ == "__main__":
    main()
