"""TablePolicy: what an admission or eviction policy declares to the table it serves.

A policy is attached to a :class:`~recis._core.store.TableStore` under a key. The store then

* declares the policy's per-row metadata slots (:meth:`TablePolicy.slot_specs`), which live,
  move, reset and checkpoint with the rows;
* calls :meth:`TablePolicy.on_touch` with the rows every training lookup and insert touched,
  and :meth:`TablePolicy.make_room` before they insert new keys;
* saves and restores the policy's own state (a clock, a sketch: :meth:`policy_state`) with the
  table, on every path: checkpoints (exact and resharded loads), ``state_dict`` copies.

Admission decisions (``admit``) and eviction choices (``filter``) are defined by the
subclasses in :mod:`recis.nn.modules.hashtable_hook_impl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from recis._core.slots import SlotSpec
    from recis._core.store import TableStore


class TablePolicy:
    """Base of table policies: metadata slots, a reaction to touched rows, saved state."""

    def slot_specs(self) -> list[SlotSpec]:
        """Per-row metadata slots this policy needs (declared when it is attached)."""
        return []

    def on_touch(self, store: TableStore, rows: Tensor) -> None:
        """``rows`` (unique, valid) were used by a training lookup or written by an insert.
        Called under the write lock; the store marks ``rows`` written after the call, so a
        policy may write its slots of these rows with the backend's kernels directly
        (:meth:`~recis._core.store.TableStore.block_list`), without a write of its own."""

    def make_room(self, store: TableStore, new: int, keep: Tensor) -> None:
        """``new`` keys are about to get rows (a training lookup or an insert; called under
        the write lock): a policy that caps the table may remove rows now, never ``keep`` (the
        rows the same lookup uses). Default: nothing."""

    @property
    def caps_inserts(self) -> bool:
        """Whether :meth:`make_room` may remove rows: the store calls it (and prepares its
        arguments, a pass over the batch's rows) only then. Default: the class defines it."""
        return type(self).make_room is not TablePolicy.make_room

    def policy_state(self) -> dict[str, Tensor]:
        """The policy's own state as tensors, saved and restored with the table."""
        return {}

    def load_policy_state(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`policy_state` returned (tensors may come from another device)."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got {sorted(state)}")

    @classmethod
    def merge_policy_states(cls, states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """One state from the states of several shards (a resharded load gives it to every
        new shard). Default: the states must be equal; the first is used."""
        first = states[0] if states else {}
        for other in states[1:]:
            if set(other) != set(first) or any(
                    not torch.equal(other[k].cpu(), first[k].cpu()) for k in first):
                raise ValueError(f"{cls.__name__}: shards saved different states; override "
                                 "merge_policy_states to combine them")
        return first
