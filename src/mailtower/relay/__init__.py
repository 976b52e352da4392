"""The relay host's own daemons: the queue exporter and the orderer (Postfix itself is
configured by roles/relay.py)."""
