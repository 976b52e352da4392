"""The lab's stand-in ClamAV upstream: which files serve version N, the TXT record cvdupdate
reads, one flipped byte, and the order of a publish."""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
from pathlib import Path

import dns.rdatatype
import pytest

from mailtower.controller.errors import PublishError
from mailtower.controller.lab import clamav_upstream as up


@pytest.fixture
def testfiles(tmp_path) -> Path:
    """Stand-ins for ClamAV's test files: distinct contents, a CVD longer than its header."""
    d = tmp_path / "testfiles"
    d.mkdir()
    for n in range(1, 7):
        (d / f"test-{n}.cvd").write_bytes(b"ClamAV-VDB:" + bytes([n]) * 3000)
        if n > 1:
            (d / f"test-{n}.cdiff").write_bytes(bytes([0x40 + n]) * 700)
    return d


def _cvdupdate_tokens(rdata_text: str) -> list[str]:
    """How cvdupdate 1.2.0 reads the record (_query_dns_txt_entry)."""
    return re.search('".*"', rdata_text).group().strip('"').split(":")  # type: ignore[union-attr]


def test_txt_record_carries_the_version_in_dailys_field():
    message = up.txt_update(up.txt_text(5, now=1765000000))
    # A replace: the old TXT record set deleted, this one added, in one update.
    deleted, rrset = message.update
    assert deleted.name == rrset.name and len(deleted) == 0
    assert rrset.name.to_text() == "current.cvd.clamav.net." and rrset.ttl == up.TXT_TTL
    assert rrset.rdtype == dns.rdatatype.TXT
    tokens = _cvdupdate_tokens(str(rrset))
    assert tokens[up.TXT_FIELD] == "5" and up.TXT_FIELD == 2
    assert tokens[3] == "1765000000" and len(tokens) == 8


@pytest.mark.parametrize("field", [0, 3, 8])
def test_txt_field_must_be_a_version_field(field):
    with pytest.raises(PublishError, match="cannot carry a version"):
        up.txt_text(1, field=field)


def test_version_n_serves_its_cvd_as_test_cvd_and_cdiffs_2_to_n(testfiles):
    files = up.served_files(testfiles, 4)
    assert files == {
        "test.cvd": testfiles / "test-4.cvd",
        "test-2.cdiff": testfiles / "test-2.cdiff",
        "test-3.cdiff": testfiles / "test-3.cdiff",
        "test-4.cdiff": testfiles / "test-4.cdiff",
    }
    assert up.served_files(testfiles, 1) == {"test.cvd": testfiles / "test-1.cvd"}


@pytest.mark.parametrize("version", [0, 7])
def test_only_the_test_files_versions_can_be_served(testfiles, version):
    with pytest.raises(PublishError, match="1 … 6"):
        up.served_files(testfiles, version)


def test_flip_byte_changes_one_byte_of_the_signed_body():
    data = bytes(range(256)) * 12
    flipped = up.flip_byte(data)
    diff = [i for i, (a, b) in enumerate(zip(data, flipped, strict=True)) if a != b]
    assert len(diff) == 1 and diff[0] >= 512  # past a CVD's header
    assert flipped[diff[0]] == data[diff[0]] ^ 0xFF
    small = up.flip_byte(b"abcd")
    assert sum(a != b for a, b in zip(b"abcd", small, strict=True)) == 1


def _members(tar_bytes: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]


@pytest.mark.parametrize("corrupt", ["test-5.cdiff", "test.cvd"])
def test_corrupt_flips_one_byte_of_that_served_file_only(testfiles, corrupt):
    files = up.served_files(testfiles, 6)
    members = _members(up.served_tar(files, corrupt))
    assert sorted(members) == sorted(files)
    for name, data in members.items():
        original = files[name].read_bytes()
        changed = sum(a != b for a, b in zip(original, data, strict=True))
        assert changed == (1 if name == corrupt else 0), name


def test_corrupt_names_a_served_file(testfiles):
    with pytest.raises(PublishError, match="not served at this version"):
        up.served_tar(up.served_files(testfiles, 3), "test-5.cdiff")


