"""Throwaway lab hosts as LXC system containers (see docs/lab.md for what was measured).

Every host is an overlay snapshot clone of one cached base container, with a static address
on the isolated bridge, its own SSH host key and the lab's SSH key for root. Every step is
idempotent and copes with stale or half-built state: a container whose marker does not match
what this lab expects is destroyed and cloned again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from mailtower.controller.errors import LabError
from mailtower.controller.lab import plan, prereqs
from mailtower.controller.lab.plan import LabHost
from mailtower.settings import GOC_SECRET_NAMES as GOC_SECRETS
from mailtower.settings import SECRET_NAMES as TOWER_SECRETS

LXC_DIR = Path("/var/lib/lxc")
MARKER = "mailtower.id"
# Bump when the preparation of the base changes: every clone is then rebuilt.
BASE_PREP_VERSION = "5"
BASE_PACKAGES = "openssh-server,python3,ca-certificates"
# What the base must hold once built, and the package each comes from: the Debian template
# installs BASE_PACKAGES with apt in a chroot and carries on silently when that fails.
BASE_FILES = (
    ("usr/bin/python3", "python3"),
    ("usr/sbin/sshd", "openssh-server"),
    ("etc/ssl/certs/ca-certificates.crt", "ca-certificates"),
)
# The Debian template's debootstrap cache: reused by every later lxc-create, so a bad one
# poisons every base built after it.
TEMPLATE_CACHE = Path("/var/cache/lxc/debian")

Progress = Callable[[str], None]


def _run(args: list[str], host: str, step: str, fix: str, **kwargs) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)
    except FileNotFoundError as exc:
        raise LabError(host, step, "install the lab tools: make bootstrap", str(exc)) from exc
    if done.returncode != 0:
        raise LabError(
            host,
            step,
            fix,
            f"`{' '.join(args)}` exited {done.returncode}: {done.stderr or done.stdout}",
        )
    return done.stdout


# --- state on the controller -------------------------------------------------------------


def state_dir() -> Path:
    plan.STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    return plan.STATE_DIR


def ssh_key() -> Path:
    """The lab's private SSH key, created on first use."""
    key = state_dir() / "ssh" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(mode=0o700, exist_ok=True)
        _run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mailtower-lab", "-f", str(key)],
            "controller",
            "create the lab SSH key",
            f"remove {key.parent} and retry",
        )
    return key


def known_hosts() -> Path:
    return state_dir() / "ssh" / "known_hosts"


def secrets_file() -> Path:
    """Passwords of the lab's SQL roles and VirusEye operator, generated once per lab: each tower
    its own set (``towers.<name>``), the GOC's beside them. A password missing from an older
    lab's file is added and existing ones are kept (an older file's one shared tower set
    becomes the first tower's)."""
    path = state_dir() / "secrets.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    known_towers = known.get("towers") or {}
    shared = {n: known[n] for n in TOWER_SECRETS if isinstance(known.get(n), str)}
    towers = {}
    for i, tower in enumerate(plan.TOWER_NETS):
        name = f"lab-{tower}"
        had = known_towers.get(name) or (shared if i == 0 else {})
        towers[name] = {n: had.get(n) or secrets.token_urlsafe(24) for n in TOWER_SECRETS}
    wanted: dict[str, object] = {n: known.get(n) or secrets.token_urlsafe(24) for n in GOC_SECRETS}
    wanted["towers"] = towers
    if wanted != known:
        path.write_text(json.dumps(wanted, indent=2))
        path.chmod(0o600)
    return path


def tower_secrets(tower: str) -> dict[str, str]:
    """The secrets of lab tower ``tower`` (``lab-a``) its settings take (TowerSettings.secrets);
    no other tower has the same."""
    every = json.loads(secrets_file().read_text())
    return dict(every["towers"][tower])


def goc_secrets() -> dict[str, str]:
    """VirusEye's (its database role's and the lab operator's password) and the quarantine
    portal's (its database role's password and its form-signing key)."""
    every = json.loads(secrets_file().read_text())
    return {n: every[n] for n in GOC_SECRETS}


def bundle_keys() -> tuple[Path, Path]:
    """The lab GOC's rule-bundle key pair (signing.key, signing.pub), made once per lab: the
    GOC gets the signing key, the towers the public one."""
    from mailtower import bundles

    out = state_dir() / "bundle-keys"
    key, pub = out / "signing.key", out / "signing.pub"
    if not (key.exists() and pub.exists()):
        shutil.rmtree(out, ignore_errors=True)
        bundles.keygen(out)
    return key, pub


