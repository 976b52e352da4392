"""The twin lab's pair: towers lab-a and lab-b at two sites, linked by MX records.

`invoke dns` publishes them into the lab's DNS server (inventory/lab_internet.py). A real
pair file gives the same keys: towers (two inventories), sites, server, tsig_file, publication.
"""

from inventory._lab import lab_pair

PAIR = lab_pair()
