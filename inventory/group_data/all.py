"""Data shared by every host of every tower inventory (pyinfra group_data)."""

# The roles manage system services, packages and /etc: they connect as root. A tower whose
# hosts only allow a sudo user sets ssh_user to it and `_sudo = True` in its inventory.
ssh_user = "root"
