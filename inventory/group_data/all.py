"""Data shared by every host of every inventory (pyinfra group_data)."""

# Debian 12 hosts: apt without prompts, no recommended packages (smaller, fewer surprises).
apt_no_recommends = True