def test_install_command_puts_the_version_in_place_and_drops_other_cdiffs(testfiles, tmp_path):
    serve = tmp_path / "serve"
    for version in (6, 3):  # down again: test-4..6.cdiff must go
        files = up.served_files(testfiles, version)
        done = subprocess.run(
            ["sh", "-c", up.install_command(list(files), str(serve))],
            input=up.served_tar(files),
            capture_output=True,
        )
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in serve.iterdir()) == sorted(files)
        assert (serve / "test.cvd").read_bytes() == (testfiles / f"test-{version}.cvd").read_bytes()
        assert oct((serve / "test.cvd").stat().st_mode & 0o777) == "0o644"


def test_publish_installs_the_files_before_announcing_the_version(testfiles, monkeypatch):
    events: list[tuple[str, object]] = []

    def shell(command: str, stdin: bytes) -> str:
        events.append(("files", sorted(_members(stdin))))
        return ""

    monkeypatch.setattr(up, "set_txt", lambda server, text: events.append(("txt", text)))
    server = up.AuthServer("10.201.0.53", key=up.TsigKey("k", "c2VjcmV0"))
    up.publish(5, "test-5.cdiff", shell=shell, server=server, testfiles=testfiles)
    assert [e[0] for e in events] == ["files", "txt"]
    assert events[0][1] == [
        "test-2.cdiff",
        "test-3.cdiff",
        "test-4.cdiff",
        "test-5.cdiff",
        "test.cvd",
        "urlhaus_clamav.ndb",
        "urlhaus_clamav.ndb.sha256",
    ]
    assert str(events[1][1]).split(":")[up.TXT_FIELD] == "5"


def test_the_feed_is_urlhaus_shaped_loads_in_libclamav_and_its_checksum_holds(tmp_path):
    import hashlib
    import shutil

    from mailtower.clamavdb import verify_feed
    from mailtower.settings import ClamavFeed

    served = up.feed_files(3)
    data = served[up.FEED_FILE]
    assert data.decode().count("Urlhaus.Lab.Url-") == 3
    # what Fangfrisch checks: the first word of <url>.sha256 is the file's sha256
    assert (
        served[f"{up.FEED_FILE}.sha256"].decode().split(" ")[0] == hashlib.sha256(data).hexdigest()
    )
    assert up.feed_files(1) != up.feed_files(2)
    options = ClamavFeed(name=up.FEED, enabled=True, options=up.feed_options()).options
    assert options["url_urlhaus"] == f"{up.base_url()}/{up.FEED_FILE}"
    if shutil.which("clamscan"):
        (tmp_path / up.FEED_FILE).write_bytes(data)
        verify_feed(tmp_path / up.FEED_FILE)  # libclamav loads it: the GOC serves it
    flipped = up.served_tar({}, up.FEED_FILE, served)
    assert (
        hashlib.sha256(_members(flipped)[up.FEED_FILE]).hexdigest()
        != hashlib.sha256(data).hexdigest()
    )


def test_publish_names_the_host_and_fix_when_the_files_cannot_be_installed(testfiles):
    from mailtower.controller.errors import StepFailed

    def shell(command: str, stdin: bytes) -> str:
        raise StepFailed(255, "ssh: connect to host 10.201.0.53 port 22: No route to host")

    server = up.AuthServer("10.201.0.53", key=up.TsigKey("k", "c2VjcmV0"))
    with pytest.raises(PublishError, match=r"DNS host 10\.201\.0\.53: installing .*invoke deploy"):
        up.publish(3, shell=shell, server=server, testfiles=testfiles)


def test_lab_goc_and_towers_are_wired_to_the_stand_in(monkeypatch, tmp_path):
    from inventory._lab import goc_data, internet_data, lab_pair, lab_tower_data
    from mailtower.controller.lab import plan
    from mailtower.settings import ClamavMirror, DnsServer, GocSettings

    monkeypatch.setattr(plan, "STATE_DIR", tmp_path / "lab")  # not the real lab's keys
    g = GocSettings.model_validate(goc_data())
    assert g.clamav is not None
    assert g.clamav.databases == {"test": 2}
    assert g.clamav.url == "http://10.201.0.53" and g.clamav.nameserver == "10.201.0.53"
    assert g.clamav.check_interval == "2m"
    tower = ClamavMirror.model_validate(lab_tower_data("a")["clamav"])
    assert tower.databases == ["test"] and tower.engine_mib == 64
    # BIND serves clamav.net as a dynamic zone; the towers' DNS publication leaves it alone.
    assert "clamav.net" in DnsServer.model_validate(internet_data()["dns"]).zones
    assert "clamav.net" not in lab_pair()["publication"]["zones"]
