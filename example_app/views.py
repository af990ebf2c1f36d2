"""JSON routes over the state manager, and the mapping of its errors to HTTP.

Every response is JSON. Bad input gets a 4xx with a message (and, for 422, a
``messages`` mapping of field to problems); only a broken server gives a 5xx.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from marshmallow import ValidationError
from werkzeug.exceptions import BadRequest, HTTPException

from flask_statemanager import (
    BackendUnavailableError,
    InvalidTransitionError,
    Page,
    State,
    StateConflictError,
    StateExistsError,
    StateLimitError,
    StateManagerError,
    StateNotFoundError,
    StateType,
    StateValidationError,
)
from flask_statemanager.audit import BrokenLink
from flask_statemanager.health import known_names, known_secrets, redact

from . import CartItemSchema, state_manager

bp = Blueprint("example", __name__)

#: Query arguments of ``GET /users`` that become search filters.
USER_FILTERS = {
    "status": "status",  # the lifecycle status column
    "plan": "data.plan",  # a field of data, declared as an index of the user type
    "role": "data.role",
    "min_credits": "data.credits__gte",
}


# -- helpers -----------------------------------------------------------------


def _body() -> dict[str, Any]:
    """The request's JSON object; an empty body is ``{}``."""
    if not request.get_data():
        return {}
    try:
        payload = request.get_json(force=True, silent=True)
    except RecursionError:  # the stdlib decoder on absurdly nested input
        payload = None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.")
    return payload


def _actor() -> str:
    """Who makes the change, recorded in the history entry."""
    return request.headers.get("X-Actor", "api")


def _state_response(state: State, status: int = 200) -> Response:
    response = jsonify(state.to_json())
    response.status_code = status
    response.set_etag(state["etag"])
    return response


def _page_response(page: Page) -> Response:
    return jsonify(
        items=[state.to_json() for state in page],
        total=page.total,
        page=page.page,
        per_page=page.per_page,
        pages=page.pages,
        has_next=page.has_next,
        has_prev=page.has_prev,
    )


def _live_state(state_id: str, state_type: StateType | str) -> State:
    """The live state of *state_type*, or a 404 (ids of other types are not exposed here)."""
    state = state_manager.get_state(state_id)
    if state is None or state["type"] != str(state_type):
        raise StateNotFoundError(state_id)
    return state


def _int_arg(name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise StateValidationError(
            f"Query argument {name!r} must be an integer, got {raw!r}.",
            {name: ["Must be an integer."]},
        ) from None


def _rule_of(endpoint: str) -> str | None:
    rules = (
        current_app.url_map.iter_rules(endpoint) if endpoint in current_app.view_functions else []
    )
    return next((rule.rule for rule in rules), None)


# -- routes --------------------------------------------------------------------


@bp.get("/")
def index() -> Response:
    """This list of routes."""
    routes = []
    for rule in sorted(current_app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        view = current_app.view_functions[rule.endpoint]
        doc = (view.__doc__ or "").strip() or rule.endpoint
        routes.append(
            {
                "methods": sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}),
                "rule": rule.rule,
                "description": doc.splitlines()[0],
            }
        )
    return jsonify(
        app="flask-statemanager example",
        routes=routes,
        # Added by init_app, not by this blueprint (STATEMANAGER_HEALTH_URL_PREFIX,
        # STATEMANAGER_METRICS_URL); None when turned off or, for /metrics,
        # without the 'metrics' extra (prometheus-client).
        operations={
            "health": _rule_of("statemanager_health.report"),
            "liveness": _rule_of("statemanager_health.live"),
            "readiness": _rule_of("statemanager_health.ready"),
            "metrics": _rule_of("statemanager_metrics"),
        },
    )


@bp.get("/users")
def list_users() -> Response:
    """Search users: ?status=active&plan=pro&role=admin&min_credits=5&page=1&per_page=20.

    A repeated argument matches any of its values (``?status=active&status=pending``).
    """
    unknown = sorted(set(request.args) - set(USER_FILTERS) - {"page", "per_page"})
    if unknown:
        allowed = sorted([*USER_FILTERS, "page", "per_page"])
        raise StateValidationError(
            f"Unknown query arguments {unknown}; use {', '.join(allowed)}.",
            {name: ["Unknown query argument."] for name in unknown},
        )
    filters: dict[str, Any] = {}
    for name, field in USER_FILTERS.items():
        values = request.args.getlist(name)
        if name == "min_credits":
            if values:
                filters[field] = _int_arg(name, 0)
        elif len(values) == 1:
            filters[field] = values[0]
        elif values:  # ?status=active&status=pending
            filters[f"{field}__in"] = values
    page = state_manager.search_states(
        StateType.USER,
        filters,
        page=_int_arg("page", 1),
        per_page=_int_arg("per_page", 20),
    )
    return _page_response(page)


@bp.post("/users/<user_id>")
def register_user(user_id: str) -> Response:
    """Register a user: body {"name": ..., "data": {"email": ..., "plan": ...}}."""
    state = state_manager.register_state(user_id, StateType.USER, _body(), actor=_actor())
    response = _state_response(state, 201)
    response.headers["Location"] = url_for(".get_user", user_id=user_id)
    return response


