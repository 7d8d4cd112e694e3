"""``recis.serialize.loader``: where RecIS code imports :class:`Loader` from (defined in
:mod:`recis.serialize.checkpoint`)."""

from recis.serialize.checkpoint import Loader

__all__ = ["Loader"]
