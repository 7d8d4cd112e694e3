"""LoggerHook: logs the training metrics every ``log_steps`` steps."""

from __future__ import annotations

from typing import Any

from recis.hooks.hook import Hook
from recis.utils.checks import check_positive_int
from recis.utils.logger import Logger

__all__ = ["LoggerHook", "table_summary"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def table_summary(stats: dict[str, Any]) -> str:
    """``live=.. admitted=.. rejected=..(by policy) evicted=..(by reason)`` of a table."""

    def by(counts: dict[str, int]) -> str:
        total = sum(counts.values())
        inner = ", ".join(f"{k} {v}" for k, v in counts.items())
        return f"{total} ({inner})" if counts else str(total)

    return (f"live={stats.get('live', 0)} admitted={stats.get('admitted', 0)} "
            f"rejected={by(stats.get('rejected', {}))} evicted={by(stats.get('evicted', {}))}")


class LoggerHook(Hook):
    """Log ``metrics`` (a flat dict) through :mod:`logging` at every ``log_steps``-th step.

    Args:
        log_steps (int): interval in steps. Default: 100.
        logger_name (str): logger to write to. Default: ``"recis.train"``.
    """

    def __init__(self, log_steps: int = 100, logger_name: str = "recis.train"):
        self.log_steps = check_positive_int(log_steps, "log_steps")
        self._logger = Logger(logger_name)
        self.records: list[tuple[int, dict[str, Any]]] = []

    def after_step(self, metrics: Any = None, global_step: Any = None) -> None:
        if global_step is None or (int(global_step) + 1) % self.log_steps:
            return
        metrics = dict(metrics or {})
        self.records.append((int(global_step), metrics))
        text = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        self._logger.info("step %d: %s", int(global_step), text)

    def after_record(self, record: dict[str, Any]) -> None:
        """Log one line with each table's live IDs and admitted / rejected / evicted
        counts (``record["table_stats"]``)."""
        tables = record.get("table_stats")
        if tables:
            self._logger.info("step %d tables: %s", int(record.get("step", 0)),
                              "; ".join(f"{name}: {table_summary(s)}"
                                        for name, s in tables.items()))

    def after_evaluate(self, metrics: Any = None, *args: Any, **kwargs: Any) -> None:
        if metrics:
            text = ", ".join(f"{k}={_fmt(v)}" for k, v in dict(metrics).items())
            self._logger.info("evaluation: %s", text)
