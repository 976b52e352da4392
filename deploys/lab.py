"""Deploy a lab tower and the lab's customer mail servers.

pyinfra inventory/lab_a.py deploys/lab.py
"""

from pyinfra import host

from mailtower.controller.lab import plan
from roles import lab_mailserver
from roles.tower import deploy_tower

deploy_tower(extra_packages=lab_mailserver.PACKAGES if "customers" in host.groups else None)
if "customers" in host.groups:
    index = [h.name for h in plan.customer_hosts()].index(host.data.lab_name) + 1
    lab_mailserver.deploy_lab_mailserver(domain=plan.customer_domain(index))
