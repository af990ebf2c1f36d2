"""What encrypted fields and data migrations cost, as ratios to the same work without them.

Each figure is ``with / without`` in operations per second, measured in the
same process on the same store, in alternating rounds (median of the rounds):

- ``get_state`` and ``update_state`` of a state with two encrypted fields,
  against a state of a plain type holding the same data;
- ``get_state`` of a record that a registered migration upgrades on read,
  against one already at the newest version;

and the throughput of ``flask states migrate`` and ``rotate-keys`` (states per
second). A report, not a test: it exits 0 whatever the figures are.

    .venv/bin/python benchmarks/bench_encryption.py [--quick] [--store sqlite|memory]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from cryptography.fernet import Fernet
from flask import Flask

from flask_statemanager import StateManager

DATA = {"ssn": "078-05-1120", "card": {"number": "4111111111111111"}, "plan": "pro", "n": 0}


def rate(fn: Callable[[], Any], seconds: float) -> float:
    """Calls of *fn* per second over about *seconds*."""
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        count += 1
    return count / elapsed


def ratio(ours: Callable[[], Any], base: Callable[[], Any], rounds: int, seconds: float) -> str:
    mine, theirs = [], []
    for _ in range(rounds):
        mine.append(rate(ours, seconds))
        theirs.append(rate(base, seconds))
    a, b = statistics.median(mine), statistics.median(theirs)
    return f"{a / b:5.2f}  ({a:8.0f} vs {b:8.0f} ops/s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short rounds, rough figures")
    parser.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    args = parser.parse_args()
    rounds, seconds, states = (3, 0.1, 300) if args.quick else (7, 0.5, 3000)

    manager = StateManager()
    manager.register_type("secret", encrypted_fields=["data.ssn", "data.card.number"])
    manager.register_type("plain")
    manager.register_type("evolving")
    with tempfile.TemporaryDirectory() as folder:
        app = Flask("bench", instance_path=folder)
        app.config["STATEMANAGER_ENCRYPTION_KEYS"] = [Fernet.generate_key()]
        if args.store == "memory":
            app.config["STATEMANAGER_STORE"] = "memory"
        manager.init_app(app)
        with app.app_context():
            manager.register_state("s", "secret", {"data": DATA})
            manager.register_state("p", "plain", {"data": DATA})
            manager.register_state("old", "evolving", {"data": DATA})
            manager.register_migration("evolving", "1.0", "2.0", lambda d: {**d, "tier": 1})
            manager.register_state("new", "evolving", {"data": {**DATA, "tier": 1}})

            print(f"store: {args.store}; ratios are with / without (1.00 = free)")
            print(
                "get_state, 2 encrypted fields     ",
                ratio(
                    lambda: manager.get_state("s"), lambda: manager.get_state("p"), rounds, seconds
                ),
            )
            print(
                "update_state, 2 encrypted fields  ",
                ratio(
                    lambda: manager.update_state("s", {"data": DATA}),
                    lambda: manager.update_state("p", {"data": DATA}),
                    rounds,
                    seconds,
                ),
            )
            print(
                "get_state, upgraded on read       ",
                ratio(
                    lambda: manager.get_state("old"),
                    lambda: manager.get_state("new"),
                    rounds,
                    seconds,
                ),
            )
            items = [
                {"state_id": f"e{i}", "state_type": "secret", "initial_data": {"data": DATA}}
                for i in range(states)
            ]
            manager.bulk_register(items)
            manager.register_migration("secret", "1.0", "2.0", lambda d: {**d, "tier": 1})
            start = time.perf_counter()
            run = manager.migrate_states("secret")
            sum(run.batches)
            took = time.perf_counter() - start
            print(f"migrate: {run.upgraded} states in {took:.2f} s ({run.upgraded / took:.0f}/s)")
            start = time.perf_counter()
            total, batches, counts = manager.rotate_encryption_keys()
            sum(batches)
            took = time.perf_counter() - start
            print(
                f"rotate-keys: {counts['states']} states and {counts['changes']} history entries "
                f"in {took:.2f} s ({(counts['states'] + counts['changes']) / took:.0f} documents/s)"
            )
    StateManager.reset_instance()


if __name__ == "__main__":
    main()
