"""Lab tower B, tower A's twin at the other site: LXC hosts on 10.201.2.0/24.

Built by `invoke lab.up --towers a,b`.
The lab's customer mail servers are on 10.201.0.0/24.
"""

from inventory._lab import lab_groups, lab_tower_data

_groups = lab_groups("b")
relay = _groups["relay"]
monitor = _groups["monitor"]
sql = _groups["sql"]  # primary first, then the hot standby
scanners = _groups["scanners"]
customers = _groups["customers"]  # lab-only customer mail servers (deploys/lab.py)

tower = (relay + monitor + sql + scanners, {"mailtower": lab_tower_data("b")})
