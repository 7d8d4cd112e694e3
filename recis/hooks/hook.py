"""Base class of training hooks."""

from __future__ import annotations

from typing import Any

__all__ = ["Hook"]


class Hook:
    r"""Base class of callbacks that a training loop invokes at fixed points.

    A trainer calls the methods in this order::

        before_train()
            before_epoch()
                before_step()  ...  after_step(metrics, global_step)   # once per step
            after_epoch()
        after_train()
        before_evaluate() ... after_evaluate()                        # when evaluating
        end()                                                         # once, at shutdown

    Every method is a no-op that accepts and ignores any arguments, so a subclass only
    overrides the points it cares about, and trainers may pass extra positional or keyword
    arguments without breaking older hooks.

    Example::

        >>> class PrintStep(Hook):
        ...     def after_step(self, metrics=None, global_step=None):
        ...         logging.getLogger(__name__).info("step %s: %s", global_step, metrics)
    """

    def before_train(self, *args: Any, **kwargs: Any) -> None:
        """Called once before the first training step."""

    def after_train(self, *args: Any, **kwargs: Any) -> None:
        """Called once after the last training step."""

    def before_evaluate(self, *args: Any, **kwargs: Any) -> None:
        """Called before an evaluation pass."""

    def after_evaluate(self, *args: Any, **kwargs: Any) -> None:
        """Called after an evaluation pass."""

    def before_epoch(self, *args: Any, **kwargs: Any) -> None:
        """Called at the start of every epoch."""

    def after_epoch(self, *args: Any, **kwargs: Any) -> None:
        """Called at the end of every epoch."""

    def before_step(self, *args: Any, **kwargs: Any) -> None:
        """Called before every training step."""

    def after_step(
        self, metrics: Any = None, global_step: Any = None, *args: Any, **kwargs: Any
    ) -> None:
        """Called after every training step.

        Args:
            metrics: the step's metrics (commonly a dict of name to value), or ``None``.
            global_step: the global step counter after the step, or ``None``.
        """

    def after_record(self, record: dict[str, Any]) -> None:
        """Called when the trainer appends a record to its history (every ``log_steps``
        steps and after every evaluation): ``step``, the metrics, ``tables``,
        ``table_stats``."""

    def end(self, *args: Any, **kwargs: Any) -> None:
        """Called once when the trainer shuts down."""
