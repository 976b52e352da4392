"""The reputation engine: exact SHA-256 hits, TLSH family neighbours, list loading."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from mailtower.scanning import testdata
from mailtower.scanning.engines import Finding
from mailtower.scanning.engines.reputation import (
    DEFAULT_TLSH_THRESHOLD,
    ReputationEngine,
    fuzzy_hash,
)
from mailtower.scanning.errors import EngineTimeout, ReputationDataError
from mailtower.scanning.objects import ScanObject
from mailtower.scanning.rules import REPUTATION_DIR, build_reputation
from mailtower.scanning.rules.build_reputation import FAMILIES, family_sample

ALPHA = FAMILIES[0]


@pytest.fixture(scope="module")
def shipped() -> ReputationEngine:
    return ReputationEngine()


def mutate(data: bytes, count: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    out = bytearray(data)
    for _ in range(count):
        out[rng.randrange(len(out))] = rng.randrange(32, 127)
    return bytes(out)


def ordinary_text() -> bytes:
    return (
        b"Dear Ms Jones,\r\n\r\nThank you for your order of 12 May. Please find attached the "
        b"invoice for the consulting work in April, payable within thirty days. If you have "
        b"any questions about the hours listed, do not hesitate to call me.\r\n\r\nKind "
        b"regards,\r\nPeter\r\n"
    ) * 20


# -- the shipped lists -----------------------------------------------------------------------------


def test_shipped_lists_are_what_the_generator_writes(tmp_path: Path) -> None:
    build_reputation.write(tmp_path)
    for name in (build_reputation.SHA256_FILE, build_reputation.TLSH_FILE):
        assert (REPUTATION_DIR / name).read_text() == (tmp_path / name).read_text(), (
            f"run: python -m mailtower.scanning.rules.build_reputation ({name} is stale)"
        )


def test_shipped_lists_hold_hashes_not_samples() -> None:
    for path in REPUTATION_DIR.iterdir():
        assert testdata.eicar() not in path.read_bytes()


def test_exact_sha256_hit(shipped: ReputationEngine) -> None:
    assert shipped.scan(testdata.eicar()) == [Finding("reputation", "Mailtower.Test.EICAR")]
    assert shipped.lookup(testdata.eicar())[0].kind == "sha256"


def test_one_byte_more_is_not_an_exact_hit(shipped: ReputationEngine) -> None:
    assert shipped.scan(testdata.eicar() + b"\n") == []


@pytest.mark.parametrize("family", FAMILIES)
def test_family_member_is_found(shipped: ReputationEngine, family: str) -> None:
    [hit] = shipped.lookup(family_sample(family))
    assert (hit.kind, hit.name, hit.distance) == ("tlsh", family, 0)


@pytest.mark.parametrize("changes", [5, 30, 120])
def test_mutated_variant_is_the_nearest_family(shipped: ReputationEngine, changes: int) -> None:
    variant = mutate(family_sample(ALPHA), changes)
    assert hashlib.sha256(variant).digest() != hashlib.sha256(family_sample(ALPHA)).digest()
    [hit] = shipped.lookup(variant)
    assert hit.kind == "tlsh"
    assert hit.name == ALPHA
    assert 0 < hit.distance <= DEFAULT_TLSH_THRESHOLD


def test_variant_with_padding_and_reordering_still_matches(shipped: ReputationEngine) -> None:
    lines = family_sample(ALPHA).split(b"\n")
    lines[10:20] = reversed(lines[10:20])
    variant = b"' junk padding line\n".join([b"\n".join(lines[:30]), b"\n".join(lines[30:])])
    assert [h.name for h in shipped.lookup(variant)] == [ALPHA]


@pytest.mark.parametrize(
    "data",
    [
        ordinary_text(),
        os.urandom(6000),
        family_sample("Some.Unlisted.Family"),
        bytes(10_000),  # uniform: no TLSH at all
        b"short but varied 0123456789",  # < 50 bytes: no TLSH
    ],
    ids=["text", "random", "unlisted-family", "zeros", "short"],
)
def test_unrelated_data_is_no_hit(shipped: ReputationEngine, data: bytes) -> None:
    assert shipped.scan(data) == []


def test_families_are_apart_from_each_other() -> None:
    import tlsh

    hashes = [fuzzy_hash(family_sample(f)) for f in FAMILIES]
    for i, a in enumerate(hashes):
        for b in hashes[i + 1 :]:
            assert a and b and tlsh.diff(a, b) > DEFAULT_TLSH_THRESHOLD


def test_threshold_is_configurable() -> None:
    variant = mutate(family_sample(ALPHA), 120)
    distance = ReputationEngine().lookup(variant)[0].distance
    assert ReputationEngine(tlsh_threshold=distance - 1).lookup(variant) == []


def test_fuzzy_hash_skips_small_and_uniform_data() -> None:
    assert fuzzy_hash(os.urandom(49)) is None
    assert fuzzy_hash(bytes(5000)) is None
    assert (fuzzy_hash(os.urandom(200)) or "").startswith("T1")


def test_scan_objects_names_parts(shipped: ReputationEngine) -> None:
    objects = [
        ScanObject(data=ordinary_text(), path="1"),
        ScanObject(data=testdata.eicar(), path="2/x.zip!eicar.com", depth=1),
        ScanObject(data=mutate(family_sample(FAMILIES[1]), 10), path="3"),
        ScanObject(data=testdata.eicar(), path="4"),  # same bytes again: found again
    ]
    assert shipped.scan_objects(objects) == [
        Finding("reputation", "Mailtower.Test.EICAR", part="2/x.zip!eicar.com"),
        Finding("reputation", FAMILIES[1], part="3"),
        Finding("reputation", "Mailtower.Test.EICAR", part="4"),
    ]


def test_scan_objects_times_out(tmp_path: Path) -> None:
    engine = ReputationEngine(timeout_s=0)
    with pytest.raises(EngineTimeout):
        engine.scan_objects([ScanObject(data=b"x", path="1")])


# -- loading and reloading -------------------------------------------------------------------------


def test_lists_from_several_directories_and_reload(tmp_path: Path) -> None:
    sample = os.urandom(3000)
    engine = ReputationEngine([REPUTATION_DIR, tmp_path])
    assert engine.scan(sample) == []

    (tmp_path / "feed.sha256").write_text(
        f"# from the GOC\n\n{hashlib.sha256(sample).hexdigest().upper()}  Worm.Local.A\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "feed.tlsh").write_text(f"{fuzzy_hash(sample)[2:]} Family.Local\n")  # type: ignore[index]
    engine.reload()

    assert engine.scan(sample) == [
        Finding("reputation", "Worm.Local.A"),
        Finding("reputation", "Family.Local"),
    ]
    assert engine.scan(testdata.eicar()) == [Finding("reputation", "Mailtower.Test.EICAR")]
    assert "2 hashes, 4 family hashes" in engine.health(1)


@pytest.mark.parametrize(
    ("file", "line", "message"),
    [
        ("bad.sha256", "abc123 Short.Hash", "not a SHA-256"),
        ("bad.sha256", "0" * 64, "expected '<hash> <name>'"),
        ("bad.tlsh", "T1ZZZ Family", "not a TLSH hash"),
    ],
)
def test_malformed_line_keeps_old_lists(tmp_path: Path, file: str, line: str, message: str) -> None:
    engine = ReputationEngine([REPUTATION_DIR, tmp_path])
    old = engine.data
    (tmp_path / file).write_text(f"# comment\n{line}\n")

    with pytest.raises(ReputationDataError, match=message) as excinfo:
        engine.reload()

    assert f"{tmp_path / file}:2:" in str(excinfo.value)
    assert engine.data is old
    assert engine.scan(testdata.eicar()) == [Finding("reputation", "Mailtower.Test.EICAR")]


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReputationDataError, match="does not exist"):
        ReputationEngine([tmp_path / "missing"])
