"""Training-loop hooks: the Hook protocol and HashTableFilterHook."""

from recis.hooks.filter_hook import HashTableFilterHook
from recis.hooks.hook import Hook

__all__ = ["Hook", "HashTableFilterHook"]
