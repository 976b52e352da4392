"""Deploy a global operations centre: PostgreSQL hub, sync with every tower, VirusEye; and,
with ``goc.backup``, its pgBackRest repository host (the inventory's goc_backup group).

pyinfra inventory/<goc>.py deploys/goc.py      (the lab's: inventory/lab_goc.py)

Run it before the towers (they subscribe to its configuration) and again after them (it
subscribes to their events; a tower not deployed yet is reported and left for that run).
"""

from pyinfra import host
from pyinfra.operations import apt

from roles.goc import PACKAGES, REPOSITORY_PACKAGES, deploy_goc_and_repository
from roles.tower import refresh_package_lists

refresh_package_lists()
apt.packages(
    name="Install the role's Debian packages",
    packages=sorted(
        set(PACKAGES if "goc" in host.groups else [])
        | set(REPOSITORY_PACKAGES if "goc_backup" in host.groups else [])
    ),
    no_recommends=True,
)
deploy_goc_and_repository()
