"""The lab's global operations centre (10.201.9.10): PostgreSQL hub and VirusEye.
Deployed by `pyinfra inventory/lab_goc.py deploys/goc.py` (invoke deploy does it for a lab).
"""

from inventory._lab import goc_backup_groups, goc_data, goc_groups

goc = (goc_groups()["goc"], {"goc": goc_data()})
# Its backup repository host (the twin lab's sender), when the lab has one.
if goc_backup_groups()["goc_backup"]:
    goc_backup = (goc_backup_groups()["goc_backup"], {"goc": goc_data()})
