"""The twin lab's "internet" (10.201.0.0/24): the authoritative DNS server, a sending MTA and
the customers' mail servers; and the lab's GOC (10.201.9.10). Built by
`invoke lab.up --towers a,b`, deployed by
`pyinfra inventory/lab_internet.py deploys/lab_internet.py`.
"""

from inventory._lab import goc_backup_groups, goc_data, goc_groups, internet_data, internet_groups

_groups = internet_groups()
dns = _groups["dns"]
sender = _groups["sender"]
customers = _groups["customers"]

internet = (dns + sender + customers, internet_data())
# The GOC too, so the first pass deploys it beside the internet (towers subscribe to it).
goc = (goc_groups()["goc"], {"goc": goc_data()})
# Its backup repository host (the twin lab's sender), when the lab has one.
if goc_backup_groups()["goc_backup"]:
    goc_backup = (goc_backup_groups()["goc_backup"], {"goc": goc_data()})
