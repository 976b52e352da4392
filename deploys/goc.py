"""Deploy a global operations centre: PostgreSQL hub, sync with every tower, VirusEye.

pyinfra inventory/<goc>.py deploys/goc.py      (the lab's: inventory/lab_goc.py)

Run it before the towers (they subscribe to its configuration) and again after them (it
subscribes to their events; a tower not deployed yet is reported and left for that run).
"""

from pyinfra.operations import apt

from roles.goc import PACKAGES, deploy_goc
from roles.tower import refresh_package_lists

refresh_package_lists()
apt.packages(name="Install the role's Debian packages", packages=PACKAGES, no_recommends=True)
deploy_goc()
