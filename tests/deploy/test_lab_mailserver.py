"""The lab customers' own mail servers (issue 17): local parts starting with "nouser" do not
exist (refused at RCPT), every other one lands in the catch-all Maildir, for the lab domain
and the new-<hex>.lab domains verification adds. Real postconf and postmap read the rendered
main.cf."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from needs import missing

POSTCONF = "/usr/sbin/postconf"
POSTMAP = "/usr/sbin/postmap"
# The lab server keeps Debian's master.cf; the package installs the same one here.
MASTER = Path("/etc/postfix/master.cf")


@pytest.fixture
def conf_dir(render, settings, tmp_path) -> Path:
    if not (Path(POSTCONF).exists() and Path(POSTMAP).exists() and MASTER.exists()):
        missing("postconf, postmap and master.cf (package postfix)")
    (tmp_path / "master.cf").write_text(MASTER.read_text())
    (tmp_path / "main.cf").write_text(
        render("lab_mailserver/etc/postfix/main.cf", settings, domain="cust-a.lab")
    )
    return tmp_path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


def _param(conf_dir: Path, name: str) -> str:
    proc = _run(POSTCONF, "-c", str(conf_dir), "-x", "-h", name)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout.strip()


def _lookup(conf_dir: Path, table: str, key: str) -> str | None:
    proc = _run(POSTMAP, "-c", str(conf_dir), "-q", key, table)
    assert proc.returncode in (0, 1) and proc.stderr == "", proc.stderr
    return proc.stdout.strip() if proc.returncode == 0 else None


def test_postconf_reads_it_without_a_warning(conf_dir):
    proc = _run(POSTCONF, "-c", str(conf_dir), "-n")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize(
    ("address", "mailbox"),
    [
        ("someone@cust-a.lab", "catchall/"),
        ("x7f3a9@cust-a.lab", "catchall/"),
        ("not-nouser@cust-a.lab", "catchall/"),
        ("nouse@cust-a.lab", "catchall/"),
        ("someone@new-0a1b2c.lab", "catchall/"),
        ("nouser@cust-a.lab", None),
        ("nouser-4711@cust-a.lab", None),
        ("nousers@new-0a1b2c.lab", None),
    ],
)
def test_nouser_addresses_do_not_exist(conf_dir, address, mailbox):
    table = _param(conf_dir, "virtual_mailbox_maps")
    assert _lookup(conf_dir, table, address) == mailbox


def test_an_unknown_mailbox_is_refused_at_rcpt_with_550(conf_dir):
    """smtpd refuses an address of a virtual mailbox domain that virtual_mailbox_maps lacks
    (reject_unlisted_recipient, on by default) with this code: 550 5.1.1 User unknown."""
    assert _param(conf_dir, "smtpd_reject_unlisted_recipient") == "yes"
    assert _param(conf_dir, "unknown_virtual_mailbox_reject_code") == "550"


@pytest.mark.parametrize(
    ("domain", "served"),
    [("cust-a.lab", True), ("new-0a1b2c.lab", True), ("new-xyz.lab", False), ("other.lab", False)],
)
def test_the_domains_it_serves(conf_dir, domain, served):
    own, pattern = _param(conf_dir, "virtual_mailbox_domains").split(", ")
    assert own == "cust-a.lab"
    assert (domain == own or _lookup(conf_dir, pattern, domain) == "OK") is served
