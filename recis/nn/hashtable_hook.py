"""Hook configurations: which admission and filter policy a table uses, by name.

A hook is a small value object: a policy ``name`` (looked up in the registry of
:mod:`recis.nn.modules.hashtable_hook_impl`) and its ``params``. Its ``str()`` is the JSON of
both with sorted keys; embedding modules use it to decide which features can share a table.

Read-only lookups (known IDs return their rows, unknown IDs return zeros and are not stored)::

    from recis.nn import HashTable
    from recis.nn.hashtable_hook import AdmitHook

    ht = HashTable(embedding_shape=[64])
    embeddings = ht(ids, admit_hook=AdmitHook("ReadOnly"))

Removing rows not seen for 20 training steps, checked every 10 steps::

    from recis.nn import EmbeddingEngine, EmbeddingOption
    from recis.nn.hashtable_hook import FilterHook
    from recis.hooks.filter_hook import HashTableFilterHook

    opt = EmbeddingOption(embedding_dim=64, shared_name="user_emb",
                          filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 20}))
    engine = EmbeddingEngine({"user_emb": opt})
    hook = HashTableFilterHook(filter_interval=10)
    for step in range(100):
        outputs = engine(samples)
        hook.after_step(global_step=step)
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["BaseHook", "AdmitHook", "FilterHook"]


def _describe(value: Any) -> str:
    """JSON stand-in for a param that is not JSON (e.g. a ``Score`` filter's function): its
    name and identity, so that hooks with different functions differ."""
    name = getattr(value, "__qualname__", type(value).__qualname__)
    return f"<{getattr(value, '__module__', '?')}.{name} at {id(value):#x}>"


class BaseHook:
    """A policy name plus its parameters.

    Args:
        name (str): registered policy name, e.g. ``"ReadOnly"`` or ``"GlobalStepFilter"``.
        params (dict, optional): keyword arguments of the policy. Default: ``{}``.
    """

    def __init__(self, name: str, params: dict[str, Any] | None = None):
        if not isinstance(name, str) or not name:
            raise TypeError(f"hook name must be a non-empty str, got {name!r}")
        if params is not None and not isinstance(params, dict):
            raise TypeError(f"hook params must be a dict or None, got {type(params).__name__}")
        self._name = name
        self._params = dict(params) if params is not None else {}

    @property
    def name(self) -> str:
        """The registered policy name."""
        return self._name

    @property
    def params(self) -> dict[str, Any]:
        """The policy's keyword arguments."""
        return self._params

    def __str__(self) -> str:
        return json.dumps({"name": self._name, "params": self._params}, sort_keys=True,
                          default=_describe)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r}, {self._params!r})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, str(self)))


class AdmitHook(BaseHook):
    """Admission policy: decides which unknown IDs of a training lookup get a row.

    ``AdmitHook("ReadOnly")`` admits none: unknown IDs read as zero rows and nothing is stored,
    while known IDs still return (and train) their rows.
    """

    @property
    def type(self) -> str:
        return "admit"


class FilterHook(BaseHook):
    """Filter (eviction) policy: decides which rows are removed when filtering runs.

    ``FilterHook("GlobalStepFilter", {"filter_step": n})`` removes rows not looked up during the
    last ``n`` filter steps (see :class:`recis.hooks.filter_hook.HashTableFilterHook`).
    """

    @property
    def type(self) -> str:
        return "filter"
