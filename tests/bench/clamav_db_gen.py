"""A ClamAV database of the official one's size and shape, generated deterministically (issue 16).

The official databases cannot be downloaded on this machine, so the benchmarks of clamd's memory,
load and reload times and CPU per message (``clamd_reload.py``, ``scanner_vs_amavis.py
--clamav-db``) load this instead: about 8 million signatures in the proportions of main + daily,
as unsigned plain database files (``main.hdb``, ``daily.ndb``, …) that clamd loads from its
DatabaseDirectory like the unpacked contents of a CVD.

    python tests/bench/clamav_db_gen.py [--signatures 8000000] [--seed 16] [--out DIR]

Writes into ``DIR`` (default ``/var/tmp/mailtower-clamav-bench/<signatures>-<seed>``, never into
the repository) and prints one JSON line: the directory, the count and bytes of each file. The
same ``--signatures`` and ``--seed`` give byte-identical files; an existing directory whose
``manifest.json`` says so is reused as it is.

**Size: sources.**
- main.cvd version 62 (built 16 Sep 2021, still current in late 2023): 6,647,427 signatures;
  daily.cvd 26525 (Apr 2022): 1,981,764; daily 27138 (Dec 2023): 2,049,785; bytecode.cvd: 91–92.
  Total 8,629,283 (``clamconf`` output in Cisco-Talos/clamav issue #565, 2022; freshclam's log in
  mailcow/mailcow-dockerized issue #5620, 2023; a clamd loading 9,073,104 with third-party feeds
  in mailcow-dockerized issue #3761). So main is 77 % and daily 23 % of the signatures.
- daily.cvd and main.cvd were 105 MB and 117 MB compressed in March 2021 (the ClamAV blog post
  "ClamAV, CVDs, CDIFFs and the magic behind the curtain", as quoted on clamav-users).
- The engine these build: "upwards of 1.2 GiB of RAM simply to load the signature definitions",
  "upwards of 2.4 GiB … when loading new signature definitions" with a concurrent reload
  (docs.clamav.net, Docker page, "Memory (RAM) requirements", as quoted in
  alan-turing-institute/data-safe-haven issue #1724, which measured clamd 0.103.12 at 1.38 GiB
  idle). These are the cross-check of this generator: a shape that loads to a very different
  RSS is the wrong shape.

**Shape: chosen, no source found.** No public source found here gives the per-file-type split of
main + daily (a search of ClamAV's blog, clamav-users and issue threads for ``sigtool --info``
and unpacked line counts found only totals). The split used, and why:

| type | share | what | why |
|---|---|---|---|
| .hdb | 40 % | MD5 of whole files, with size | main's oldest, largest part: sample hashes |
| .hsb | 25 % | SHA256 of whole files, with size | newer hash signatures are SHA256 |
| .mdb | 19 % | MD5 of PE sections, with size | the PE-section hashes of Win.* families |
| .msb | 11.2 % | SHA256 of PE sections | as .mdb, newer |
| .ndb | 3 % | body: hex patterns with wildcards | the extended signatures (about 240,000) |
| .ldb | 1.5 % | logical: 2–6 subsignatures each | daily's new content signatures (120,000) |
| .cdb | 0.2 % | container metadata | a few thousand |
| .fp | 0.1 % | MD5 allow list | a few thousand |

Hash signatures are cheap per signature (measured here: about 150 bytes of clamd's RSS each, a
hash table entry and a name); body and logical ones build the Aho-Corasick trie and cost 1.5–3
KiB each, so the content share decides most of the RSS beyond the hashes. The content share
(4.5 %) was chosen small for that reason: at 8M the hashes alone are about 1.1 GiB, already
near the RSS the sources give for the real databases. docs/benchmarks.md ("Official-size ClamAV
database") compares what this database loads to with those sources.

**What each signature looks like.**
- Names like the official ones: ``Win.Trojan.Agent-1000123-0`` (platform, category, family, a
  unique number, a revision); each name unique, 20–40 characters.
- Hashes: random bytes from the seeded generator; file sizes log-uniform 1 KB–8 MB, PE section
  sizes 512 B–512 KB.
- Body (.ndb): target types weighted to the official mix (any, PE, HTML, OLE2, PDF, mail, ELF,
  …), offsets mostly ``*`` with some ``EP+n``, ``0`` and ``EOF-n``; 1–4 static fragments of
  8–48 bytes (12 for text targets) joined by ``??``, ``{n}``, ``{n-m}`` and ``*``, with some
  ``(aa|bb)`` alternatives; so a random-looking corpus cannot match one by chance.
- Logical (.ldb): ``Engine:51-255,Target:N``, expressions over 2–6 subsignatures (``&``, ``|``,
  counts), subsignatures of 8–32 static bytes, text ones sometimes case-insensitive (``::i``).
- Container (.cdb): a random member name in a ZIP/RAR/7Z/ISO container; allow list (.fp): MD5s.

**Not reproduced:** bytecode.cvd (91 compiled bytecode signatures: negligible in count, but the
bytecode engine's JIT memory is not measured), .ign2/.pdb/.wdb/.ftm/.crb and other small files,
PCRE subsignatures, and the CVD container (clamd loads these plain files; the real CVDs are first
gunzipped and untarred, which adds a few seconds to a load).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
from collections.abc import Callable, Iterator
from itertools import accumulate
from pathlib import Path

DEFAULT_SIGNATURES = 8_000_000
DEFAULT_SEED = 16
DEFAULT_ROOT = Path("/var/tmp/mailtower-clamav-bench")
FORMAT = 3  # bump when the output changes, so that a cached directory is rebuilt

# file type → share of all signatures (see the docstring)
SHARES = {
    "hdb": 0.40,
    "hsb": 0.25,
    "mdb": 0.19,
    "msb": 0.112,
    "ndb": 0.03,
    "ldb": 0.015,
    "cdb": 0.002,
    "fp": 0.001,
}
MAIN_SHARE = 6_647_427 / 8_629_283  # main.cvd v62 of main + daily (sources above)
# daily carries more of the newer kinds of signature: its share of each type
DAILY_SHARE = {"ldb": 0.6, "cdb": 0.5, "fp": 0.5, "hsb": 0.3, "msb": 0.3}

PLATFORMS = [
    ("Win", 46),
    ("Doc", 8),
    ("Xls", 4),
    ("Pdf", 5),
    ("Html", 7),
    ("Js", 5),
    ("Email", 3),
    ("Unix", 6),
    ("Andr", 6),
    ("Osx", 2),
    ("Java", 2),
    ("Multios", 2),
    ("Txt", 2),
    ("Img", 2),
]
CATEGORIES = [
    ("Trojan", 40),
    ("Malware", 18),
    ("Downloader", 8),
    ("Dropper", 6),
    ("Exploit", 5),
    ("Virus", 5),
    ("Worm", 4),
    ("Ransomware", 3),
    ("Adware", 3),
    ("Packed", 3),
    ("Phishing", 3),
    ("Coinminer", 2),
]
# .ndb / .ldb target types (docs.clamav.net, "Target Types") and their weights
TARGETS = [
    (0, 30),
    (1, 34),
    (3, 10),
    (2, 6),
    (10, 5),
    (7, 5),
    (4, 3),
    (6, 3),
    (9, 2),
    (12, 1),
    (5, 1),
]
EXECUTABLE_TARGETS = {1, 6, 9}
CONTAINERS = ["CL_TYPE_ZIP", "CL_TYPE_RAR", "CL_TYPE_7Z", "CL_TYPE_ISO9660", "CL_TYPE_ARJ"]


class _Names:
    """Official-looking, unique signature names from one seeded generator."""

    def __init__(self, rng: random.Random, first_id: int):
        self.rng = rng
        self.next_id = first_id
        consonants, vowels = "bcdfgklmnprstvxz", "aeiou"
        self.families = [
            "".join(
                rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 4))
            ).capitalize()
            for _ in range(4000)
        ] + ["Agent", "Generic", "Emotet", "Qakbot", "Formbook", "Lokibot", "Nanocore"] * 200
        self.platforms = [p for p, w in PLATFORMS for _ in range(w)]
        self.categories = [c for c, w in CATEGORIES for _ in range(w)]

    def __call__(self) -> str:
        rng = self.rng
        self.next_id += 1
        return (
            f"{rng.choice(self.platforms)}.{rng.choice(self.categories)}."
            f"{rng.choice(self.families)}-{self.next_id}-{rng.choice('0000000111')}"
        )


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


class _Bytes:
    """The static bytes of content signatures.

    clamd's Aho-Corasick trie (one per target type, depth 2–3) gets a node with a 256-entry
    transition table for each distinct 1- and 2-byte prefix, and keeps at each 3-byte leaf the
    patterns that start there; every scanned byte walks to a leaf and checks its patterns.
    Real patterns start with a skewed first byte (opcodes such as 8b, e8, ff, 00; ``<``, ``%``)
    and then vary: so binary fragments here take their first byte from a Zipf law over a seeded
    order of the 256 values and the rest uniformly, and text fragments (HTML, mail, normalised
    ASCII, PDF, Java targets) are uniform printable ASCII. A first try with every byte skewed
    (lower-case letters, Zipf bytes) put thousands of patterns on the leaves ordinary mail walks
    through and cost clamd 200 ms of CPU per bench message; uniform bytes everywhere build a
    full 65,536-node second level per target type. A fragment is at least 8 bytes (binary) or
    12 (text), so a corpus message cannot match one by chance.
    """

    TEXT_TARGETS = {3, 4, 7, 10, 12}

    def __init__(self, rng: random.Random):
        order = list(range(256))
        rng.shuffle(order)
        self.first_values = order
        self.first_cum = list(accumulate(1 / (rank + 1) ** 1.1 for rank in range(256)))
        self.text_values = list(range(0x20, 0x7F))

    def fragment(self, rng: random.Random, target: int, low: int, high: int) -> str:
        if target in self.TEXT_TARGETS:
            n = rng.randint(max(low, 12), max(high, 12))
            return bytes(rng.choices(self.text_values, k=n)).hex()
        n = rng.randint(max(low, 8), high)
        first = rng.choices(self.first_values, cum_weights=self.first_cum)[0]
        return (bytes([first]) + rng.randbytes(n - 1)).hex()


def _body(rng: random.Random, source: _Bytes, target: int) -> str:
    """A body pattern: 1–4 static fragments of at least 8 bytes, wildcards between and inside."""
    fragments = []
    for _ in range(rng.choices([1, 2, 3, 4], weights=[35, 35, 20, 10])[0]):
        fragment = source.fragment(rng, target, 8, 48)
        if len(fragment) >= 24 and rng.random() < 0.25:  # a single-byte wildcard inside
            at = 2 * rng.randint(4, len(fragment) // 2 - 4)
            fragment = fragment[:at] + "??" + fragment[at + 2 :]
        if rng.random() < 0.08:  # an alternative inside
            at = 2 * rng.randint(3, len(fragment) // 2 - 3)
            fragment = (
                f"{fragment[:at]}({rng.randbytes(1).hex()}|{rng.randbytes(1).hex()})"
                + (fragment[at:])
            )
        fragments.append(fragment)
    out = fragments[0]
    for fragment in fragments[1:]:
        gap = rng.choices(["??", "{n}", "{n-m}", "*"], weights=[20, 30, 35, 15])[0]
        if gap == "{n}":
            gap = f"{{{rng.randint(1, 64)}}}"
        elif gap == "{n-m}":
            low = rng.randint(0, 32)
            gap = f"{{{low}-{low + rng.randint(1, 200)}}}"
        out += gap + fragment
    return out


def _target(rng: random.Random) -> int:
    return rng.choices([t for t, _ in TARGETS], weights=[w for _, w in TARGETS])[0]


def _lines(kind: str, count: int, rng: random.Random, name: Callable[[], str]) -> Iterator[str]:
    source = _Bytes(rng)
    for _ in range(count):
        if kind in ("hdb", "fp"):
            yield f"{rng.randbytes(16).hex()}:{_log_uniform(rng, 1024, 8 << 20)}:{name()}\n"
        elif kind == "hsb":
            yield f"{rng.randbytes(32).hex()}:{_log_uniform(rng, 1024, 8 << 20)}:{name()}\n"
        elif kind == "mdb":
            yield f"{_log_uniform(rng, 512, 512 << 10)}:{rng.randbytes(16).hex()}:{name()}\n"
        elif kind == "msb":
            yield f"{_log_uniform(rng, 512, 512 << 10)}:{rng.randbytes(32).hex()}:{name()}\n"
        elif kind == "ndb":
            target = _target(rng)
            roll = rng.random()
            if target in EXECUTABLE_TARGETS and roll < 0.3:
                offset = f"EP+{rng.randint(0, 256)}"
            elif roll < 0.05:
                offset = "0"
            elif roll < 0.09:
                offset = f"EOF-{rng.randint(16, 4096)}"
            else:
                offset = "*"
            yield f"{name()}:{target}:{offset}:{_body(rng, source, target)}\n"
        elif kind == "ldb":
            n = rng.choices([2, 3, 4, 5, 6], weights=[30, 30, 20, 12, 8])[0]
            target = _target(rng)
            subs = []
            for _ in range(n):
                sub = source.fragment(rng, target, 8, 32)
                if target in source.TEXT_TARGETS and rng.random() < 0.3:
                    sub += "::i"
                subs.append(sub)
            shape = rng.random()
            if shape < 0.55:
                expr = "&".join(str(i) for i in range(n))
            elif shape < 0.8:
                expr = f"({'|'.join(str(i) for i in range(n - 1))})&{n - 1}"
            else:
                expr = f"{'&'.join(str(i) for i in range(n - 1))}&{n - 1}>{rng.randint(1, 3)}"
            yield f"{name()};Engine:51-255,Target:{target};{expr};{';'.join(subs)}\n"
        elif kind == "cdb":
            member = rng.randbytes(6).hex() + rng.choice([r"\.exe", r"\.scr", r"\.js", r"\.vbs"])
            size = _log_uniform(rng, 1024, 4 << 20)
            yield f"{name()}:{rng.choice(CONTAINERS)}:*:{member}:*:{size}:*:*:*:*\n"
        else:
            raise ValueError(kind)


def plan(signatures: int) -> dict[str, int]:
    """File name → signature count: ``signatures`` in SHARES, split between main and daily."""
    counts: dict[str, int] = {}
    kinds = list(SHARES)
    for kind in kinds:
        total = round(signatures * SHARES[kind])
        daily_share = DAILY_SHARE.get(kind, 1 - MAIN_SHARE)
        daily = round(total * daily_share)
        counts[f"main.{kind}"] = total - daily
        counts[f"daily.{kind}"] = daily
    # rounding: the remainder goes to the largest file
    counts["main.hdb"] += signatures - sum(counts.values())
    return counts


def generate(signatures: int, seed: int, out: Path) -> dict[str, object]:
    """Write the database into ``out`` (reused if its manifest matches); return the manifest."""
    manifest_path = out / "manifest.json"
    wanted = {"format": FORMAT, "signatures": signatures, "seed": seed}
    if manifest_path.exists():
        manifest: dict[str, object] = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in wanted} == wanted:
            return manifest
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    files: dict[str, dict[str, int | str]] = {}
    for index, (filename, count) in enumerate(plan(signatures).items()):
        if count <= 0:
            continue
        # one generator per file: the files do not depend on each other's counts
        rng = random.Random(f"{seed}:{filename}")
        names = _Names(rng, first_id=1_000_000 + index * 4_000_000)
        kind = filename.split(".", 1)[1]
        digest = hashlib.sha256()
        size = 0
        with (out / filename).open("w") as fh:
            batch: list[str] = []
            for line in _lines(kind, count, rng, names):
                batch.append(line)
                if len(batch) >= 20_000:
                    text = "".join(batch)
                    fh.write(text)
                    digest.update(text.encode())
                    size += len(text)
                    batch.clear()
            text = "".join(batch)
            fh.write(text)
            digest.update(text.encode())
            size += len(text)
        files[filename] = {"signatures": count, "bytes": size, "sha256": digest.hexdigest()}
    manifest = {**wanted, "directory": str(out), "files": files}
    # not a database file: clamd ignores .json in its DatabaseDirectory
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def default_dir(signatures: int, seed: int) -> Path:
    return DEFAULT_ROOT / f"{signatures}-{seed}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--signatures", type=int, default=DEFAULT_SIGNATURES)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", type=Path, help="default: " + str(default_dir(0, 0).parent))
    args = parser.parse_args(argv)
    if args.signatures < 1:
        parser.error("--signatures must be at least 1")
    out = args.out or default_dir(args.signatures, args.seed)
    manifest = generate(args.signatures, args.seed, out)
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
