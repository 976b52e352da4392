"""The quarantine manager's settings block (TowerSettings.quarantine)."""

from __future__ import annotations

from typing import Any

import pytest
from monitor_fakes import tower

from mailtower.errors import SettingsError
from mailtower.settings import QuarantineSettings, from_data


def data(**quarantine: Any) -> dict[str, Any]:
    d = tower(1, 2).model_dump(mode="json")
    d["quarantine"] = quarantine
    return d


def test_defaults_send_no_notices() -> None:
    q = from_data(data()).quarantine
    assert q == QuarantineSettings()
    assert q.notice_from is None and q.portal_url is None
    assert q.poll_interval_s == 5.0 and q.notices_per_minute == 60


def test_a_notice_address_and_portal() -> None:
    q = from_data(
        data(notice_from="quarantine@mx.unit.test", portal_url="https://portal.unit.test/q")
    ).quarantine
    assert q.notice_from == "quarantine@mx.unit.test"


@pytest.mark.parametrize(
    "bad",
    [
        {"notice_from": "quarantine@mx.unit.test\r\nBcc: x@y.test"},
        {"notice_from": "no domain"},
        {"notice_from": "a b@mx.unit.test"},
        {"portal_url": "http://portal.unit.test"},  # a link to a login page: HTTPS only
        {"portal_url": "https://portal.unit.test/\r\nX: y"},
        {"poll_interval_s": 0},
        {"notices_per_minute": 0},
        {"unknown": 1},
    ],
)
def test_bad_values_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(SettingsError, match="quarantine"):
        from_data(data(**bad))


def test_notices_stay_below_the_relays_client_rate() -> None:
    d = data(notice_from="quarantine@mx.unit.test", notices_per_minute=120)
    d["limits"]["client_message_rate"] = 120
    with pytest.raises(SettingsError, match="client_message_rate"):
        from_data(d)
    d["limits"]["client_message_rate"] = 0  # no limit at the relay
    assert from_data(d).quarantine.notices_per_minute == 120
