"""``recis.serialize.saver``: where RecIS code imports :class:`Saver` from (defined in
:mod:`recis.serialize.checkpoint`)."""

from recis.serialize.checkpoint import Saver

__all__ = ["Saver"]
