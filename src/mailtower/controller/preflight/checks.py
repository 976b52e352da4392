"""The preflight's checks: each host as it is before anything is changed, read-only.

One script per host, over the SSH the deploy uses, gathers its facts (Debian version, CPUs,
RAM, the /var filesystem, clock discipline) and makes every TCP connect the design needs from
it (bash's /dev/tcp under ``timeout``: on a minimal Debian); hosts run in parallel. A connect
that succeeds is an open path; a timeout or "no route" is a closed one. A refused connect is
either nothing listening (before the first deploy) or a firewall that rejects: the destination
then starts a short-lived listener on that address and port (python3, over the same SSH) and the
source connects again, which must succeed. Where no listener can be started (no python3, the
destination not among the hosts checked, the port not bindable) the path is "unverified": a
note naming host, port and why, neither a pass nor a failure. Every check runs; each failure is
one line naming the host, the check and the fix.
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
from mailtower.controller.preflight.runner import SSH_FAILED, Ran, ScriptRunner
from mailtower.controller.preflight.sizing import DISK_PATH, TOLERANCE, Size

CONNECT_TIMEOUT_S = 3  # a path that does not answer within this is filtered
# A listener for a refused path lives this long: its start, and the source's second connect
# (one SSH session each, all hosts at once), fit well inside it.
LISTENER_S = 30
LISTEN_PHASE_S = 10  # the destinations' listener sessions, all at once
REPROBE_PHASE_S = 15  # the sources' second connects, all at once
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

_PROBE = f"""probe() {{
  local err rc
  err=$(timeout {CONNECT_TIMEOUT_S} bash -c "exec 3<>/dev/tcp/$1/$2" 2>&1); rc=$?
  if [ $rc = 0 ]; then echo "probe $1 $2 open"
  elif [ $rc = 124 ]; then echo "probe $1 $2 timeout"
  elif echo "$err" | grep -qi refused; then echo "probe $1 $2 refused"
  else echo "probe $1 $2 error ${{err##*: }}"; fi
}}
"""

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
resolve() {{
  echo "resolve $1 $(timeout 5 getent ahostsv4 "$1" | awk '{{print $1}}' | sort -u | tr '\\n' ' ')"
}}
"""


def script(target: HostCheck) -> str:
    """The one script the target runs: facts, then its probes and look-ups in parallel."""
    lines = [_FACTS + _PROBE]
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


# The short-lived listener a destination starts for a refused path: bound to the address and
# port the source connects to, accepting (and closing) until ``timeout`` ends it.
_LISTENER_PY = """import errno, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.listen(64)
except OSError as e:
    print("error", errno.errorcode.get(e.errno, e.errno), flush=True)
    sys.exit(1)
print("ok", flush=True)
while True:
    s.accept()[0].close()
"""

_LISTEN = f"""listen() {{
  if ! command -v python3 >/dev/null 2>&1; then echo "listen $2 none no python3"; return; fi
  local f i got
  f=$(mktemp) || {{ echo "listen $2 none no temporary file"; return; }}
  nohup timeout {LISTENER_S} python3 -c "$prog" "$1" "$2" >"$f" 2>&1 </dev/null &
  for i in $(seq 30); do [ -s "$f" ] && break; sleep 0.1; done
  got=$(head -n 1 "$f"); rm -f "$f"
  echo "listen $2 ${{got:-none python3 gave no answer}}"
}}
"""


def listener_script(address: str, ports: Iterable[int]) -> str:
    """Listeners on ``address`` (this host's), one per port, each for LISTENER_S seconds;
    prints ``listen PORT ok``, ``listen PORT error ERRNO`` or ``listen PORT none WHY``."""
    lines = ["set +e", f"prog={shlex.quote(_LISTENER_PY)}", _LISTEN]
    lines += [f"listen {shlex.quote(address)} {int(port)} &" for port in sorted(set(ports))]
    lines.append("wait")
    return "\n".join(lines) + "\n"


def reprobe_script(probes: Iterable[Probe]) -> str:
    """The second connects of refused paths, in parallel."""
    lines = ["set +e", _PROBE]
    lines += [f"probe {shlex.quote(p.dst)} {int(p.port)} &" for p in probes]
    lines.append("wait")
    return "\n".join(lines) + "\n"


def parse_listeners(out: str) -> dict[int, tuple[str, str]]:
    """port → (ok | error | none, what) from listener_script's output."""
    found: dict[int, tuple[str, str]] = {}
    for line in out.splitlines():
        parts = line.split(" ", 3)
        if len(parts) >= 3 and parts[0] == "listen" and parts[1].isdigit():
            found[int(parts[1])] = (parts[2], parts[3] if len(parts) > 3 else "")
    return found


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


def judge_paths(
    target: HostCheck, outcomes: dict[tuple[str, int], str]
) -> tuple[list[FailedCheck], list[Probe]]:
    """The first connects: failures (timeout, no route, …) and the refused paths, which a
    listener at their destination must prove (see run_all); an open one passes."""
    out, refused = [], []
    for p in target.probes:
        outcome = outcomes.get((p.dst, p.port), "not tried")
        if outcome == "open":
            continue
        if outcome == "refused":
            refused.append(p)
            continue
        what = "timed out (filtered)" if outcome == "timeout" else outcome
        out.append(_path_failure(target, p, what))
    return out, refused


def _path_failure(target: HostCheck, p: Probe, what: str) -> FailedCheck:
    return FailedCheck(
        f"{target.address} ({target.role})",
        "port",
        f"TCP {p.dst}:{p.port} ({p.why}) {what}",
        f"open TCP {p.port} from {p.src} to {p.dst} in every firewall between them",
    )


