"""The preflight's checks: each host as it is before anything is changed, read-only.

One script per host, over the SSH the deploy uses, gathers its facts (Debian version, CPUs,
RAM, the /var filesystem, clock discipline) and makes every TCP connect the design needs from
it (bash's /dev/tcp under ``timeout``: on a minimal Debian); hosts run in parallel. A refused
connection is an open path (nothing listens before the first deploy, and the towers' own
firewalls answer with a reset), a timeout or "no route" is a closed one. Every check runs; each
failure is one line naming the host, the check and the fix.
"""

from __future__ import annotations

import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mailtower.controller.preflight.ports import Probe
from mailtower.controller.preflight.runner import SSH_FAILED, ScriptRunner
from mailtower.controller.preflight.sizing import DISK_PATH, TOLERANCE, Size

CONNECT_TIMEOUT_S = 3  # a path that does not answer within this is filtered
CLOCK_SLACK_S = 1.0  # a container's clock (its host's) may differ from ours by this


@dataclass(frozen=True)
class FailedCheck:
    """One failed check."""

    host: str
    check: str
    detail: str
    fix: str

    def line(self) -> str:
        return f"{self.host}: {self.check}: {self.detail}; fix: {self.fix}"


@dataclass
class HostCheck:
    """A host to check: its role, its size, how to reach it, what it must reach."""

    address: str
    role: str
    size: Size
    runner: ScriptRunner
    probes: list[Probe] = field(default_factory=list)
    resolve: list[str] = field(default_factory=list)  # names it must resolve
    way_out: str | None = None  # a URL it must reach (the GOC's ClamAV upstream)


@dataclass
class PreflightReport:
    findings: list[FailedCheck]
    hosts: int
    checks: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


# --- the script -------------------------------------------------------------------------------

_FACTS = f"""set +e
. /etc/os-release 2>/dev/null
echo "os=$ID $VERSION_ID"
echo "cpus=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"
awk '/^MemTotal:/ {{print "mem_kib=" $2}}' /proc/meminfo
echo "disk_kib=$(df -Pk {DISK_PATH} 2>/dev/null | awk 'NR==2 {{print $2}}')"
echo "ntp=$(timeout 5 timedatectl show -p NTPSynchronized --value 2>/dev/null)"
command -v chronyc >/dev/null &&
  chronyc -n tracking 2>/dev/null | sed -n 's/^Leap status *: */chrony=/p'
echo "virt=$(systemd-detect-virt --container 2>/dev/null || echo none)"
echo "now=$(date +%s.%N)"
probe() {{
  local err rc
  err=$(timeout {CONNECT_TIMEOUT_S} bash -c "exec 3<>/dev/tcp/$1/$2" 2>&1); rc=$?
  if [ $rc = 0 ]; then echo "probe $1 $2 open"
  elif [ $rc = 124 ]; then echo "probe $1 $2 timeout"
  elif echo "$err" | grep -qi refused; then echo "probe $1 $2 refused"
  else echo "probe $1 $2 error ${{err##*: }}"; fi
}}
resolve() {{
  echo "resolve $1 $(timeout 5 getent ahostsv4 "$1" | awk '{{print $1}}' | sort -u | tr '\\n' ' ')"
}}
"""


def script(target: HostCheck) -> str:
    """The one script the target runs: facts, then its probes and look-ups in parallel."""
    lines = [_FACTS]
    lines += [f"probe {p.dst} {p.port} &" for p in target.probes]
    names = list(target.resolve)
    way = _split_url(target.way_out) if target.way_out else None
    if way is not None:
        names.append(way[0])
    lines += [f"resolve {shlex.quote(n)} &" for n in names]
    if way is not None:
        lines.append(
            f"wayout() {{ local ip; ip=$(timeout 5 getent ahostsv4 {shlex.quote(way[0])}"
            " | awk 'NR==1 {print $1}'); "
            f'[ -n "$ip" ] && probe "$ip" {way[1]} | sed "s/^probe/wayout/"; }}; wayout &'
        )
    lines.append("wait")
    return "\n".join(lines) + "\n"