@bp.get("/users/<user_id>")
def get_user(user_id: str) -> Response:
    """One user; the ETag header is its version."""
    return _state_response(_live_state(user_id, StateType.USER))


@bp.post("/users/<user_id>/<any(activate, suspend, resume):transition>")
def transition_user(user_id: str, transition: str) -> Response:
    """Activate, suspend or resume a user; If-Match: <etag> makes it conditional."""
    _live_state(user_id, StateType.USER)
    state = state_manager.transition(
        user_id,
        transition,
        expected_version=request.headers.get("If-Match"),
        actor=_actor(),
    )
    return _state_response(state)


@bp.delete("/users/<user_id>")
def delete_user(user_id: str) -> tuple[str, int]:
    """Delete a user; its history is kept."""
    _live_state(user_id, StateType.USER)
    state_manager.delete_state(
        user_id, expected_version=request.headers.get("If-Match"), actor=_actor()
    )
    return "", 204


@bp.get("/users/<user_id>/history")
def user_history(user_id: str) -> Response:
    """A user's changes, oldest first (also after deletion)."""
    changes = state_manager.get_state_history(user_id)
    if not changes:
        raise StateNotFoundError(user_id, f"No history for {user_id!r}: it was never registered.")
    return jsonify(state_id=user_id, changes=[change.to_json() for change in changes])


@bp.post("/carts/<cart_id>")
def create_cart(cart_id: str) -> Response:
    """Create a cart: body {"data": {"items": [...]}}; it expires after 30 minutes."""
    state = state_manager.register_state(cart_id, "cart", _body(), actor=_actor())
    return _state_response(state, 201)


@bp.get("/carts/<cart_id>")
def get_cart(cart_id: str) -> Response:
    """One cart, until its TTL passes; a cart stored in schema 1.0 reads upgraded."""
    return _state_response(_live_state(cart_id, "cart"))


@bp.post("/carts/<cart_id>/items")
def add_cart_item(cart_id: str) -> Response:
    """Add to a cart: body {"sku": "A1", "quantity": 2}; one history entry per call."""
    _live_state(cart_id, "cart")
    try:
        item = CartItemSchema().load(_body())
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"item": exc.messages}
        raise StateValidationError(f"Invalid cart item: {messages}", messages) from None

    def add(data: dict[str, Any]) -> dict[str, Any]:
        # Runs on the current data (upgraded to schema 1.1), under the store's
        # lock, so two concurrent adds both count; the cart schema then checks
        # the result (e.g. a quantity above 999).
        items = data.setdefault("items", [])
        for line in items:
            if line.get("sku") == item["sku"] and type(line.get("quantity")) is int:
                line["quantity"] += item["quantity"]
                break
        else:
            items.append(item)
        return data

    return _state_response(state_manager.atomic_update(cart_id, add, actor=_actor()))


@bp.get("/states/<state_id>/verify")
def verify_state(state_id: str) -> Response:
    """Check a state's tamper-evident history chain (any type, deleted ones too)."""
    if not state_manager.get_recent_changes(state_id, limit=1):
        raise StateNotFoundError(state_id, f"No history for {state_id!r}: it was never registered.")
    result = next(state_manager.verify_history(state_id))
    if isinstance(result, BrokenLink):
        return jsonify(
            state_id=state_id, intact=False, version=result.version, reason=result.reason
        )
    return jsonify(state_id=state_id, intact=True, version=None, reason=None)


# -- errors --------------------------------------------------------------------


def _error(code: int, exc: Exception, **extra: Any) -> tuple[Response, int]:
    message = str(exc)
    if code >= 500:
        # A driver's message names hosts, ports, roles and databases: the log has
        # it whole, the answer has it redacted as the health endpoints do.
        runtime = current_app.extensions["statemanager"]
        message = redact(message, known_secrets(runtime), known_names(runtime))
    return jsonify(error=type(exc).__name__, message=message, **extra), code


@bp.app_errorhandler(StateManagerError)
def handle_state_error(exc: StateManagerError) -> tuple[Response, int]:
    """Map the extension's errors to HTTP statuses."""
    if isinstance(exc, StateNotFoundError):
        return _error(404, exc)
    if isinstance(exc, StateConflictError):
        return _error(
            409, exc, expected_version=exc.expected_version, actual_version=exc.actual_version
        )
    if isinstance(exc, StateExistsError):
        return _error(409, exc)
    if isinstance(exc, StateValidationError):
        return _error(422, exc, messages=exc.messages)
    if isinstance(exc, InvalidTransitionError):
        return _error(
            422,
            exc,
            messages={"transition": [str(exc)]},
            current_status=exc.status,
            allowed=list(exc.allowed),
        )
    if isinstance(exc, StateLimitError):
        return _error(422, exc, messages={exc.limit: [str(exc)]})
    if isinstance(exc, BackendUnavailableError):
        current_app.logger.error("State store unavailable: %s", exc)
        return _error(503, exc)
    # ConfigurationError and anything new: a server-side problem.
    current_app.logger.exception("State manager error")
    return _error(500, exc)


@bp.app_errorhandler(HTTPException)
def handle_http_error(exc: HTTPException) -> tuple[Response, int]:
    """Routing and protocol errors (404, 405, 400 ...) as JSON too."""
    return jsonify(error=exc.name, message=exc.description), exc.code or 500
