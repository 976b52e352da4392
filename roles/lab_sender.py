"""Lab only: "the internet's" mail server — a real Postfix that finds the towers by MX lookup
in the lab's DNS, the way every sender in the world reaches a customer domain."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.operations import files

from roles._common import TEMPLATES, activate, changes, put_text

PACKAGES = ["postfix"]


@deploy("mailtower lab sender (an internet MTA)")
def deploy_lab_sender():
    d = host.data.get("sender")
    if not d or "resolver" not in d or "domain" not in d or "submit_from" not in d:
        raise DeployError(
            f"{host.name}: host data 'sender' must give resolver, domain and submit_from "
            f"(see inventory/lab_internet.py)"
        )
    # Postfix's smtp client resolves MX through this file (copied into its chroot at start).
    resolv = put_text(
        f"# Managed by mailtower (roles/lab_sender.py): the lab's DNS only.\n"
        f"nameserver {d['resolver']}\noptions timeout:2 attempts:2\n",
        "/etc/resolv.conf",
    )
    main = files.template(
        name="Render /etc/postfix/main.cf",
        src=str(TEMPLATES / "lab_sender/etc/postfix/main.cf.j2"),
        dest="/etc/postfix/main.cf",
        internet=d,
    )
    activate("postfix", changes([resolv, main]), check="postfix check")
