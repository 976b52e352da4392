"""clamd on an official-size database: memory, load and reload times, CPU per message (issue 16).

Starts a private clamd (Debian's, the real program; its own socket, config and work directory
under /var/tmp, as the unit tests' ``RealClamd``) on the database ``clamav_db_gen.py`` generates
(plus the project's test signatures), once with ``ConcurrentDatabaseReload yes`` and once with
``no``, one after the other, and measures in each:

- load: from exec to the first PONG, with the peak RSS while loading;
- steady RSS: VmRSS from /proc/<pid>/status 5 s after the load, then again after the corpus;
- CPU per message: clamd's utime + stime (/proc/<pid>/stat) over the scanner bench's corpus
  (``scanner_vs_amavis.build_corpus``: the same messages, seed and mix), each raw message handed
  to clamd by INSTREAM as scand does, from ``--threads`` connections at once;
- reload: a probe signature (the MD5 of a fresh random payload) is written into the database
  directory, ``RELOAD`` sent, and the payload scanned every 50 ms from a thread of its own until
  clamd names the probe: that is the reload time (RELOAD → the new engine answers). Meanwhile
  VmRSS is sampled every 50 ms (peak and the samples), VmHWM read after (reset to the current
  RSS before RELOAD through /proc/<pid>/clear_refs), and the longest a probe scan waited for its
  answer is kept (with ``no``, scans wait for the whole reload);
- the RSS 5 s after the reload (the old engine freed or not).

    python tests/bench/clamd_reload.py [--signatures 8000000] [--db DIR] [--messages 2000]
        [--modes yes,no] [--json PATH]

Prints a table and the JSON. Needs root (clear_refs, clamd's User root as in the tests) and
/usr/sbin/clamd (requirements-apt.txt: clamav-daemon).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "unit"))
sys.path.insert(0, str(HERE))

from clamav_db_gen import DEFAULT_SEED, DEFAULT_SIGNATURES, default_dir, generate  # noqa: E402
from scand_fakes import RealClamd  # noqa: E402
from scanner_vs_amavis import build_corpus  # noqa: E402

SAMPLE_S = 0.05
CLAMD_THREADS = 4  # the scanner bench's clamd
MIB = 1024 * 1024


def say(text: str) -> None:
    print(f"[bench.clamd {time.strftime('%H:%M:%S')}] {text}", flush=True)


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mib(kib: float) -> float:
    return round(kib / 1024, 1)


def instream(path: Path, data: bytes, timeout_s: float = 600.0) -> str:
    """One INSTREAM on a fresh connection: clamd's answer without the ``stream: `` prefix."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall(b"zINSTREAM\0")
        view = memoryview(data)
        for at in range(0, len(data), 1 << 20):
            chunk = view[at : at + (1 << 20)]
            sock.sendall(struct.pack("!L", len(chunk)) + chunk)
        sock.sendall(struct.pack("!L", 0))
        answer = b""
        while not answer.endswith(b"\0"):
            got = sock.recv(4096)
            if not got:
                break
            answer += got
    return answer.rstrip(b"\0").decode().removeprefix("stream: ")