def tsig_key_file() -> Path:
    """The lab's TSIG key for DNS updates (name, algorithm, base64 secret), made once per lab."""
    path = state_dir() / "dns-update-key.json"
    if not path.exists():
        key = {
            "name": "mailtower-update",
            "algorithm": "hmac-sha256",
            "secret": base64.b64encode(secrets.token_bytes(32)).decode(),
        }
        path.write_text(json.dumps(key, indent=2))
        path.chmod(0o600)
    return path


def _base_id() -> str:
    pub = ssh_key().with_suffix(".pub").read_text()
    return hashlib.sha256(f"{BASE_PREP_VERSION}\n{pub}".encode()).hexdigest()[:16]


# --- the controller side: bridge, limits, apt proxy ---------------------------------------


def ensure_controller(progress: Progress) -> None:
    """Prerequisites, bridge with the host's lab address, inotify limits, apt proxy; no
    forwarding."""
    absent = prereqs.missing("lab")
    if absent:
        text = prereqs.explain(absent)
        fix = text.splitlines()[-1].strip().removeprefix("fix: ")
        raise LabError("controller", "check the lab's prerequisites", fix, text)
    # Beyond ~23 containers new ones die at once without more inotify instances (docs/lab.md).
    _run(
        [
            "sysctl",
            "-qw",
            "fs.inotify.max_user_instances=8192",
            "fs.inotify.max_user_watches=1048576",
        ],
        "controller",
        "raise inotify limits",
        "run the lab as root",
    )
    if subprocess.run(["ip", "link", "show", plan.BRIDGE], capture_output=True).returncode != 0:
        _run(
            ["ip", "link", "add", plan.BRIDGE, "type", "bridge"],
            "controller",
            f"create bridge {plan.BRIDGE}",
            "run the lab as root",
        )
    _run(
        ["ip", "addr", "replace", f"{plan.HOST_ADDRESS}/{plan.PREFIX}", "dev", plan.BRIDGE],
        "controller",
        f"address bridge {plan.BRIDGE}",
        "check `ip addr show mtlab0`",
    )
    _run(
        ["ip", "link", "set", plan.BRIDGE, "up"],
        "controller",
        f"bring up {plan.BRIDGE}",
        "check `ip link show mtlab0`",
    )
    progress(f"bridge {plan.BRIDGE} up at {plan.HOST_ADDRESS}/{plan.PREFIX} (no gateway: lab-only)")
    _ensure_apt_proxy(progress)


