"""flask-statemanager: typed, versioned application state for Flask."""

from __future__ import annotations

from .definitions import Lifecycle, StateTransition, StateType, TypeDefinition
from .errors import (
    BackendUnavailableError,
    ConfigurationError,
    InvalidTransitionError,
    MigrationError,
    StateConflictError,
    StateExistsError,
    StateLimitError,
    StateManagerError,
    StateNotFoundError,
    StateValidationError,
)
from .extension import StateManager
from .query import Page
from .records import Change, State
from .transactions import BulkResult, Transaction

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BulkResult",
    "Change",
    "ConfigurationError",
    "InvalidTransitionError",
    "Lifecycle",
    "MigrationError",
    "Page",
    "State",
    "StateConflictError",
    "StateExistsError",
    "StateLimitError",
    "StateManager",
    "StateManagerError",
    "StateNotFoundError",
    "StateTransition",
    "StateType",
    "StateValidationError",
    "Transaction",
    "TypeDefinition",
    "__version__",
]
