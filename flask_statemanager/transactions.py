"""Many states at once: transactions (all or nothing) and bulk results (per item).

::

    with state_manager.transaction() as tx:
        tx.update_state("wallet_a", {"data": {"credits": 90}})
        tx.update_state("wallet_b", {"data": {"credits": 110}})
        tx.register_state("transfer_7", "transaction", {"data": {"amount": 10}})
    tx.results   # the committed records, in order

Every change of a transaction is checked when the block ends, against the
states as read under the store's lock; if any is refused, or the block raises,
nothing is written. Otherwise they commit in one store transaction, each with
its history entry, and signals and callbacks follow the commit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import mutations
from .definitions import StateTransition, TransitionLike, TypeLike
from .engine import Operation, Registry
from .errors import StateManagerError
from .records import State


class Transaction:
    """Changes collected in a ``with state_manager.transaction()`` block.

    The methods take the arguments of the :class:`~.StateManager` methods of
    the same names; later changes of a state see the earlier ones.
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.operations: list[Operation] = []
        #: The committed records, one per change, once the block has ended.
        self.results: list[State] = []

    def register_state(
        self, state_id: str, state_type: TypeLike, initial_data: Mapping[str, Any], **options: Any
    ) -> None:
        """Queue :meth:`~.StateManager.register_state`."""
        self.operations.append(
            mutations.register(self._registry, state_id, state_type, initial_data, **options)
        )

    def update_state(
        self,
        state_id: str,
        new_data: Mapping[str, Any],
        transition: TransitionLike = StateTransition.UPDATE,
        **options: Any,
    ) -> None:
        """Queue :meth:`~.StateManager.update_state`."""
        self.operations.append(mutations.update(state_id, new_data, transition, **options))

    def patch_state(self, state_id: str, changes: Mapping[str, Any], **options: Any) -> None:
        """Queue :meth:`~.StateManager.patch_state`."""
        self.operations.append(mutations.patch(state_id, changes, **options))

    def transition(self, state_id: str, transition: TransitionLike, **options: Any) -> None:
        """Queue :meth:`~.StateManager.transition`."""
        self.operations.append(mutations.transition(state_id, transition, **options))

    def delete_state(self, state_id: str, **options: Any) -> None:
        """Queue :meth:`~.StateManager.delete_state`."""
        self.operations.append(mutations.delete(state_id, **options))

    def atomic_update(
        self, state_id: str, fn: Callable[[dict[str, Any]], dict[str, Any]], **options: Any
    ) -> None:
        """Queue :meth:`~.StateManager.atomic_update` (*fn* runs at commit)."""
        self.operations.append(mutations.compute(state_id, fn, **options))


@dataclass
class BulkResult:
    """What a bulk call did: one outcome per item, in the order given.

    An outcome is the committed record, or the error that kept that item out
    (the other items were still written).
    """

    outcomes: list[State | StateManagerError] = field(default_factory=list)
    #: The ``state_id`` of each item (``None`` where the item had none).
    ids: list[str | None] = field(default_factory=list)

    @property
    def states(self) -> dict[str, State]:
        """The committed records by id."""
        return {s["state_id"]: s for s in self.outcomes if isinstance(s, State)}

    @property
    def errors(self) -> dict[str, StateManagerError]:
        """The refused items' errors by id (by position, as ``"#3"``, without an id)."""
        return {
            state_id if state_id is not None else f"#{index}": outcome
            for index, (state_id, outcome) in enumerate(zip(self.ids, self.outcomes, strict=True))
            if isinstance(outcome, StateManagerError)
        }

    @property
    def ok(self) -> bool:
        """Whether every item was written."""
        return not any(isinstance(o, StateManagerError) for o in self.outcomes)

    def __iter__(self) -> Iterator[State | StateManagerError]:
        return iter(self.outcomes)

    def __len__(self) -> int:
        return len(self.outcomes)
