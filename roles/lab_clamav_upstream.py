"""Lab only: the stand-in for ClamAV's CDN on the lab internet's DNS host.

nginx serves :data:`~mailtower.controller.lab.clamav_upstream.SERVE_DIR` on port 80 to the
lab's GOC and the controller; the controller puts the test database's files there and sets
the ``current.cvd.clamav.net`` TXT record in the lab's BIND (zone ``clamav.net``, a dynamic
zone of roles/dns.py) with ``mailtower.controller.lab.clamav_upstream.publish``.

Install: ``PACKAGES`` only (the deploy installs them).
"""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import files

from mailtower.controller.lab import clamav_upstream, plan
from roles import _common
from roles._common import TEMPLATES

PACKAGES = ["nginx-light"]
SITE = "/etc/nginx/sites-enabled/clamav-upstream"


def readers() -> list[str]:
    """Who may fetch: the lab's GOC (cvdupdate) and the controller."""
    return [str(plan.goc_host().address), str(plan.HOST_ADDRESS)]


def configure() -> list:
    # The controller writes the files as root; nginx (www-data) reads them.
    files.directory(
        name=f"Ensure {clamav_upstream.SERVE_DIR}", path=clamav_upstream.SERVE_DIR, mode="755"
    )
    return [
        files.link(
            name="Remove nginx's default site",
            path="/etc/nginx/sites-enabled/default",
            present=False,
        ),
        files.template(
            name=f"Render {SITE}",
            src=str(TEMPLATES / "lab_clamav_upstream/etc/nginx/sites-enabled/clamav-upstream.j2"),
            dest=SITE,
            address=clamav_upstream.dns_host(),
            port=clamav_upstream.PORT,
            root=clamav_upstream.SERVE_DIR,
            readers=readers(),
        ),
    ]


@deploy("mailtower lab: stand-in ClamAV upstream (nginx)")
def deploy_lab_clamav_upstream():
    # A restart, not a reload: the first deploy moves nginx from the default site's *:80 to
    # the DNS host's address, and a reload cannot bind it while the old listener holds the
    # port (nginx logs "still could not bind()" and keeps serving the default site).
    _common.activate("nginx", _common.changes(configure()), check="nginx -t -q")
