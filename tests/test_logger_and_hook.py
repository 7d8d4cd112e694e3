import logging

import pytest

from recis.hooks.hook import Hook
from recis.utils.logger import Logger


@pytest.fixture
def log():
    logger = Logger("recis.tests.logger")
    yield logger
    logger.set_level(logging.NOTSET)


def test_wraps_named_logger(log):
    assert log.name == "recis.tests.logger"
    assert log.logger is logging.getLogger("recis.tests.logger")


@pytest.mark.parametrize(
    "method,level",
    [
        ("debug", logging.DEBUG),
        ("info", logging.INFO),
        ("warning", logging.WARNING),
        ("error", logging.ERROR),
        ("critical", logging.CRITICAL),
    ],
)
def test_forwards_with_printf_args(log, caplog, method, level):
    with caplog.at_level(logging.DEBUG, logger="recis.tests.logger"):
        getattr(log, method)("table %s has %d rows", "user", 3)
    (record,) = caplog.records
    assert record.levelno == level
    assert record.name == "recis.tests.logger"
    assert record.getMessage() == "table user has 3 rows"
    # The record points at the caller, not at the wrapper.
    assert record.filename == "test_logger_and_hook.py"


def test_exception_includes_traceback(log, caplog):
    with caplog.at_level(logging.ERROR, logger="recis.tests.logger"):
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed at step %d", 7)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "failed at step 7"
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


def test_level(log, caplog):
    assert log.level == logging.NOTSET
    log.set_level(logging.WARNING)
    assert log.level == logging.WARNING
    log.level = "error"
    assert log.level == logging.ERROR
    assert not log.is_enabled_for(logging.WARNING)
    with caplog.at_level(logging.DEBUG):
        log.warning("hidden")
        log.error("shown")
    assert [r.getMessage() for r in caplog.records] == ["shown"]
    with pytest.raises(TypeError, match="level must be an int or a str, got float"):
        log.set_level(1.5)


def test_no_root_configuration():
    root_handlers = list(logging.getLogger().handlers)
    Logger("recis.tests.other").info("message")
    assert logging.getLogger().handlers == root_handlers
    assert logging.getLogger("recis.tests.other").handlers == []
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("recis").handlers)


def test_name_must_be_str():
    with pytest.raises(TypeError, match="name must be a str, got int"):
        Logger(3)


def test_hook_methods_accept_and_ignore_arguments():
    hook = Hook()
    for name in (
        "before_train",
        "after_train",
        "before_evaluate",
        "after_evaluate",
        "before_epoch",
        "after_epoch",
        "before_step",
        "end",
    ):
        method = getattr(hook, name)
        assert method() is None
        assert method(1, 2, key="value") is None
    assert hook.after_step() is None
    assert hook.after_step({"loss": 0.1}, 10) is None
    assert hook.after_step(metrics={"loss": 0.1}, global_step=10, extra=1) is None


def test_hook_subclass_overrides_selected_points():
    class Recorder(Hook):
        def __init__(self):
            self.steps = []

        def after_step(self, metrics=None, global_step=None):
            self.steps.append((global_step, metrics))

    hook = Recorder()
    hook.before_train()
    for step in range(3):
        hook.before_step()
        hook.after_step({"loss": step}, step)
    hook.end()
    assert hook.steps == [(0, {"loss": 0}), (1, {"loss": 1}), (2, {"loss": 2})]