def _split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def parse(out: str) -> tuple[dict[str, str], dict[tuple[str, int], str], dict[str, list[str]]]:
    """Facts, probe outcomes ((ip, port) → open/refused/timeout/error …) and look-ups."""
    facts: dict[str, str] = {}
    probes: dict[tuple[str, int], str] = {}
    resolved: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.startswith(("probe ", "wayout ")):
            kind, ip, port, outcome = (line.split(" ", 3) + [""])[:4]
            probes[(("wayout:" if kind == "wayout" else "") + ip, int(port))] = outcome
        elif line.startswith("resolve "):
            _, name, *ips = line.split()
            resolved[name] = ips
        elif "=" in line:
            key, _, value = line.partition("=")
            facts[key] = value.strip()
    return facts, probes, resolved


# --- judging one host's answers ---------------------------------------------------------------


def judge(
    target: HostCheck, facts: dict[str, str], sent_at: float, answered_at: float
) -> list[FailedCheck]:
    """The host's own checks: Debian 12, CPUs, RAM, disk, clock."""
    host, out = f"{target.address} ({target.role})", []
    os_release = facts.get("os", "")
    if os_release != "debian 12":
        out.append(
            FailedCheck(
                host,
                "debian",
                f"runs {os_release.strip() or 'an unknown system'}, not Debian 12",
                "install Debian 12 (bookworm)",
            )
        )
    size = target.size
    cpus = _int(facts.get("cpus"))
    if cpus < size.cpus:
        out.append(
            FailedCheck(
                host,
                "cpu",
                f"{cpus} CPUs, a {target.role} host needs {size.cpus}",
                "give the host more CPUs (docs/first-real-pair.md, sizing)",
            )
        )
    ram_mib = _int(facts.get("mem_kib")) // 1024
    if ram_mib < size.ram_mib * TOLERANCE:
        out.append(
            FailedCheck(
                host,
                "ram",
                f"{ram_mib} MiB of RAM, a {target.role} host needs {size.ram_mib} MiB",
                "give the host more RAM (docs/first-real-pair.md, sizing)",
            )
        )
    disk_gib = _int(facts.get("disk_kib")) / 2**20
    if disk_gib < size.disk_gib * TOLERANCE:
        out.append(
            FailedCheck(
                host,
                "disk",
                f"{DISK_PATH} is on {disk_gib:.1f} GiB,"
                f" a {target.role} host needs {size.disk_gib} GiB",
                f"grow the filesystem holding {DISK_PATH}",
            )
        )
    out += _clock(host, facts, sent_at, answered_at)
    return out


def _int(text: str | None) -> int:
    try:
        return int(float(text or 0))
    except ValueError:
        return 0


def _clock(
    host: str, facts: dict[str, str], sent_at: float, answered_at: float
) -> list[FailedCheck]:
    if facts.get("ntp") == "yes" or facts.get("chrony") == "Normal":
        return []
    fix = "apt-get install systemd-timesyncd (or chrony) and check `timedatectl` says synchronized"
    # A container keeps its host's clock: it is in sync if it reads ours (this machine's).
    now = float(facts.get("now") or 0)
    slack = (answered_at - sent_at) + CLOCK_SLACK_S
    if facts.get("virt", "none") != "none" and sent_at - CLOCK_SLACK_S <= now <= sent_at + slack:
        return []
    seen = f"NTPSynchronized={facts.get('ntp') or 'unknown'}"
    if "chrony" in facts:
        seen += f", chrony leap status {facts['chrony']}"
    return [FailedCheck(host, "clock", f"not synchronised ({seen})", fix)]


def judge_paths(target: HostCheck, outcomes: dict[tuple[str, int], str]) -> list[FailedCheck]:
    out = []
    for p in target.probes:
        outcome = outcomes.get((p.dst, p.port), "not tried")
        if outcome in ("open", "refused"):
            continue
        what = "timed out (filtered)" if outcome == "timeout" else outcome
        out.append(
            FailedCheck(
                f"{target.address} ({target.role})",
                "port",
                f"TCP {p.dst}:{p.port} ({p.why}) {what}",
                f"open TCP {p.port} from {p.src} to {p.dst} in every firewall between them",
            )
        )
    return out


def judge_names(target: HostCheck, resolved: dict[str, list[str]]) -> list[FailedCheck]:
    return [
        FailedCheck(
            f"{target.address} ({target.role})",
            "dns",
            f"{name} does not resolve here",
            f"give {name} an A record, or the host a resolver that has it (/etc/resolv.conf)",
        )
        for name in target.resolve
        if not resolved.get(name)
    ]


