"""The twin lab's "internet" (10.201.0.0/24): the authoritative DNS server, a sending MTA and
the customers' mail servers. Built by `invoke lab.up --towers a,b`, deployed by
`pyinfra inventory/lab_internet.py deploys/lab_internet.py` (invoke deploy --tower lab does it
first). The GOC is deployed from its own inventory (lab_goc.py, or init's), as a real one.
"""

from inventory._lab import internet_data, internet_groups

_groups = internet_groups()
dns = _groups["dns"]
sender = _groups["sender"]
customers = _groups["customers"]

internet = (dns + sender + customers, internet_data())
