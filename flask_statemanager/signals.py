"""Blinker signals sent after every committed change.

The sender is the Flask application the change was made in (``None`` when the
manager runs outside any app). Every signal is sent with the same keyword
arguments: ``state_id``, ``state_type``, ``old_state`` (``None`` on create),
``new_state``, ``transition`` and ``change`` (the history entry). Receivers
should accept ``**extra`` so new arguments can be added later.

Signals are sent after the commit: a receiver sees committed data, and an
exception in a receiver is logged and counted but never undoes the change.
History is written by the engine, never by a receiver.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: Sent for every committed change, whatever its transition.
state_changed = _signals.signal("state-changed")
#: Sent after a state is registered (transition ``create``).
state_created = _signals.signal("state-created")
#: Sent after ``update_state``/``patch_state``/``rollback`` (transition ``update``).
state_updated = _signals.signal("state-updated")
#: Sent after transition ``activate``.
state_activated = _signals.signal("state-activated")
#: Sent after transition ``suspend``.
state_suspended = _signals.signal("state-suspended")
#: Sent after transition ``resume``.
state_resumed = _signals.signal("state-resumed")
#: Sent after transition ``expire``, including TTL expiry (actor ``"ttl"``).
state_expired = _signals.signal("state-expired")
#: Sent after a state is deleted (transition ``delete``).
state_deleted = _signals.signal("state-deleted")

#: The signal sent for each built-in transition, besides :data:`state_changed`.
BY_TRANSITION = {
    "create": state_created,
    "update": state_updated,
    "activate": state_activated,
    "suspend": state_suspended,
    "resume": state_resumed,
    "expire": state_expired,
    "delete": state_deleted,
}
