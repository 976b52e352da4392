"""Deploy the twin lab's internet: DNS server (and on it the stand-in ClamAV upstream),
sender, customer mail servers; and the GOC, backed up to the sender (its goc_backup group).

pyinfra inventory/lab_internet.py deploys/lab_internet.py
"""

from pyinfra import host
from pyinfra.operations import apt

from mailtower.controller.lab import plan
from roles import dns, goc, lab_clamav_upstream, lab_mailserver, lab_sender
from roles.tower import refresh_package_lists

packages = sorted(
    set(dns.PACKAGES + lab_clamav_upstream.PACKAGES if "dns" in host.groups else [])
    | set(lab_sender.PACKAGES if "sender" in host.groups else [])
    | set(lab_mailserver.PACKAGES if "customers" in host.groups else [])
    | set(goc.PACKAGES if "goc" in host.groups else [])
    | set(goc.REPOSITORY_PACKAGES if "goc_backup" in host.groups else [])
)
refresh_package_lists()
apt.packages(name="Install the role's Debian packages", packages=packages, no_recommends=True)
if "dns" in host.groups:
    dns.deploy_dns()
    lab_clamav_upstream.deploy_lab_clamav_upstream()
if "sender" in host.groups:
    lab_sender.deploy_lab_sender()
if "customers" in host.groups:
    index = [h.name for h in plan.customer_hosts()].index(host.data.lab_name) + 1
    lab_mailserver.deploy_lab_mailserver(domain=plan.customer_domain(index))
# Last, on every host (its barrier orders the GOC's first backup after both sides are ready).
goc.deploy_goc_and_repository()
