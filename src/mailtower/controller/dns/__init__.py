"""MX generation and publication for twin towers (docs/design.md "Across towers").

From a tower pair (two towers, their shared customer domains, the zones to publish in) build
the MX, A/AAAA and PTR records; write them as zone files; compare them with what an
authoritative server serves; apply the difference with TSIG-signed RFC 2136 updates; and
check the result by querying that server directly. One module per concept, as in dnspython:

- ``model``: the typed input (``TowerPair``, ``load_pair``, ``pair_from_settings``)
- ``records``: the record sets the pair owns (``desired_records``)
- ``zonefile``: whole zones and zone-file text (``build_zones``, ``write_zone_files``)
- ``server``: the authoritative server, its TSIG key, direct queries (``AuthServer``, ``TsigKey``)
- ``diff``: desired against served (``plan``, ``Plan``, ``diff``)
- ``update``: RFC 2136 updates signed with TSIG (``apply``, ``publish``)
- ``verify``: what the server serves, checked (``check_published``)
- ``exceptions``: ``DnsError`` and one subclass per failure
- ``cli``: ``mailtower dns plan|apply|check|zonefiles``

Nothing is re-exported here: dnspython is a controller dependency, not installed on tower
hosts, and ``mailtower``'s CLI (which runs there too) imports ``mailtower.controller.dns.cli``.
"""
