"""Tower pairs for the DNS tests, and a private BIND ``named`` on the loopback."""

from __future__ import annotations

import copy
import subprocess
import time
from pathlib import Path
from typing import Any

import dns.name
from scand_fakes import free_port

from mailtower.controller.dns.exceptions import DnsError
from mailtower.controller.dns.model import TowerPair, load_pair
from mailtower.controller.dns.server import AuthServer, TsigKey, check_serves_zone
from mailtower.controller.dns.zonefile import file_name, write_zone_files

UPDATE_KEY = "mailtower-update"  # allowed to update every zone
OTHER_KEY = "someone-else"  # known to the server, allowed nothing

# Each customer domain its own zone, each tower's host names in its site's zone.
ZONE_PER_DOMAIN = [
    "tower-a.lab",
    "tower-b.lab",
    "customer1.lab",
    "customer2.lab",
    "201.10.in-addr.arpa",
    "1.0.0.0.1.0.2.0.0.0.d.f.ip6.arpa",
]
# Everything in one parent zone, as the lab's DNS serves it
# (mailtower.controller.lab.plan.LAB_ZONE).
ONE_PARENT_ZONE = ["lab", "201.10.in-addr.arpa", "1.0.0.0.1.0.2.0.0.0.d.f.ip6.arpa"]
LAYOUTS = {"zone-per-domain": ZONE_PER_DOMAIN, "one-parent-zone": ONE_PARENT_ZONE}


def pair_data(**overrides: Any) -> dict[str, Any]:
    """The description of a valid pair (plain data), with top-level fields replaced."""
    data: dict[str, Any] = {
        "towers": [
            {
                "name": "a",
                "site": "site-a",
                "mx_hosts": ["mx.tower-a.lab"],
                "ipv4": ["10.201.1.10"],
                "ipv6": ["fd00:201:1::10"],
            },
            {
                "name": "b",
                "site": "site-b",
                "mx_hosts": ["mx.tower-b.lab"],
                "ipv4": ["10.201.2.10"],
            },
        ],
        "domains": ["customer1.lab", "customer2.lab"],
        "zones": list(ZONE_PER_DOMAIN),
        "nameservers": [{"name": "ns.dns.test"}],
    }
    data.update(copy.deepcopy(overrides))
    return data


def make_pair(**overrides: Any) -> TowerPair:
    return load_pair(pair_data(**overrides))


def with_tower(data: dict[str, Any], index: int, **fields: Any) -> dict[str, Any]:
    """``data`` with fields of tower ``index`` replaced."""
    data = copy.deepcopy(data)
    data["towers"][index].update(fields)
    return data


class Named:
    """A private BIND ``named`` in the foreground on 127.0.0.1, serving a pair's zones.

    Zones allow updates (and with ``allow_transfer`` AXFR) signed with UPDATE_KEY only;
    OTHER_KEY is known but allowed nothing.
    """

    def __init__(
        self,
        workdir: Path,
        pair: TowerPair,
        *,
        with_records: bool = False,
        allow_transfer: bool = False,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.pair = pair
        self.key = self._tsig_keygen(UPDATE_KEY)
        self.other_key = self._tsig_keygen(OTHER_KEY)
        self.zone_files = write_zone_files(pair, workdir, with_records=with_records)
        self.log = workdir / "named.log"
        self.proc: subprocess.Popen[bytes] | None = None
        transfer = f'key "{UPDATE_KEY}";' if allow_transfer else "none;"
        zones = "".join(
            f'zone "{zone}" {{ type primary; file "{file_name(zone)}"; '
            f'allow-update {{ key "{UPDATE_KEY}"; }}; }};\n'
            for zone in pair.zones
        )
        (workdir / "named.conf").write_text(
            f"""options {{
    directory "{workdir}";
    pid-file "{workdir}/named.pid";
    session-keyfile "{workdir}/session.key";
    managed-keys-directory "{workdir}";
    listen-on port {self.port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    notify no;
    dnssec-validation no;
    allow-transfer {{ {transfer} }};
}};
controls {{ }};
include "{workdir}/keys.conf";
{zones}"""
        )
        (workdir / "keys.conf").write_text(self.key.to_bind() + self.other_key.to_bind())

    def _tsig_keygen(self, name: str) -> TsigKey:
        """A key made by BIND's own tsig-keygen, read back by the project's parser."""
        path = self.workdir / f"{name}.key"
        path.write_bytes(
            subprocess.run(
                ["tsig-keygen", "-a", "hmac-sha256", name], check=True, capture_output=True
            ).stdout
        )
        return TsigKey.from_file(path)

    def server(self, key: TsigKey | None = None, **kwargs: Any) -> AuthServer:
        return AuthServer("127.0.0.1", self.port, key=key or self.key, **kwargs)

    def start(self, timeout_s: float = 20.0) -> Named:
        subprocess.run(
            ["named-checkconf", str(self.workdir / "named.conf")], check=True, capture_output=True
        )
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["named", "-g", "-4", "-n", "1", "-c", str(self.workdir / "named.conf")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        pending = list(self.pair.zones)
        server = self.server(timeout_s=1.0)
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"named exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                check_serves_zone(server, dns.name.from_text(pending[0]))
                pending.pop(0)
                continue
            except DnsError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"named did not serve {pending[0]} within {timeout_s}s")
            time.sleep(0.02)
        return self

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
