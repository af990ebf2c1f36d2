"""A small Flask app built on flask-statemanager: user accounts and expiring carts.

Run it with ``python -m example_app`` (or ``flask --app example_app run``) and
try the JSON routes listed at ``GET /``. With no configuration the states live
in a SQLite file in the instance folder; any ``STATEMANAGER_*`` key can be set
from the environment with a ``FLASK_`` prefix, e.g.
``FLASK_STATEMANAGER_DATABASE_URI=postgresql://localhost/app``.

Definitions (types, validators, callbacks) are global and registered once, at
import; :func:`create_app` only binds the extension to a new app.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask
from marshmallow import Schema, fields, validate

from flask_statemanager import (
    StateExistsError,
    StateManager,
    StateTransition,
    StateType,
    signals,
)
from flask_statemanager.records import Change, State

logger = logging.getLogger(__name__)

#: The process-wide manager; every ``StateManager()`` call returns this object.
state_manager = StateManager()

#: How long an untouched cart lives, in seconds.
CART_TTL = 30 * 60


class UserSchema(Schema):
    """The ``data`` of a user state. Unknown fields are rejected."""

    email = fields.Email(required=True)
    plan = fields.String(load_default="free", validate=validate.OneOf(["free", "pro"]))
    role = fields.String(validate=validate.OneOf(["member", "admin"]))
    credits = fields.Integer(validate=validate.Range(min=0))


def admins_stay_active(candidate: Mapping[str, Any], transition: str) -> bool:
    """Transition guard: an admin account cannot be suspended."""
    return candidate["data"].get("role") != "admin"


def log_suspension(
    state_id: str, old_state: State | None, new_state: State, transition_type: str
) -> None:
    """Callback for ``user_suspended``: runs after the change is committed."""
    logger.warning("User %s was suspended (version %s).", state_id, new_state["version"])


def log_change(sender: Flask | None, *, change: Change, state_type: str, **extra: Any) -> None:
    """Receiver of the ``state_changed`` signal: one line per committed change."""
    logger.info(
        "%s %s -> v%s (%s) by %s",
        state_type,
        change["state_id"],
        change["version"],
        change["transition"],
        change["actor"] or "-",
    )


def define_states(manager: StateManager) -> None:
    """Register the types, validators and callbacks this app uses."""
    # "user" is a built-in type; registering it again adds a schema and a
    # search index on data.plan (status, type and updated_at are always indexed).
    manager.register_type(StateType.USER, schema=UserSchema, indexes=["data.plan"])
    manager.register_type("cart", default_ttl=CART_TTL)
    manager.register_validator(
        StateType.USER, admins_stay_active, transitions=[StateTransition.SUSPEND]
    )
    manager.register_callback("user_suspended", log_suspension)


define_states(state_manager)
signals.state_changed.connect(log_change)

#: Users created on first start when absent: ``{user_id: (payload, activate)}``.
DEMO_USERS: dict[str, tuple[dict[str, Any], bool]] = {
    "ada": (
        {
            "name": "Ada Lovelace",
            "data": {"email": "ada@example.com", "plan": "pro", "role": "admin", "credits": 100},
        },
        True,
    ),
    "grace": (
        {
            "name": "Grace Hopper",
            "data": {"email": "grace@example.com", "plan": "free", "role": "member", "credits": 10},
        },
        False,
    ),
}


def seed_demo_users(manager: StateManager) -> list[str]:
    """Create the demo users that are absent; safe to run at every start.

    :returns: the ids created by this call.
    """
    created = []
    for user_id, (payload, activate) in DEMO_USERS.items():
        if manager.get_state(user_id) is not None:
            continue
        try:
            manager.register_state(user_id, StateType.USER, payload, actor="seed")
        except StateExistsError:
            continue  # another process seeded it between our read and write
        if activate:
            manager.transition(user_id, StateTransition.ACTIVATE, actor="seed")
        created.append(user_id)
    return created


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app.

    :param config: settings applied last, e.g. ``{"STATEMANAGER_STORE": "memory"}``
        or ``{"EXAMPLE_SEED_DEMO_USERS": False}`` in tests.
    """
    app = Flask(__name__)
    app.config.from_mapping(
        EXAMPLE_SEED_DEMO_USERS=True,
        MAX_CONTENT_LENGTH=2 * 1024 * 1024,  # a little over STATEMANAGER_MAX_STATE_BYTES
    )
    app.config.from_prefixed_env()
    if config is not None:
        app.config.update(config)

    # StateManager.reset_instance() (as the pytest plugin calls it) forgets
    # every definition; put ours back so a fresh app always has them.
    if "cart" not in state_manager.types:
        define_states(state_manager)
    state_manager.init_app(app)

    from .views import bp

    app.register_blueprint(bp)

    if app.config["EXAMPLE_SEED_DEMO_USERS"]:
        with app.app_context():
            created = seed_demo_users(state_manager)
        if created:
            logger.info("Seeded demo users: %s", ", ".join(created))
    return app
