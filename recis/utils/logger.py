"""A thin wrapper over the standard :mod:`logging` module.

The library never configures the root logger and never attaches output handlers; a
:class:`logging.NullHandler` is placed on the top-level ``"recis"`` logger, following the
convention for libraries. Applications decide where records go, e.g. with
:func:`logging.basicConfig`.

Example::

    >>> from recis.utils.logger import Logger
    >>> log = Logger(__name__)
    >>> log.info("inserted %d ids", 42)
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["Logger"]

logging.getLogger("recis").addHandler(logging.NullHandler())


class Logger:
    r"""Forward log calls to ``logging.getLogger(name)``.

    Every method takes the same arguments as the :class:`logging.Logger` method of the same
    name, including printf-style ``*args`` that are only formatted when the record is emitted.

    Args:
        name (str): name of the underlying :mod:`logging` logger, usually ``__name__``.

    Example::

        >>> log = Logger("recis.example")
        >>> log.set_level(logging.DEBUG)
        >>> log.debug("table %s has %d rows", "user", 10)
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"Logger: name must be a str, got {type(name).__name__}")
        self._logger = logging.getLogger(name)

    @property
    def name(self) -> str:
        """Name of the underlying logger."""
        return self._logger.name

    @property
    def logger(self) -> logging.Logger:
        """The wrapped :class:`logging.Logger`."""
        return self._logger

    @property
    def level(self) -> int:
        """Level set on the underlying logger (``logging.NOTSET`` means inherited)."""
        return self._logger.level

    @level.setter
    def level(self, level: int | str) -> None:
        self.set_level(level)

    def set_level(self, level: int | str) -> None:
        """Set the level of the underlying logger.

        Args:
            level (int or str): a :mod:`logging` level such as ``logging.INFO`` or ``"INFO"``.
        """
        if isinstance(level, str):
            level = level.upper()
        elif not isinstance(level, int) or isinstance(level, bool):
            raise TypeError(
                f"Logger.set_level: level must be an int or a str, got {type(level).__name__}"
            )
        self._logger.setLevel(level)

    def is_enabled_for(self, level: int) -> bool:
        """Return whether a record of ``level`` would be processed."""
        return self._logger.isEnabledFor(level)

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log ``msg % args`` at DEBUG level."""
        kwargs.setdefault("stacklevel", 2)
        self._logger.debug(msg, *args, **kwargs)

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log ``msg % args`` at INFO level."""
        kwargs.setdefault("stacklevel", 2)
        self._logger.info(msg, *args, **kwargs)

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log ``msg % args`` at WARNING level."""
        kwargs.setdefault("stacklevel", 2)
        self._logger.warning(msg, *args, **kwargs)

    def error(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log ``msg % args`` at ERROR level."""
        kwargs.setdefault("stacklevel", 2)
        self._logger.error(msg, *args, **kwargs)

    def exception(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log ``msg % args`` at ERROR level with the current exception's traceback."""
        kwargs.setdefault("stacklevel", 2)
        kwargs.setdefault("exc_info", True)
        self._logger.error(msg, *args, **kwargs)

    def critical(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log ``msg % args`` at CRITICAL level."""
        kwargs.setdefault("stacklevel", 2)
        self._logger.critical(msg, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Logger(name={self.name!r}, level={logging.getLevelName(self.level)})"
