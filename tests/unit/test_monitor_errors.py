"""The monitor's errors have one root under mailtower's: ``except MonitorError`` catches each."""

from __future__ import annotations

import pytest

from mailtower.errors import MailtowerError
from mailtower.monitor import errors
from mailtower.monitor.errors import MonitorError


@pytest.mark.parametrize(
    "error",
    [errors.HAProxyError, errors.RelayQueueError, errors.RolloutError, errors.CanaryFailed],
)
def test_each_monitor_error_is_a_monitor_error(error: type[Exception]) -> None:
    assert issubclass(error, MonitorError) and issubclass(error, MailtowerError)
    assert error.__doc__, "each error says in one line what it means"


def test_the_old_homes_name_the_same_classes() -> None:
    from mailtower.monitor import goc_status, haproxy, rollout

    assert haproxy.HAProxyError is errors.HAProxyError
    assert goc_status.RelayQueueError is errors.RelayQueueError
    assert (rollout.RolloutError, rollout.CanaryFailed) == (
        errors.RolloutError,
        errors.CanaryFailed,
    )