def _listening(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def _ensure_apt_proxy(progress: Progress) -> None:
    addr = str(plan.HOST_ADDRESS)
    if _listening(addr, plan.APT_PROXY_PORT):
        progress(f"apt proxy already listening on {addr}:{plan.APT_PROXY_PORT}")
        return
    # Its default Debian backend does not resolve here (docs/lab.md).
    Path("/etc/apt-cacher-ng/backends_debian").write_text("http://deb.debian.org/debian/\n")
    _run(
        [
            "apt-cacher-ng",
            "-c",
            "/etc/apt-cacher-ng",
            "ForeGround=0",
            f"BindAddress={addr}",
            f"Port={plan.APT_PROXY_PORT}",
        ],
        "controller",
        "start apt-cacher-ng",
        "see /var/log/apt-cacher-ng/apt-cacher.err",
    )
    deadline = time.monotonic() + 15
    while not _listening(addr, plan.APT_PROXY_PORT):
        if time.monotonic() > deadline:
            raise LabError("controller", "wait for apt-cacher-ng", "see /var/log/apt-cacher-ng/")
        time.sleep(0.2)
    progress(f"apt proxy started on {addr}:{plan.APT_PROXY_PORT}")


# --- containers ----------------------------------------------------------------------------


def _state(name: str) -> str:
    out = subprocess.run(["lxc-info", "-s", "-H", "-n", name], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "ABSENT"


def _exists(name: str) -> bool:
    return (LXC_DIR / name / "config").exists()


def _marker(name: str) -> str:
    path = LXC_DIR / name / MARKER
    return path.read_text().strip() if path.exists() else ""


def _destroy(name: str) -> None:
    if _state(name) == "RUNNING":
        subprocess.run(["lxc-stop", "-k", "-n", name], capture_output=True)
    if _exists(name) or (LXC_DIR / name).exists():
        done = subprocess.run(["lxc-destroy", "-n", name], capture_output=True, text=True)
        if done.returncode != 0:  # half-built: no usable config, remove what is left
            shutil.rmtree(LXC_DIR / name, ignore_errors=True)


def base_problems(rootfs: Path) -> list[str]:
    """What a built base lacks (empty: it holds python3, sshd and the CA certificates)."""
    return [
        f"{rel} missing (package {package})"
        for rel, package in BASE_FILES
        if not (rootfs / rel).exists()
    ]


def flush_template_cache(progress: Progress, cache: Path = TEMPLATE_CACHE) -> None:
    """Remove the Debian template's debootstrap cache (the next build starts afresh)."""
    if cache.exists():
        shutil.rmtree(cache, ignore_errors=True)
        progress(f"removed the Debian template's cache {cache} (the next build starts afresh)")


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def ensure_base(progress: Progress) -> None:
    """Build (once, ~80 s) and prepare the cached base container."""
    name = plan.BASE
    rootfs = LXC_DIR / name / "rootfs"
    if _exists(name) and base_problems(rootfs):
        progress(f"base {name} is half-built ({'; '.join(base_problems(rootfs))}): destroying it")
        # Its clones first: the base's root is the lower layer of every clone's overlay.
        destroy(lab_containers(), progress)
        _destroy(name)
    if not _exists(name):
        progress(f"building base {name} with debootstrap (about 80 s, once)")
        started = time.monotonic()
        try:
            _run(
                [
                    "lxc-create",
                    "-t",
                    "debian",
                    "-n",
                    name,
                    "--",
                    "-r",
                    "bookworm",
                    f"--packages={BASE_PACKAGES}",
                ],
                name,
                "lxc-create (debootstrap)",
                "check that this machine reaches Debian's mirror (`apt-get update`), "
                "then `invoke lab.up` again",
            )
            problems = base_problems(rootfs)
            if problems:
                raise LabError(
                    name,
                    "check the new base image",
                    "the Debian template's package step failed without saying so (apt in "
                    "its chroot); check that this machine reaches Debian's mirror "
                    "(`apt-get update`), then `invoke lab.up` again",
                    "; ".join(problems),
                )
        except LabError:
            # Neither a half-built base nor the template's cache may poison the next build.
            _destroy(name)
            flush_template_cache(progress)
            raise
        progress(f"base built in {time.monotonic() - started:.0f} s")
    if _marker(name) == _base_id():
        return
    # Clones of the old base are stale: remove them before their lower layer changes.
    stale = [c for c in lab_containers() if not _marker(c).startswith(_base_id())]
    if stale:
        progress(f"base changes: destroying {len(stale)} hosts cloned from the old one")
        destroy(stale, progress)
    if _state(name) == "RUNNING":
        subprocess.run(["lxc-stop", "-k", "-n", name], capture_output=True)
    progress(f"preparing base {name}")
    pub = ssh_key().with_suffix(".pub").read_text()
    _write(rootfs, "/root/.ssh/authorized_keys", pub, 0o600)
    (rootfs / "root/.ssh").chmod(0o700)
    # With the default `dhcp` networking.service waits forever and sshd never starts (docs/lab.md).
    _write(
        rootfs,
        "/etc/network/interfaces",
        "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet manual\n",
    )
    # apt-cacher-ng can drop a request when many hosts refresh the same index at once; apt
    # then waits on a closed connection. A timeout and retries turn that into a short delay.
    _write(
        rootfs,
        "/etc/apt/apt.conf.d/01mailtower-proxy",
        f'Acquire::http::Proxy "http://{plan.HOST_ADDRESS}:{plan.APT_PROXY_PORT}";\n'
        'Acquire::http::Timeout "20";\nAcquire::Retries "5";\n'
        # apt-cacher-ng and pipelined requests stall together; one request at a time.
        'Acquire::http::Pipeline-Depth "0";\n',
    )
    _write(
        rootfs,
        "/etc/apt/sources.list",
        "deb http://deb.debian.org/debian bookworm main\n"
        "deb http://deb.debian.org/debian bookworm-updates main\n"
        "deb http://deb.debian.org/debian-security bookworm-security main\n",
    )
    # No resolver in the lab yet: fail fast instead of waiting on the host's resolver.
    resolv = rootfs / "etc/resolv.conf"
    if resolv.is_symlink():
        resolv.unlink()
    _write(
        rootfs,
        "/etc/resolv.conf",
        f"nameserver {plan.HOST_ADDRESS}\noptions timeout:1 attempts:1\n",
    )
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # every clone gets its own host key
    _set_config(
        name,
        [
            # the generated profile is not available (docs/lab.md)
            "lxc.apparmor.profile = unconfined",
            "lxc.net.0.type = empty",
        ],
    )
    (LXC_DIR / name / MARKER).write_text(_base_id() + "\n")


def _set_config(name: str, lines: Iterable[str]) -> None:
    """Replace the network, name and AppArmor lines of a container's config."""
    path = LXC_DIR / name / "config"
    owned = ("lxc.net.", "lxc.uts.name", "lxc.apparmor.profile")
    kept = [ln for ln in path.read_text().splitlines() if not ln.strip().startswith(owned)]
    path.write_text("\n".join([*kept, "# mailtower lab", *lines]) + "\n")


def _upper(name: str) -> Path:
    """The writable upper directory of an overlay snapshot clone."""
    for line in (LXC_DIR / name / "config").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "lxc.rootfs.path" and value.strip().startswith("overlay:"):
            return Path(value.strip().split(":")[-1])
    raise LabError(name, "find the overlay upper directory", f"`lxc-destroy -n {name}` and retry")


def _host_id(host: LabHost) -> str:
    return f"{_base_id()} {host.address}"


def _clone(host: LabHost) -> None:
    name = host.name
    _run(
        ["lxc-copy", "-n", plan.BASE, "-N", name, "-s", "-B", "overlayfs"],
        name,
        "snapshot clone of the base",
        f"`lxc-destroy -n {name}` and retry",
    )
    octets = host.address.packed
    _set_config(
        name,
        [
            f"lxc.uts.name = {name}",
            "lxc.apparmor.profile = unconfined",
            "lxc.net.0.type = veth",
            f"lxc.net.0.link = {plan.BRIDGE}",
            "lxc.net.0.flags = up",
            "lxc.net.0.name = eth0",
            "lxc.net.0.hwaddr = 02:00:" + ":".join(f"{b:02x}" for b in octets),
            f"lxc.net.0.ipv4.address = {host.address}/{plan.PREFIX}",
        ],
    )
    upper = _upper(name)
    _write(upper, "/etc/hostname", f"{name}\n")
    _write(upper, "/etc/hosts", f"127.0.0.1 localhost\n{host.address} {name}\n")
    keyfile = upper / "etc/ssh/ssh_host_ed25519_key"
    keyfile.parent.mkdir(parents=True, exist_ok=True)
    _run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", str(keyfile)],
        name,
        "create the SSH host key",
        f"`lxc-destroy -n {name}` and retry",
    )
    (LXC_DIR / name / MARKER).write_text(_host_id(host) + "\n")


def ensure_hosts(hosts: list[LabHost], progress: Progress) -> None:
    """Clone, configure and start every host; reuse what already matches."""
    for host in hosts:
        if _exists(host.name) and _marker(host.name) != _host_id(host):
            progress(f"{host.name}: stale (built for another base or address): rebuilding")
            _destroy(host.name)
    # The base must be stopped while clones are made from it.
    if _state(plan.BASE) == "RUNNING":
        subprocess.run(["lxc-stop", "-k", "-n", plan.BASE], capture_output=True)
    made = 0
    for host in hosts:
        if not _exists(host.name):
            _clone(host)
            made += 1
    progress(f"{made} hosts cloned, {len(hosts) - made} reused")
    started = 0
    for host in hosts:
        if _state(host.name) != "RUNNING":
            log = state_dir() / "logs" / f"{host.name}.log"
            log.parent.mkdir(exist_ok=True)
            _run(
                ["lxc-start", "-n", host.name, "-d", "-o", str(log), "-l", "WARN"],
                host.name,
                "lxc-start",
                f"see {log}; try `lxc-start -n {host.name} -F` to watch it boot",
            )
            started += 1
    progress(f"{started} hosts started")
    _write_known_hosts(hosts)
    _wait_ssh(hosts, progress)
    if hosts:
        _check_apt_proxy(hosts[0], progress)


def _check_apt_proxy(host: LabHost, progress: Progress) -> None:
    """A lab host reaches the apt proxy (every deploy installs its packages through it)."""
    target = f"{plan.HOST_ADDRESS}:{plan.APT_PROXY_PORT}"
    probe = f"timeout 5 bash -c 'exec 3<>/dev/tcp/{plan.HOST_ADDRESS}/{plan.APT_PROXY_PORT}'"
    _run(
        [
            "ssh",
            "-i",
            str(ssh_key()),
            "-o",
            f"UserKnownHostsFile={known_hosts()}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            f"root@{host.address}",
            probe,
        ],
        host.name,
        f"reach the apt proxy {target}",
        "check that apt-cacher-ng listens on the bridge address "
        f"(`ss -ltn | grep {plan.APT_PROXY_PORT}`, /var/log/apt-cacher-ng/) and that no "
        "firewall on this machine drops the lab bridge's traffic",
    )
    progress(f"{host.name} reaches the apt proxy at {target}")


def _write_known_hosts(hosts: list[LabHost]) -> None:
    lines = []
    for host in hosts:
        pub = _upper(host.name) / "etc/ssh/ssh_host_ed25519_key.pub"
        keytype, key = pub.read_text().split()[:2]
        lines.append(f"{host.address} {keytype} {key}")
    path = known_hosts()
    existing = path.read_text().splitlines() if path.exists() else []
    addresses = {str(h.address) for h in hosts}
    kept = [ln for ln in existing if ln.split(" ", 1)[0] not in addresses]
    path.write_text("\n".join(kept + lines) + "\n")


def _wait_ssh(hosts: list[LabHost], progress: Progress, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(hosts)
    while waiting:
        waiting = [h for h in waiting if not _listening(str(h.address), 22, 0.3)]
        if not waiting:
            break
        if time.monotonic() > deadline:
            host = waiting[0]
            raise LabError(
                host.name,
                f"wait for sshd on {host.address}:22",
                f"`lxc-attach -n {host.name} -- systemctl status ssh` and "
                f"see {state_dir() / 'logs' / (host.name + '.log')}",
                f"{len(waiting)} hosts not reachable after {timeout:.0f} s: "
                + ", ".join(h.name for h in waiting[:8]),
            )
        time.sleep(0.3)
    progress(f"sshd answers on all {len(hosts)} hosts")


def stop_host(name: str) -> None:
    _run(["lxc-stop", "-k", "-n", name], name, "lxc-stop", f"`lxc-info -n {name}`")


def start_host(name: str) -> None:
    _run(["lxc-start", "-n", name, "-d"], name, "lxc-start", f"`lxc-start -n {name} -F`")


def lab_containers() -> list[str]:
    """Names of every lab container on this machine except the base."""
    if not LXC_DIR.exists():
        return []
    return sorted(
        p.name
        for p in LXC_DIR.iterdir()
        if p.name.startswith("mt-") and p.name != plan.BASE and p.is_dir()
    )


def destroy(names: Iterable[str], progress: Progress) -> None:
    count = 0
    for name in names:
        _destroy(name)
        count += 1
    progress(f"{count} lab hosts destroyed")


def purge(progress: Progress) -> None:
    """Remove the base and the bridge too (the next lab.up rebuilds the base)."""
    _destroy(plan.BASE)
    flush_template_cache(progress)
    subprocess.run(["ip", "link", "del", plan.BRIDGE], capture_output=True)
    progress(f"base {plan.BASE} and bridge {plan.BRIDGE} removed")


def memory_bytes(name: str) -> int | None:
    """Anonymous (process) memory of a running container, without the page cache; or None.

    The cgroup's usage figure counts cached files too (packages just installed, logs), which
    the kernel drops under pressure: it would overstate what the lab needs several times.
    """
    for path, key in (
        (f"/sys/fs/cgroup/memory/lxc.payload.{name}/memory.stat", "total_rss"),
        (f"/sys/fs/cgroup/lxc.payload.{name}/memory.stat", "anon"),
    ):
        if os.path.exists(path):
            for line in Path(path).read_text().splitlines():
                field, _, value = line.partition(" ")
                if field == key:
                    return int(value)
    return None


def status(hosts: list[LabHost]) -> list[dict]:
    rows = []
    for host in hosts:
        state = _state(host.name)
        rows.append(
            {
                "name": host.name,
                "group": host.group,
                "address": str(host.address),
                "state": state,
                "ssh": state == "RUNNING" and _listening(str(host.address), 22, 0.3),
                "memory_mib": round((memory_bytes(host.name) or 0) / 2**20, 1),
            }
        )
    return rows