def _unverified(p: Probe, why: str) -> str:
    return (
        f"unverified: TCP {p.dst}:{p.port} from {p.src} ({p.why}): refused, and {why}; it is"
        " open unless a firewall rejects it (check once the deploy has started its service)"
    )


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


@dataclass
class _FirstPass:
    """One host's script: its findings, and the refused paths still to prove (None: SSH
    failed, nothing else known)."""

    target: HostCheck
    findings: list[FailedCheck]
    refused: list[Probe] | None


def _first_pass(target: HostCheck, timeout: float = 60) -> _FirstPass:
    sent_at = time.time()
    ran = target.runner.run(script(target), timeout)
    answered_at = time.time()
    if ran.rc == SSH_FAILED or (ran.rc != 0 and "os=" not in ran.out):
        detail = (ran.err.strip().splitlines() or ["no answer"])[-1]
        failed = FailedCheck(
            f"{target.address} ({target.role})",
            "ssh",
            f"cannot log in as the deploy does: {detail} (its other checks not run)",
            "check the inventory's host name (or its ssh_hostname, ssh_port), that sshd"
            " runs, and the key: the inventory's ssh_key or one in the SSH agent (ssh-add),"
            " authorised for the inventory's ssh_user",
        )
        return _FirstPass(target, [failed], None)
    facts, outcomes, resolved = parse(ran.out)
    paths, refused = judge_paths(target, outcomes)
    findings = [
        *judge(target, facts, sent_at, answered_at),
        *paths,
        *judge_names(target, resolved),
        *judge_way_out(target, outcomes, resolved),
    ]
    return _FirstPass(target, findings, refused)


def check_host(target: HostCheck) -> list[FailedCheck]:
    """Every check of one host alone (a refused path to a host not checked with it is a
    note, not a failure: see run_all)."""
    return run_all([target]).findings


def _prove_refused(
    passes: list[_FirstPass], pool: ThreadPoolExecutor
) -> tuple[list[FailedCheck], list[str]]:
    """Each refused path: a listener at its destination (one SSH session per destination, all
    at once), then the source connects again (one per source, all at once), within
    LISTENER_S of the listeners' start."""
    findings: list[FailedCheck] = []
    notes: list[str] = []
    reachable = {p.target.address: p.target for p in passes if p.refused is not None}
    checked = {p.target.address for p in passes}
    wanted: dict[str, list[tuple[HostCheck, Probe]]] = {}
    for fp in passes:
        for probe in fp.refused or []:
            if probe.dst in checked and probe.dst not in reachable:
                why = f"no listener could be started on {probe.dst}: its SSH failed"
                notes.append(_unverified(probe, why))
            elif probe.dst not in reachable:
                notes.append(_unverified(probe, f"{probe.dst} is not among the hosts checked"))
            else:
                wanted.setdefault(probe.dst, []).append((fp.target, probe))
    if not wanted:
        return findings, notes

    def listen(dst: str) -> dict[int, tuple[str, str]]:
        ran = reachable[dst].runner.run(
            listener_script(dst, [p.port for _, p in wanted[dst]]), LISTEN_PHASE_S
        )
        return parse_listeners(ran.out)

    started = time.monotonic()
    listening = dict(zip(wanted, pool.map(listen, wanted), strict=True))
    again: dict[int, tuple[HostCheck, list[Probe]]] = {}
    for dst, pairs in wanted.items():
        for src, probe in pairs:
            state, what = listening[dst].get(probe.port, ("none", "no answer over SSH"))
            if state == "ok":
                again.setdefault(id(src), (src, []))[1].append(probe)
            elif state == "error" and what == "EADDRINUSE":
                findings.append(
                    _path_failure(
                        src,
                        probe,
                        f"refused, while a program listens on {dst}:{probe.port}: a firewall"
                        " rejects it",
                    )
                )
            else:
                why = what if state == "none" else f"cannot bind {dst}:{probe.port} ({what})"
                notes.append(_unverified(probe, f"no listener could be started on {dst}: {why}"))

    def reprobe(item: tuple[HostCheck, list[Probe]]) -> tuple[Ran, float]:
        src, probes = item
        return src.runner.run(reprobe_script(probes), REPROBE_PHASE_S), time.monotonic()

    for (src, probes), (ran, answered) in zip(
        again.values(), pool.map(reprobe, again.values()), strict=True
    ):
        _, outcomes, _ = parse(ran.out)
        in_time = answered - started < LISTENER_S
        for probe in probes:
            outcome = outcomes.get((probe.dst, probe.port), "not tried")
            if outcome == "open":
                continue
            if outcome == "not tried" or not in_time:
                why = "the second connect did not run" if in_time else "the listener ended"
                notes.append(_unverified(probe, f"{why} ({src.address})"))
            elif outcome == "refused":
                findings.append(
                    _path_failure(
                        src,
                        probe,
                        f"refused even with a listener on {probe.dst}:{probe.port}: a firewall"
                        " rejects it",
                    )
                )
            else:
                what = "timed out (filtered)" if outcome == "timeout" else outcome
                findings.append(_path_failure(src, probe, what))
    return findings, notes


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
        passes = list(pool.map(_first_pass, targets))
        for fp in passes:
            findings += fp.findings
        more, notes = _prove_refused(passes, pool)
        findings += more
        if mx is not None:
            more, mx_notes = mx.result()
            findings += more
            notes += mx_notes
    checks = sum(6 + len(t.probes) + len(t.resolve) + (1 if t.way_out else 0) for t in targets)
    checks += len(mx_names or {})
    if progress:
        progress(f"preflight: {len(targets)} hosts, {checks} checks")
    return PreflightReport(findings, len(targets), checks, time.monotonic() - started, notes)