def judge_way_out(
    target: HostCheck, outcomes: dict[tuple[str, int], str], resolved: dict[str, list[str]]
) -> list[FailedCheck]:
    if target.way_out is None:
        return []
    name, port = _split_url(target.way_out)
    host = f"{target.address} ({target.role})"
    fix = f"let this host resolve {name} and open TCP {port} out to it (the ClamAV mirror)"
    ips = resolved.get(name, [])
    if not ips:
        return [FailedCheck(host, "way out", f"{name} ({target.way_out}) does not resolve", fix)]
    outcome = next(
        (o for (ip, p), o in outcomes.items() if ip.startswith("wayout:") and p == port),
        "not tried",
    )
    if outcome == "open":  # a real connect: a refusal is a firewall's reject, not a way out
        return []
    return [FailedCheck(host, "way out", f"{target.way_out}: TCP {port} {outcome}", fix)]


def check_host(target: HostCheck, timeout: float = 60) -> list[FailedCheck]:
    """Every check of one host, from one script run over its runner."""
    sent_at = time.time()
    ran = target.runner.run(script(target), timeout)
    answered_at = time.time()
    if ran.rc == SSH_FAILED or (ran.rc != 0 and "os=" not in ran.out):
        detail = (ran.err.strip().splitlines() or ["no answer"])[-1]
        return [
            FailedCheck(
                f"{target.address} ({target.role})",
                "ssh",
                f"cannot log in as the deploy does: {detail} (its other checks not run)",
                "check the inventory's host name (or its ssh_hostname, ssh_port), that sshd"
                " runs, and the key: the inventory's ssh_key or one in the SSH agent (ssh-add),"
                " authorised for the inventory's ssh_user",
            )
        ]
    facts, outcomes, resolved = parse(ran.out)
    return [
        *judge(target, facts, sent_at, answered_at),
        *judge_paths(target, outcomes),
        *judge_names(target, resolved),
        *judge_way_out(target, outcomes, resolved),
    ]


def resolve_ipv4(names: Iterable[str], timeout: float = 5) -> dict[str, set[str]]:
    """Each name's IPv4 addresses as this machine's resolver gives them (no shell: a name is
    never a command), all looked up at once; a name without an answer within ``timeout``
    (or with none) is left out."""
    found: dict[str, set[str]] = {}

    def look(name: str) -> None:
        try:
            infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return
        found[name] = {str(info[4][0]) for info in infos}

    threads = [threading.Thread(target=look, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return dict(found)


def check_mx_names(
    names: dict[str, str], resolve: Callable[[Iterable[str]], dict[str, set[str]]] | None = None
) -> tuple[list[FailedCheck], list[str]]:
    """Each relay's MX name as the world resolves it (here, on the controller): a name that
    resolves elsewhere is a failure; one not yet published is a note (``invoke dns`` publishes
    it after the deploy)."""
    seen = (resolve or resolve_ipv4)(list(names))
    findings, notes = [], []
    for name, relay in names.items():
        if name not in seen:
            notes.append(f"{name} does not resolve yet: `invoke dns` publishes it (A {relay})")
        elif relay not in seen[name]:
            findings.append(
                FailedCheck(
                    "controller",
                    "dns",
                    f"MX name {name} resolves to {', '.join(sorted(seen[name]))},"
                    f" not the relay {relay}",
                    f"point {name} at {relay} (invoke dns --pair … replaces the record it manages)",
                )
            )
    return findings, notes


def run_all(
    targets: Iterable[HostCheck],
    *,
    mx_names: dict[str, str] | None = None,
    workers: int = 32,
    mx_resolve: Callable[[Iterable[str]], dict[str, set[str]]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> PreflightReport:
    """Every check of every host, hosts in parallel; nothing stops at the first failure."""
    targets = list(targets)
    started = time.monotonic()
    findings: list[FailedCheck] = []
    notes: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(targets) or 1))) as pool:
        mx = pool.submit(check_mx_names, mx_names, mx_resolve) if mx_names else None
        for result in pool.map(check_host, targets):
            findings += result
        if mx is not None:
            more, notes = mx.result()
            findings += more
    checks = sum(6 + len(t.probes) + len(t.resolve) + (1 if t.way_out else 0) for t in targets)
    checks += len(mx_names or {})
    if progress:
        progress(f"preflight: {len(targets)} hosts, {checks} checks")
    return PreflightReport(findings, len(targets), checks, time.monotonic() - started, notes)
