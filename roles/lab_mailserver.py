"""Lab only: a customer's own mail server (real Postfix delivering to one catch-all Maildir),
so verification can see exactly what the tower delivered."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import files, server

from roles import _common
from roles._common import TEMPLATES

PACKAGES = ["postfix"]
MAILDIR = "/var/mail/vhosts/catchall"


def install() -> None:
    server.group(name="Ensure group vmail", group="vmail", gid=5000)
    server.user(
        name="Ensure user vmail",
        user="vmail",
        uid=5000,
        group="vmail",
        home="/var/mail/vhosts",
        shell="/usr/sbin/nologin",
    )


def configure(domain: str) -> list:
    files.directory(
        name="Ensure /var/mail/vhosts",
        path="/var/mail/vhosts",
        user="vmail",
        group="vmail",
        mode="2750",
    )  # setgid: inherited from Debian's /var/mail (2775)
    main = files.template(
        name="Render /etc/postfix/main.cf",
        src=str(TEMPLATES / "lab_mailserver/etc/postfix/main.cf.j2"),
        dest="/etc/postfix/main.cf",
        domain=domain,
    )
    return [main]


def activate(ops: list) -> None:
    _common.activate("postfix", _common.changes(ops), check="postfix check")


@deploy("mailtower lab customer mail server")
def deploy_lab_mailserver(domain: str):
    install()
    activate(configure(domain))
