"""Lab only: "the internet's" mail server — a real Postfix that finds the towers by MX lookup
in the lab's DNS, the way every sender in the world reaches a customer domain. Its host data
``sender`` is a ``mailtower.settings.LabSender``.

Install: ``PACKAGES`` only (the deploy installs them).
"""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import files

from mailtower.settings import LabSender
from roles import _common
from roles._common import TEMPLATES, put_text

PACKAGES = ["postfix"]
CA_FILE = "/etc/postfix/lab-ca.pem"


def settings() -> LabSender:
    """The ``sender`` host data, validated: DeployError naming the host and the bad field."""
    return _common.host_settings(LabSender, "sender", "inventory/lab_internet.py")


def configure(d: LabSender) -> list:
    # Postfix's smtp client resolves MX through this file (copied into its chroot at start).
    resolv = put_text(
        f"# Managed by mailtower (roles/lab_sender.py): the lab's DNS only.\n"
        f"nameserver {d.resolver}\noptions timeout:2 attempts:2\n",
        "/etc/resolv.conf",
    )
    ops = [resolv]
    if d.tls_ca:
        # The lab CA's root: the one CA it trusts, so a relay must send its whole chain.
        ops.append(put_text(d.tls_ca, CA_FILE))
    ops.append(
        files.template(
            name="Render /etc/postfix/main.cf",
            src=str(TEMPLATES / "lab_sender/etc/postfix/main.cf.j2"),
            dest="/etc/postfix/main.cf",
            internet=d,
            ca_file=CA_FILE,
        )
    )
    return ops


def activate(ops: list) -> None:
    _common.activate("postfix", _common.changes(ops), check="postfix check")


@deploy("mailtower lab sender (an internet MTA)")
def deploy_lab_sender():
    activate(configure(settings()))
