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
from urllib.parse import SplitResult, urlsplit

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
#: A quoted name after the word that says what it is, as drivers write them:
#: ``failed to resolve host 'db'``, ``role "admin" does not exist``,
#: ``database "prod" does not exist``, ``for user "admin"``, ``server at "db"``.
_QUOTED_NAME_RE = re.compile(
    r"\b(host|role|database|user|server at)(\s+)(\"[^\"]*\"|'[^']*')", re.IGNORECASE
)
#: What a name masked as a whole word may not touch on either side: ``postgres``
#: is masked in ``user postgres`` but not in ``postgresql``, nor ``prod`` in ``prod-eu``.
_NAME_EDGE = r"[\w.\-]"

#: Words the reports themselves use (store kinds and components), never masked.
_OWN_WORDS = frozenset({"memory", "sql", "sqlite", "postgresql", "redis", "cache", "database"})

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
    names = known_names(runtime) if runtime is not None else []
    text = codec.dumps_str(redact(body, secrets, names), lenient=True)
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


def redact(value: Any, secrets: Iterable[str] = (), names: Iterable[str] = ()) -> Any:
    """*value* with each of *secrets*, URLs, ``user:password@host`` parts,
    ``password=`` pairs, host addresses and ports masked in every string it holds.

    *names* (host, user and database names) are masked where they stand as a
    whole word in a message (a string with a space in it), and so is any
    quoted name a driver writes after ``host``, ``role``, ``database``,
    ``user`` or ``server at``: single-label host names (``dbprimary``, a
    Docker or Kubernetes service) match no address pattern.

    Only strings are touched; a report's ``time`` values hold no dotted host
    and survive unchanged.
    """
    secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
    words = sorted({n for n in names if n}, key=len, reverse=True)
    names_re = (
        re.compile(f"(?<!{_NAME_EDGE})(?:{'|'.join(map(re.escape, words))})(?!{_NAME_EDGE})")
        if words
        else None
    )

    def clean(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        text = _URL_RE.sub("<url>", text)
        text = _USERINFO_RE.sub("<credentials>", text)
        text = _PASSWORD_RE.sub(r"\1***", text)
        text = _HOST_RE.sub("<host>", text)
        text = _PORT_RE.sub("port <port>", text)
        if names_re is not None and any(c.isspace() for c in text):
            # Only in messages: one-word values (a status, ``"component": "redis"``)
            # stay, even when a host is named like its service.
            text = names_re.sub("***", text)
        return _QUOTED_NAME_RE.sub(_mask_quoted, text)

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return clean(item)
        if isinstance(item, dict):
            return {k: walk(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [walk(v) for v in item]
        return item

    return walk(value)


def _mask_quoted(match: re.Match[str]) -> str:
    word, space, quoted = match.groups()
    if quoted[1:-1] in ("<host>", "***"):
        return match.group(0)
    return f"{word}{space}{quoted[0]}***{quoted[0]}"


def known_secrets(runtime: Runtime) -> list[str]:
    """The passwords *runtime*'s app configuration and store clients know."""
    found: list[str] = []
    for url in _config_urls(runtime):
        found.append(url.password or "")
    store: Any = runtime.store
    for part in (store, getattr(store, "inner", None)):
        engine_url = getattr(getattr(part, "engine", None), "url", None)
        if engine_url is not None:
            found.append(engine_url.password or "")
        pool = getattr(getattr(part, "client", None), "connection_pool", None)
        if pool is not None:
            found.append(pool.connection_kwargs.get("password") or "")
    return found


def known_names(runtime: Runtime) -> list[str]:
    """The host, user and database names in *runtime*'s configured URLs and store clients.

    Pass them to :func:`redact` as *names*: a driver's message names them
    without any address syntax (``failed to resolve host 'dbprimary'``).
    """
    found: list[str] = []
    for url in _config_urls(runtime):
        found += [url.hostname or "", url.username or "", url.path.lstrip("/")]
    store: Any = runtime.store
    for part in (store, getattr(store, "inner", None)):
        engine_url = getattr(getattr(part, "engine", None), "url", None)
        if engine_url is not None:
            found += [engine_url.host or "", engine_url.username or "", engine_url.database or ""]
        pool = getattr(getattr(part, "client", None), "connection_pool", None)
        if pool is not None:
            kwargs = pool.connection_kwargs
            found += [str(kwargs.get("host") or ""), str(kwargs.get("username") or "")]
    # A SQLite database is a file path, Redis databases are numbers, and a host
    # named like its service (``redis``) is the report's own word: none is a name.
    return [
        name
        for name in found
        if name and "/" not in name and not name.isdigit() and name not in _OWN_WORDS
    ]


def _config_urls(runtime: Runtime) -> list[SplitResult]:
    config = runtime.app.config if runtime.app is not None else {}
    urls = []
    for key in ("STATEMANAGER_DATABASE_URI", "STATEMANAGER_REDIS_URL", "SQLALCHEMY_DATABASE_URI"):
        url = config.get(key)
        if isinstance(url, str) and "://" in url:
            try:
                split = urlsplit(url)
                split.port  # noqa: B018 - raises ValueError for a bad port
            except ValueError:
                continue
            urls.append(split)
    return urls
