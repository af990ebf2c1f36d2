"""After the commit: blinker signals and registered callbacks.

Both run only for committed changes. A failing receiver or callback is logged
and counted, callbacks are retried ``STATEMANAGER_CALLBACK_RETRIES`` times, and
nothing here can undo or block the change that was committed.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import codec, signals
from .definitions import event_name
from .records import Change, State

if TYPE_CHECKING:
    from .extension import Runtime

logger = logging.getLogger("flask_statemanager")

#: ``fn(state_id, old_state, new_state, transition_type)``
Callback = Callable[[str, State | None, State, str], Any]


@dataclass(frozen=True, slots=True)
class Committed:
    """One committed change, as receivers and callbacks see it."""

    state_id: str
    state_type: str
    transition: str
    old_state: State | None
    new_state: State
    change: Change


class Callbacks:
    """Callbacks registered by event pattern (``"user_suspended"``, ``"user_*"``, ``"*"``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[tuple[str, Callback]] = []
        self._cache: dict[str, tuple[Callback, ...]] = {}

    def register(self, pattern: str, fn: Callback) -> None:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError("A callback event is a string like 'user_suspended' or 'user_*'.")
        if not callable(fn):
            raise TypeError(f"Callback for {pattern!r} must be callable, got {fn!r}.")
        with self._lock:
            self._entries.append((pattern, fn))
            self._cache.clear()

    def matching(self, event: str) -> tuple[Callback, ...]:
        """Callbacks whose pattern matches *event*, in registration order."""
        found = self._cache.get(event)
        if found is None:
            with self._lock:
                found = tuple(
                    fn for pattern, fn in self._entries if fnmatch.fnmatchcase(event, pattern)
                )
                self._cache[event] = found
        return found

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._cache.clear()


def listeners(
    callbacks: Callbacks, state_type: str, transition: str
) -> tuple[list[Any], tuple[Callback, ...]]:
    """The signals with receivers and the callbacks that a change of *state_type*
    by *transition* goes to (both empty: nothing to build an event for)."""
    sent = [
        s
        for s in (signals.state_changed, signals.BY_TRANSITION.get(transition))
        if s is not None and s.receivers
    ]
    return sent, callbacks.matching(f"{state_type}_{event_name(transition)}")


def dispatch(
    runtime: Runtime,
    event: Committed,
    sent: list[Any],
    matched: tuple[Callback, ...],
) -> None:
    """Send the signals (*sent*) and run the callbacks (*matched*) of one committed
    change, as :func:`listeners` found them.

    Listeners get copies of the records: one that changes ``new_state["data"]``
    never changes the record the write returned to its caller.
    """
    event = _private(event)
    kwargs = {
        "state_id": event.state_id,
        "state_type": event.state_type,
        "old_state": event.old_state,
        "new_state": event.new_state,
        "transition": event.transition,
        "change": event.change,
    }
    sender = runtime.app
    for signal in sent:
        for receiver in signal.receivers_for(sender):
            try:
                receiver(sender, **kwargs)
            except Exception:
                runtime.metrics.signal_error()
                logger.exception(
                    "Receiver %r of %s failed for state %r; the change stays committed.",
                    receiver,
                    signal.name,
                    event.state_id,
                )
    for fn in matched:
        if runtime.executor is None:
            _run_callback(runtime, fn, event)
        else:
            runtime.executor.submit(_run_in_app, runtime, fn, event)


def _private(event: Committed) -> Committed:
    """*event* with its own copies of every mutable part of the records."""

    def state(record: State | None) -> State | None:
        if record is None:
            return None
        return State(record, data=_copy(record["data"]), metadata=_copy(record["metadata"]))

    change = event.change
    new_state = state(event.new_state)
    assert new_state is not None
    return replace(
        event,
        old_state=state(event.old_state),
        new_state=new_state,
        change=Change(
            change,
            old_data=_copy(change["old_data"]),
            new_data=_copy(change["new_data"]),
            metadata=_copy(change["metadata"]),
        ),
    )


def _copy(value: Any) -> Any:
    return None if value is None else codec.loads(codec.dumps(value))


def _run_in_app(runtime: Runtime, fn: Callback, event: Committed) -> None:
    app = runtime.app
    if app is None:
        _run_callback(runtime, fn, event)
        return
    with app.app_context():
        _run_callback(runtime, fn, event)


def _run_callback(runtime: Runtime, fn: Callback, event: Committed) -> None:
    attempts = runtime.settings.callback_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            fn(event.state_id, event.old_state, event.new_state, event.transition)
            return
        except Exception:
            final = attempt == attempts
            runtime.metrics.callback_error(final)
            logger.warning(
                "Callback %r failed for %s of state %r (attempt %d of %d)%s",
                getattr(fn, "__qualname__", fn),
                event.transition,
                event.state_id,
                attempt,
                attempts,
                "; giving up, the change stays committed." if final else ".",
                exc_info=final,
            )


def make_executor(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="statemanager-callback")