def command(path: Path, verb: bytes, timeout_s: float = 10.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall(b"z" + verb + b"\0")
        return sock.recv(256).rstrip(b"\0").decode()


class Sampler:
    """VmRSS of one process every SAMPLE_S seconds, in a thread."""

    def __init__(self, pid: int):
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.samples.append((time.monotonic() - start, status_kib(self.pid, "VmRSS")))
            self._stop.wait(SAMPLE_S)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max((kib for _, kib in self.samples), default=0)


def measure(
    mode: str, db: Path | None, corpus: list[bytes], threads: int, work: Path
) -> dict[str, Any]:
    clamd = RealClamd(
        work / f"clamd-{mode}",
        max_threads=CLAMD_THREADS,
        databases=db,
        extra_config=[f"ConcurrentDatabaseReload {mode}", "SelfCheck 0"],
    )
    row: dict[str, Any] = {"concurrent_reload": mode}
    started = time.monotonic()
    clamd.start(timeout_s=1800)  # the RSS during the load is read from VmHWM below
    row["load_s"] = round(time.monotonic() - started, 1)
    assert clamd.proc is not None
    pid = clamd.proc.pid
    try:
        row["load_peak_rss_mib"] = mib(status_kib(pid, "VmHWM"))
        loaded = [ln for ln in clamd.log.read_text().splitlines() if "signatures" in ln.lower()]
        row["clamd_log"] = loaded[-1:] if loaded else []
        time.sleep(5)
        row["steady_rss_mib"] = mib(status_kib(pid, "VmRSS"))
        say(f"{mode}: loaded in {row['load_s']} s, RSS {row['steady_rss_mib']} MiB")

        # CPU per message on the scanner bench's corpus (a warm-up of 48 first)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda raw: instream(clamd.socket, raw), corpus[:48]))
            before, wall = cpu_s(pid), time.monotonic()
            answers = list(pool.map(lambda raw: instream(clamd.socket, raw), corpus))
            wall = time.monotonic() - wall
            cpu = cpu_s(pid) - before
        found = sum(1 for a in answers if a.endswith("FOUND"))
        errors = sum(1 for a in answers if not (a == "OK" or a.endswith("FOUND")))
        row["cpu_ms_per_message"] = round(cpu / len(corpus) * 1000, 2)
        row["messages_per_s_clamd_alone"] = round(len(corpus) / wall, 1)
        row["found"] = found
        row["errors"] = errors
        row["rss_after_corpus_mib"] = mib(status_kib(pid, "VmRSS"))
        say(
            f"{mode}: corpus: {row['cpu_ms_per_message']} ms CPU/message, {found} found, "
            f"{errors} errors, RSS {row['rss_after_corpus_mib']} MiB"
        )

        # reload: a probe signature only the new engine knows
        payload = random.Random(f"probe-{mode}-{time.time()}").randbytes(4096)
        assert instream(clamd.socket, payload) == "OK", "the probe payload is found before RELOAD"
        (clamd.db / "zz-bench-probe.hdb").write_text(
            f"{hashlib.md5(payload).hexdigest()}:{len(payload)}:Mailtower.Bench.Probe\n"
        )
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        rss_before = status_kib(pid, "VmRSS")
        sampler = Sampler(pid).start()
        waits: list[float] = []
        t0 = time.monotonic()
        reply = command(clamd.socket, b"RELOAD")
        took: float | None = None
        while time.monotonic() - t0 < 1800:
            asked = time.monotonic()
            answer = instream(clamd.socket, payload)
            waits.append(time.monotonic() - asked)
            if "Mailtower.Bench.Probe" in answer:
                took = time.monotonic() - t0
                break
            time.sleep(SAMPLE_S)
        time.sleep(5)
        peak = sampler.stop()
        row["reload_reply"] = reply
        row["reload_s"] = round(took, 2) if took is not None else None
        row["rss_before_reload_mib"] = mib(rss_before)
        row["reload_peak_rss_mib"] = mib(peak)
        row["reload_vmhwm_mib"] = mib(status_kib(pid, "VmHWM"))
        row["rss_after_reload_mib"] = mib(status_kib(pid, "VmRSS"))
        row["probe_scans_during_reload"] = len(waits)
        row["longest_scan_wait_during_reload_s"] = round(max(waits), 2) if waits else None
        row["rss_samples_mib"] = [
            [round(t, 2), mib(kib)]
            for t, kib in sampler.samples[:: max(1, len(sampler.samples) // 60)]
        ]
        say(
            f"{mode}: reload {row['reload_s']} s, peak RSS {row['reload_peak_rss_mib']} MiB "
            f"(VmHWM {row['reload_vmhwm_mib']}), longest scan wait "
            f"{row['longest_scan_wait_during_reload_s']} s, after {row['rss_after_reload_mib']} MiB"
        )
    finally:
        clamd.stop()
    return row


def table(report: dict[str, Any]) -> str:
    rows = report["runs"]
    spec = [
        ("load s", "load_s"),
        ("load: peak RSS MiB (VmHWM)", "load_peak_rss_mib"),
        ("steady RSS MiB", "steady_rss_mib"),
        ("RSS after the corpus MiB", "rss_after_corpus_mib"),
        ("clamd CPU ms/message", "cpu_ms_per_message"),
        ("messages/s, clamd alone", "messages_per_s_clamd_alone"),
        ("found / errors", None),
        ("reload s (RELOAD→probe found)", "reload_s"),
        ("reload: peak RSS MiB (50 ms)", "reload_peak_rss_mib"),
        ("reload: VmHWM MiB", "reload_vmhwm_mib"),
        ("longest scan wait in reload s", "longest_scan_wait_during_reload_s"),
        ("RSS 5 s after reload MiB", "rss_after_reload_mib"),
    ]
    head = f"{'ConcurrentDatabaseReload':34}" + "".join(
        f"{r['concurrent_reload']:>12}" for r in rows
    )
    lines = [head]
    for label, key in spec:
        if key is None:
            values = [f"{r['found']} / {r['errors']}" for r in rows]
        else:
            values = [str(r.get(key)) for r in rows]
        lines.append(f"{label:34}" + "".join(f"{v:>12}" for v in values))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--signatures", type=int, default=DEFAULT_SIGNATURES)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="the database's seed")
    parser.add_argument("--db", type=Path, help="a generated database (default: generate it)")
    parser.add_argument(
        "--test-signatures-only", action="store_true", help="no generated database (baseline)"
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--corpus-seed", type=int, default=3, help="the scanner bench's seed")
    parser.add_argument("--threads", type=int, default=4, help="INSTREAM connections at once")
    parser.add_argument("--modes", default="yes,no", help="ConcurrentDatabaseReload values")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        say("needs root (clamd's User root, /proc/<pid>/clear_refs)")
        return 2
    if not Path("/usr/sbin/clamd").exists():
        say("/usr/sbin/clamd is missing: run scripts/bootstrap (installs clamav-daemon)")
        return 2

    db: Path | None = None
    manifest: dict[str, Any] = {"signatures": 0}
    if not args.test_signatures_only:
        db = args.db or default_dir(args.signatures, args.seed)
        say(f"database: {db}")
        manifest = (
            generate(args.signatures, args.seed, db)
            if args.db is None
            else (json.loads((db / "manifest.json").read_text()))
        )
    corpus = [s.raw for s in build_corpus(args.messages, args.corpus_seed)]
    say(f"corpus: {len(corpus)} messages, {sum(map(len, corpus)) / 1e6:.0f} MB")
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"{os.uname().sysname} {os.uname().release}",
        "clamd": os.popen("/usr/sbin/clamd --version").read().strip(),
        "load_before": round(os.getloadavg()[0], 1),
        "database": {
            "directory": str(db) if db else None,
            "signatures": manifest.get("signatures"),
            "seed": manifest.get("seed"),
            "bytes": sum(f["bytes"] for f in manifest.get("files", {}).values()),
        },
        "corpus": {"messages": len(corpus), "seed": args.corpus_seed, "threads": args.threads},
        "runs": [],
    }
    work = Path(tempfile.mkdtemp(prefix="bench-clamd-", dir="/var/tmp"))
    try:
        for mode in args.modes.split(","):
            report["runs"].append(measure(mode.strip(), db, corpus, args.threads, work))
            report[f"load_after_{mode.strip()}"] = round(os.getloadavg()[0], 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(report))
    print(json.dumps({k: v for k, v in report.items()}, default=str))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        say(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
