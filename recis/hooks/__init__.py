"""Training-loop hooks: the Hook protocol, HashTableFilterHook and LoggerHook."""

from recis.hooks.filter_hook import HashTableFilterHook
from recis.hooks.hook import Hook
from recis.hooks.logger_hook import LoggerHook

__all__ = ["Hook", "HashTableFilterHook", "LoggerHook"]
