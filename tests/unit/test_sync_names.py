"""Pure parts of the sync: object names, conninfo handling, SCRAM verifiers (no server)."""

from __future__ import annotations

import pytest

from mailtower.goc.sync import SyncError, names, sync_conninfo
from mailtower.goc.sync.conninfo import endpoint, redact
from mailtower.goc.sync.roles import scram_matches, scram_verifier


def test_names_are_unique_per_tower_and_slots_per_timeline() -> None:
    assert names.config_subscription("tower-a") == "mt_config_tower_a"
    assert names.events_subscription("tower-b") == "mt_events_tower_b"
    assert names.events_slot("tower-a", 2) == "mt_events_tower_a_tl2"
    assert names.config_slot("tower-a", 1) != names.config_slot("tower-a", 2)


@pytest.mark.parametrize("bad", ["Tower-A", "tower a", "1tower", "", "t" * 32, "tower_a"])
def test_tower_names_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="not a tower name"):
        names.tower_key(bad)


def test_conninfo_names_one_server_and_hides_its_password() -> None:
    info = sync_conninfo("10.201.9.10", 5432, "mailtower", "mt_sync", "s3cret pass")
    assert endpoint(info) == ("10.201.9.10", "5432", "mailtower")
    assert "s3cret" not in redact(info) and "password=***" in redact(info)
    with pytest.raises(SyncError, match="one server"):
        sync_conninfo("10.201.1.12,10.201.1.13", 5432, "mailtower", "mt_sync")
    with pytest.raises(SyncError, match="one host"):
        endpoint("host=10.201.1.12,10.201.1.13 dbname=mailtower")


def test_scram_verifier_round_trip() -> None:
    verifier = scram_verifier("correct horse", salt=b"0123456789abcdef")
    assert verifier.startswith("SCRAM-SHA-256$4096:")
    assert scram_matches(verifier, "correct horse")
    assert not scram_matches(verifier, "wrong horse")
    assert not scram_matches("md5abcdef", "correct horse")
    assert not scram_matches(None, "correct horse")
