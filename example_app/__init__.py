"""A small Flask app built on flask-statemanager: user accounts and expiring carts.

Run it with ``python -m example_app`` (or ``flask --app example_app run``) and
try the JSON routes listed at ``GET /``. With no configuration the states live
in a SQLite file in the instance folder; any ``STATEMANAGER_*`` key can be set
from the environment with a ``FLASK_`` prefix, e.g.
``FLASK_STATEMANAGER_DATABASE_URI=postgresql://localhost/app``.

What it shows, besides states, lifecycles and history:

* **Encryption at rest**: a user's ``data.phone`` is stored encrypted (the API
  and the CLI see plaintext). The keys come from ``STATEMANAGER_ENCRYPTION_KEYS``
  in the environment (a comma-separated list, newest first). Without one, a
  *development* key is generated once into ``instance/dev-encryption.key``, with
  a warning at every start: never run like that in production, where losing
  that file means losing every phone number.
* **A data migration**: carts moved from schema ``"1.0"`` (items with ``qty``)
  to ``"1.1"`` (items with ``quantity``); carts stored by the old release are
  read upgraded, and ``flask --app example_app states migrate`` rewrites them.
* **Retention and limits**: a cart keeps its newest 20 history entries once
  ``flask --app example_app states prune`` runs (from cron), and at most 10 000
  carts are live at once.
* **Audit and operations**: ``GET /states/<id>/verify`` checks a state's
  hash-chained history (``flask --app example_app states verify`` checks all);
  ``init_app`` adds ``/health``, ``/health/live``, ``/health/ready`` and, with
  the ``metrics`` extra, ``/metrics``.

Definitions (types, validators, migrations, callbacks) are global and
registered once, at import; :func:`create_app` only binds the extension to a
new app.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Mapping
from pathlib import Path
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
#: History entries ``flask states prune`` keeps per cart: each added item is one.
CART_HISTORY = 20
#: Most live carts at once; one more is refused with a 422 (a runaway client).
MAX_CARTS = 10_000
#: Where a development encryption key is kept when none is configured.
DEV_KEY_FILE = "dev-encryption.key"


class UserSchema(Schema):
    """The ``data`` of a user state. Unknown fields are rejected."""

    email = fields.Email(required=True)
    plan = fields.String(load_default="free", validate=validate.OneOf(["free", "pro"]))
    role = fields.String(validate=validate.OneOf(["member", "admin"]))
    credits = fields.Integer(validate=validate.Range(min=0))
    #: E.164, e.g. "+263771234567"; stored encrypted (see define_states).
    phone = fields.String(
        validate=validate.Regexp(r"^\+[1-9][0-9]{6,14}$", error="Use E.164: +<country><number>.")
    )


class CartItemSchema(Schema):
    """One line of a cart (schema 1.1)."""

    sku = fields.String(required=True, validate=validate.Length(min=1, max=64))
    quantity = fields.Integer(required=True, strict=True, validate=validate.Range(min=1, max=999))


class CartSchema(Schema):
    """The ``data`` of a cart state (schema 1.1)."""

    items = fields.List(fields.Nested(CartItemSchema), required=True)


def quantity_not_qty(data: dict[str, Any]) -> dict[str, Any]:
    """Cart migration 1.0 -> 1.1: each item's ``qty`` became ``quantity``.

    It runs on every read of a 1.0 cart until the cart is written again, so it
    is pure and never raises, whatever an old record holds.
    """
    items = data.get("items")
    if isinstance(items, list):
        data["items"] = [
            {("quantity" if key == "qty" else key): value for key, value in item.items()}
            if isinstance(item, dict) and "quantity" not in item
            else item
            for item in items
        ]
    return data


def admins_stay_active(candidate: Mapping[str, Any], transition: str) -> bool:
    """Transition guard: an admin account cannot be suspended."""
    return bool(candidate["data"].get("role") != "admin")


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
    # data.phone is encrypted at rest: readable through the API, ciphertext in
    # the database. It cannot be indexed nor searched on.
    manager.register_type(
        StateType.USER, schema=UserSchema, indexes=["data.plan"], encrypted_fields=["data.phone"]
    )
    manager.register_type(
        "cart",
        default_ttl=CART_TTL,
        schema=CartSchema,
        keep_history=CART_HISTORY,  # applied by `flask states prune`
        max_states=MAX_CARTS,
    )
    manager.register_migration("cart", "1.0", "1.1", quantity_not_qty)
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
            "data": {
                "email": "ada@example.com",
                "plan": "pro",
                "role": "admin",
                "credits": 100,
                "phone": "+447700900123",
            },
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


def dev_encryption_key(instance_path: str) -> str:
    """The development key in *instance_path*, generated on first use.

    FOR DEVELOPMENT ONLY, like a ``SECRET_KEY`` left in the instance folder: the
    key sits next to the database it protects, and whoever deletes the file can
    no longer read a single encrypted field. In production set
    ``STATEMANAGER_ENCRYPTION_KEYS`` from a secret manager instead.
    """
    path = Path(instance_path) / DEV_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside, then linked into place: a process starting at the same
        # time (the reloader's child) never reads a half-written file, and the
        # first link wins, so every process ends up with the same key.
        spare = path.with_name(f".{DEV_KEY_FILE}.{os.getpid()}")
        fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(base64.urlsafe_b64encode(os.urandom(32)) + b"\n")  # a Fernet key
        try:
            os.link(spare, path)
            logger.warning("Generated a development encryption key in %s.", path)
        except FileExistsError:
            pass
        finally:
            spare.unlink()
    return path.read_text("ascii").strip()


def _configure_encryption(app: Flask) -> None:
    """Set ``STATEMANAGER_ENCRYPTION_KEYS``: app config, environment, or a dev key."""
    if app.config.get("STATEMANAGER_ENCRYPTION_KEYS"):
        return  # given in config, or as FLASK_STATEMANAGER_ENCRYPTION_KEYS
    from_env = os.environ.get("STATEMANAGER_ENCRYPTION_KEYS", "").strip()
    if from_env:
        app.config["STATEMANAGER_ENCRYPTION_KEYS"] = from_env
        return
    app.config["STATEMANAGER_ENCRYPTION_KEYS"] = dev_encryption_key(app.instance_path)
    logger.warning(
        "STATEMANAGER_ENCRYPTION_KEYS is not set: encrypting with the DEVELOPMENT key in %s. "
        "Never use it in production; make a key with `python -c 'from cryptography.fernet "
        "import Fernet; print(Fernet.generate_key().decode())'` and set "
        "STATEMANAGER_ENCRYPTION_KEYS in the environment.",
        os.path.join(app.instance_path, DEV_KEY_FILE),
    )


def create_app(
    config: Mapping[str, Any] | None = None, *, instance_path: str | None = None
) -> Flask:
    """Build the app.

    :param config: settings applied last, e.g. ``{"STATEMANAGER_STORE": "memory"}``
        or ``{"EXAMPLE_SEED_DEMO_USERS": False}`` in tests.
    :param instance_path: the instance folder (SQLite file, development key);
        Flask's default ``instance/`` next to the package when ``None``.
    """
    app = Flask(__name__, instance_path=instance_path)
    app.config.from_mapping(
        EXAMPLE_SEED_DEMO_USERS=True,
        MAX_CONTENT_LENGTH=2 * 1024 * 1024,  # a little over STATEMANAGER_MAX_STATE_BYTES
    )
    app.config.from_prefixed_env()
    if config is not None:
        app.config.update(config)
    _configure_encryption(app)

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
