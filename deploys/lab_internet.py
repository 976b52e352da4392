"""Deploy the twin lab's internet: DNS server (and on it the stand-in ClamAV upstream),
sender, customer mail servers. The GOC (backed up to the sender) is deployed from its own
inventory with deploys/goc.py, as an operator's is.

pyinfra inventory/lab_internet.py deploys/lab_internet.py
"""

from pyinfra import host
from pyinfra.operations import apt

from mailtower.controller.lab import plan
from roles import dns, lab_clamav_upstream, lab_mailserver, lab_sender
from roles.tower import refresh_package_lists

packages = sorted(
    set(dns.PACKAGES + lab_clamav_upstream.PACKAGES if "dns" in host.groups else [])
    | set(lab_sender.PACKAGES if "sender" in host.groups else [])
    | set(lab_mailserver.PACKAGES if "customers" in host.groups else [])
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
