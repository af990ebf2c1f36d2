"""The health blueprint: ``/health``, ``/health/live`` and ``/health/ready``.

``init_app`` registers it under ``STATEMANAGER_HEALTH_URL_PREFIX``:

* ``GET /health`` — the full report of
  :meth:`~flask_statemanager.StateManager.get_health_status`: 200 when
  ``healthy`` or ``degraded`` (the cache is down, the database answers), 503
  when ``unhealthy`` (the primary store does not answer);
* ``GET /health/live`` — the process answers; touches no backend;
* ``GET /health/ready`` — the primary store answers and its tables are
  there (200), or not (503); the cache is not asked.

A client whose ``Accept`` header asks for ``application/health+json`` gets the
IETF draft's format (`draft-inadarei-api-health-check`): ``pass``/``warn``/
``fail`` and one ``"<component>:responseTime"`` check each; everyone else gets
plain JSON. Every response passes through :func:`redact`, so no password,
credential or connection string can reach it even if a driver's error message
carried one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, request

from . import codec
from .operations import probe_store

if TYPE_CHECKING:
    from .extension import Runtime

HEALTH_JSON = "application/health+json"

#: Our status → the draft's status.
_DRAFT_STATUS = {"healthy": "pass", "degraded": "warn", "unhealthy": "fail", "up": "pass"}
_DRAFT_STATUS_DOWN = "fail"

#: ``scheme://anything`` up to whitespace or a quote: a URL or DSN of any kind.
_URL_RE = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"]+")
#: ``user:password@host`` left without a scheme.
_USERINFO_RE = re.compile(r"[^\s'\"/@:]+:[^\s'\"/@]+@[^\s'\"/]+")
#: ``password=...`` in a libpq-style key/value DSN.
_PASSWORD_RE = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
#: An IP address or dotted host name, with its port if any (``10.0.0.7:5432``).
_HOST_RE = re.compile(
    r"\b(?:\d{1,3}(?:\.\d{1,3}){3}|localhost|[a-zA-Z][\w-]*(?:\.[\w-]+)+)(?::\d{1,5})?\b"
)
#: ``port 5432`` as libpq says it.
_PORT_RE = re.compile(r"\bport \d+")

health = Blueprint("statemanager_health", __name__)


@health.get("")
def report() -> Response:
    """The full health report; 503 when the primary store does not answer."""
    from .extension import StateManager

    result = StateManager().get_health_status()
    return _respond(result, 503 if result["status"] == "unhealthy" else 200)


@health.get("/live")
def live() -> Response:
    """The process is up and serving requests; no backend is asked."""
    return _respond({"status": "healthy", "checks": {}}, 200)


@health.get("/ready")
def ready() -> Response:
    """The primary store answers and can count its states: the app can serve state operations."""
    from .extension import StateManager

    check, _count, _exact = probe_store(StateManager().store)
    up = check["status"] == "up"
    body = {"status": "healthy" if up else "unhealthy", "checks": {"database": check}}
    return _respond(body, 200 if up else 503)


def _respond(body: dict[str, Any], status: int) -> Response:
    wants_draft = request.accept_mimetypes.best_match(["application/json", HEALTH_JSON])
    if wants_draft == HEALTH_JSON:
        body, mimetype = to_health_json(body), HEALTH_JSON
    else:
        mimetype = "application/json"
    runtime = current_app.extensions.get("statemanager")
    secrets = known_secrets(runtime) if runtime is not None else []
    text = codec.dumps_str(redact(body, secrets), lenient=True)
    response = current_app.response_class(text, status=status, mimetype=mimetype)
    response.headers["Cache-Control"] = "no-store"
    return response


def to_health_json(body: dict[str, Any]) -> dict[str, Any]:
    """Map one of our reports onto the ``application/health+json`` draft.

    Each component check becomes ``"<name>:responseTime"`` with the observed
    latency in milliseconds; the state count becomes ``"states:count"`` (its
    ``observedUnit`` says when it is an estimate) and the cache hit rate
    ``"cache:hitRate"``.
    """
    from . import __version__

    out: dict[str, Any] = {
        "status": _DRAFT_STATUS[body["status"]],
        "releaseId": __version__,
        "description": "flask-statemanager",
        "checks": {},
    }
    failed = []
    for name, check in body.get("checks", {}).items():
        entry: dict[str, Any] = {
            "componentId": name,
            "componentType": "datastore",
            "observedValue": check.get("latency_ms"),
            "observedUnit": "ms",
            "status": _DRAFT_STATUS.get(check.get("status", ""), _DRAFT_STATUS_DOWN),
            "time": check.get("time"),
        }
        if check.get("error"):
            entry["output"] = check["error"]
            failed.append(f"{name}: {check['error']}")
        out["checks"][f"{name}:responseTime"] = [entry]
    if body.get("state_count") is not None:
        exact = body.get("state_count_exact", True)
        out["checks"]["states:count"] = [
            {
                "componentType": "component",
                "observedValue": body["state_count"],
                "observedUnit": "states" if exact else "states (estimate)",
                "status": "pass",
                "time": body["checks"]["database"]["time"],
            }
        ]
    if body.get("cache_hit_rate") is not None:
        out["checks"]["cache:hitRate"] = [
            {
                "componentType": "component",
                "observedValue": body["cache_hit_rate"],
                "observedUnit": "ratio",
                "status": out["checks"]["redis:responseTime"][0]["status"],
                "time": body["checks"]["redis"]["time"],
            }
        ]
    if failed:
        out["output"] = "; ".join(failed)
    return out


def redact(value: Any, secrets: Iterable[str] = ()) -> Any:
    """*value* with each of *secrets*, URLs, ``user:password@host`` parts,
    ``password=`` pairs, host addresses and ports masked in every string it holds.

    Only strings are touched; a report's ``time`` values hold no dotted host
    and survive unchanged.
    """
    secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def clean(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        text = _URL_RE.sub("<url>", text)
        text = _USERINFO_RE.sub("<credentials>", text)
        text = _PASSWORD_RE.sub(r"\1***", text)
        text = _HOST_RE.sub("<host>", text)
        return _PORT_RE.sub("port <port>", text)

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return clean(item)
        if isinstance(item, dict):
            return {k: walk(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [walk(v) for v in item]
        return item

    return walk(value)


def known_secrets(runtime: Runtime) -> list[str]:
    """The passwords *runtime*'s app configuration and store clients know."""
    found: list[str] = []
    config = runtime.app.config if runtime.app is not None else {}
    for key in ("STATEMANAGER_DATABASE_URI", "STATEMANAGER_REDIS_URL", "SQLALCHEMY_DATABASE_URI"):
        url = config.get(key)
        if isinstance(url, str) and "://" in url:
            try:
                found.append(urlsplit(url).password or "")
            except ValueError:
                pass
    store: Any = runtime.store
    for part in (store, getattr(store, "inner", None)):
        engine_url = getattr(getattr(part, "engine", None), "url", None)
        if engine_url is not None:
            found.append(engine_url.password or "")
        pool = getattr(getattr(part, "client", None), "connection_pool", None)
        if pool is not None:
            found.append(pool.connection_kwargs.get("password") or "")
    return found
