"""Container expansion: formats found by content, limits, bombs in bounded time and memory."""

from __future__ import annotations

import bz2
import functools
import io
import lzma
import os
import random
import struct
import tarfile
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable

import py7zr
import pytest
from archive_builders import with_encrypted_flag

from mailtower import testdata
from mailtower.containers import ContainerLimits, detect, expand
from mailtower.objects import ScanObject

MiB = 1024 * 1024
LIMITS = ContainerLimits()
BOMB_CPU_SECONDS = 5.0  # every bomb must stop well inside the 10 s limit
BOMB_PEAK_BYTES = 100 * MiB


# -- fixture builders (everything generated at run time) ---------------------------------------


def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def tar_of(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as archive:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sevenzip_of(members: dict[str, bytes], password: str | None = None) -> bytes:
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w", password=password) as archive:
        for name, data in members.items():
            archive.writestr(data, name)
    return buf.getvalue()


def deflate_zeros(mib: int) -> bytes:
    """A raw deflate stream of ``mib`` MiB of zeros, built without compressing them all.

    After a full flush the compressor's state is reset, so each 1 MiB piece compresses to the
    same bytes wherever it stands: repeating one piece makes a valid stream of any length.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = compressor.compress(bytes(MiB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(bytes(MiB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert piece == again
    return piece * mib + compressor.flush()


def crafted_zip(
    entries: list[tuple[str, bytes, int, int, int]], *, share_data: bool = False
) -> bytes:
    """A zip written by hand: (name, raw data, method, stated size, crc) per entry.

    Sizes that need it are written as zip64. With ``share_data``, every central-directory
    entry points at the first entry's local header (overlapping entries).
    """
    out = bytearray()
    central = bytearray()
    first_offset = 0
    for index, (name, raw, method, size, crc) in enumerate(entries):
        encoded = name.encode()
        zip64 = size >= 0xFFFFFFFF or len(raw) >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 1, 16, size, len(raw)) if zip64 else b""
        csize32 = 0xFFFFFFFF if zip64 else len(raw)
        usize32 = 0xFFFFFFFF if zip64 else size
        offset = len(out)
        if index == 0:
            first_offset = offset
        if not share_data or index == 0:
            out += struct.pack(
                "<4sHHHHHIIIHH",
                b"PK\x03\x04",
                45,
                0,
                method,
                0,
                0,
                crc,
                csize32,
                usize32,
                len(encoded),
                len(extra),
            )
            out += encoded + extra + raw
        central += struct.pack(
            "<4sHHHHHHIIIHHHHHII",
            b"PK\x01\x02",
            45,
            45,
            0,
            method,
            0,
            0,
            crc,
            csize32,
            usize32,
            len(encoded),
            len(extra),
            0,
            0,
            0,
            0,
            first_offset if share_data else offset,
        )
        central += encoded + extra
    cd_offset = len(out)
    out += central
    out += struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), cd_offset, 0
    )
    return bytes(out)


def gzip_stream(raw_deflate: bytes) -> bytes:
    return b"\x1f\x8b\x08\x00" + bytes(4) + b"\x02\xff" + raw_deflate + struct.pack("<II", 0, 0)


def obj(data: bytes, name: str | None = None, path: str = "1") -> ScanObject:
    return ScanObject(data=data, path=path, filenames=frozenset({name} if name else ()))


def limit_anomalies(anomalies: list[str]) -> list[str]:
    return [a for a in anomalies if a.startswith("container.limit-exceeded:")]


# -- formats -----------------------------------------------------------------------------------


def test_nested_zip_finds_eicar_at_depth_3() -> None:
    inner = zip_of({"eicar.com": testdata.eicar()})
    middle = zip_of({"l2.zip": inner})
    outer = zip_of({"l1.zip": middle})

    members, anomalies = expand(obj(outer, "outer.zip"))

    assert anomalies == []
    found = [m for m in members if m.data == testdata.eicar()]
    assert len(found) == 1
    assert found[0].depth == 3
    assert found[0].path == "1!l1.zip!l2.zip!eicar.com"
    assert found[0].filenames == frozenset({"eicar.com"})
    assert [m.path for m in members] == ["1!l1.zip", "1!l1.zip!l2.zip", found[0].path]


@pytest.mark.parametrize(
    ("mode", "outer_name"),
    [("w:gz", "a.tar.gz"), ("w:bz2", "a.tar.bz2"), ("w:xz", "a.txz"), ("w", "a.tar")],
)
def test_tar_in_every_compression_is_expanded(mode: str, outer_name: str) -> None:
    data = tar_of({"docs/readme.txt": b"hello", "bin/eicar.com": testdata.eicar()}, mode)

    members, anomalies = expand(obj(data, outer_name))

    assert anomalies == []
    by_name = {next(iter(m.filenames)): m for m in members}
    assert by_name["bin/eicar.com"].data == testdata.eicar()
    assert by_name["docs/readme.txt"].data == b"hello"
    if mode != "w":  # the compressed layer yields the tar, which yields its members
        assert by_name["a.tar"].depth == 1
        assert by_name["bin/eicar.com"].depth == 2
        assert by_name["bin/eicar.com"].path == "1!a.tar!bin/eicar.com"


@pytest.mark.parametrize(
    ("compress", "kind"),
    [
        (lambda d: zlib.compress(d, wbits=31), "gzip"),
        (bz2.compress, "bzip2"),
        (lzma.compress, "xz"),
        (lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE), "lzma"),
    ],
)
def test_single_stream_compressors(compress: Callable[[bytes], bytes], kind: str) -> None:
    payload = testdata.eicar() + os.urandom(1000)
    data = compress(payload)
    assert detect(data) == kind

    members, anomalies = expand(obj(data, "payload.bin.x"))

    assert anomalies == []
    assert [m.data for m in members] == [payload]


def test_concatenated_gzip_members_are_one_stream() -> None:
    data = zlib.compress(b"first ", wbits=31) + zlib.compress(b"second", wbits=31)
    members, anomalies = expand(obj(data, "two.gz"))
    assert anomalies == []
    assert [m.data for m in members] == [b"first second"]
    assert members[0].filenames == frozenset({"two"})


def test_gzip_member_takes_the_name_in_its_header() -> None:
    buf = io.BytesIO()
    import gzip

    with gzip.GzipFile(filename="invoice.exe", mode="wb", fileobj=buf) as stream:
        stream.write(b"MZ payload")
    members, _ = expand(obj(buf.getvalue(), "invoice.pdf.gz"))
    assert members[0].filenames == frozenset({"invoice.exe"})


def test_sevenzip_members_found() -> None:
    data = sevenzip_of({"a/eicar.com": testdata.eicar(), "b.txt": b"plain"})
    members, anomalies = expand(obj(data, "x.7z"))
    assert anomalies == []
    assert {next(iter(m.filenames)): m.data for m in members} == {
        "a/eicar.com": testdata.eicar(),
        "b.txt": b"plain",
    }


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_zip_compression_methods(method: int) -> None:
    data = zip_of({"e.com": testdata.eicar(), "z.bin": bytes(5000)}, method)
    members, anomalies = expand(obj(data))
    assert anomalies == []
    assert [m.data for m in members] == [testdata.eicar(), bytes(5000)]


def test_a_name_that_lies_does_not_stop_expansion() -> None:
    data = zip_of({"eicar.com": testdata.eicar()})
    members, _ = expand(
        ScanObject(
            data=data,
            path="2",
            filenames=frozenset({"notes.txt"}),
            content_types=frozenset({"text/plain"}),
        )
    )
    assert [m.data for m in members] == [testdata.eicar()]


def test_zip_behind_other_bytes_is_found() -> None:
    data = b"GIF89a" + os.urandom(3000) + zip_of({"eicar.com": testdata.eicar()})
    members, anomalies = expand(obj(data, "cat.gif"))
    assert [m.data for m in members] == [testdata.eicar()]
    assert anomalies == []


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"plain text mail body\r\n" * 50,
        os.urandom(4096),
        b"%PDF-1.7\n" + os.urandom(2000) + b"PK\x05\x06 in a stream, not a zip" + bytes(30),
    ],
    ids=["empty", "text", "random", "pdf-with-zip-end-bytes"],
)
def test_not_a_container(data: bytes) -> None:
    assert expand(obj(data, "x.pdf")) == ([], [])


def test_office_document_members_are_expanded_without_anomaly() -> None:
    docx = zip_of(
        {
            "[Content_Types].xml": b"<Types/>" * 20,
            "word/document.xml": b"<w:document>" + b"<w:p>Quarterly report</w:p>" * 2000,
        }
    )
    members, anomalies = expand(obj(docx, "report.docx"))
    assert anomalies == []
    assert len(members) == 2


# -- anomalies ---------------------------------------------------------------------------------


def test_encrypted_zip_member_is_reported() -> None:
    data = with_encrypted_flag(zip_of({"secret.exe": b"MZ" + os.urandom(200)}))
    members, anomalies = expand(obj(data))
    assert anomalies == ["container.encrypted"]
    assert members == []


def test_encrypted_7z_is_reported() -> None:
    data = sevenzip_of({"secret.exe": b"MZ" + os.urandom(200)}, password="infected")
    members, anomalies = expand(obj(data))
    assert anomalies == ["container.encrypted"]
    assert members == []


def test_truncated_gzip_is_corrupt_and_keeps_what_decoded() -> None:
    payload = testdata.eicar() + os.urandom(200_000)
    data = zlib.compress(payload, wbits=31)[:-5000]
    members, anomalies = expand(obj(data, "x.gz"))
    assert anomalies == ["container.corrupt"]
    assert members and members[0].data.startswith(testdata.eicar())


def test_zip_crc_mismatch_is_corrupt() -> None:
    raw = zlib.compress(b"hello world", wbits=-15)
    data = crafted_zip([("a.txt", raw, 8, 11, 0x12345678)])
    members, anomalies = expand(obj(data))
    assert anomalies == ["container.corrupt"]
    assert [m.data for m in members] == [b"hello world"]


def test_truncated_zip_is_corrupt() -> None:
    data = zip_of({"a.bin": os.urandom(5000)})
    members, anomalies = expand(obj(data[:3000]))
    assert anomalies == ["container.corrupt"]


def test_deflate64_member_is_unsupported_not_clean() -> None:
    data = crafted_zip([("a.bin", b"\x00" * 10, 9, 10, 0)])
    _, anomalies = expand(obj(data))
    assert anomalies == ["container.unsupported"]


def test_depth_limit() -> None:
    data = testdata.eicar()
    for level in range(10):
        data = zip_of({f"l{level}.zip": data})
    members, anomalies = expand(obj(data), ContainerLimits(max_depth=8))
    assert anomalies == ["container.limit-exceeded:depth"]
    assert max(m.depth for m in members) == 8


def test_members_limit() -> None:
    data = zip_of({f"f{i}.txt": b"x" for i in range(20)})
    members, anomalies = expand(obj(data), ContainerLimits(max_members=10))
    assert anomalies == ["container.limit-exceeded:members"]


def test_members_limit_counts_entries_of_every_archive() -> None:
    inner = zip_of({f"f{i}.txt": b"x" for i in range(6)})
    data = zip_of({"a.zip": inner, "b.zip": inner})
    _, anomalies = expand(obj(data), ContainerLimits(max_members=12))
    assert anomalies == ["container.limit-exceeded:members"]
    _, anomalies = expand(obj(data), ContainerLimits(max_members=14))
    assert anomalies == []


def test_time_limit() -> None:
    data = zip_of({"a.txt": b"x"})
    _, anomalies = expand(obj(data), ContainerLimits(max_time_s=0))
    assert anomalies == ["container.limit-exceeded:time"]


def test_time_limit_is_cpu_time_with_a_wall_clock_backstop() -> None:
    data = zip_of({"a.txt": b"x"})
    # Past the wall-clock backstop but within the CPU limit: a starved machine, not a bomb.
    _, anomalies = expand(obj(data), ContainerLimits(max_time_s=10, max_wall_s=0))
    assert anomalies == ["container.wall-timeout"]


def test_wall_time_the_thread_does_not_run_is_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """An expansion whose wall clock jumps 20 s (the thread starved) but whose CPU time does
    not, stays within a 10 s limit: the limit is the thread's CPU time."""
    data = zip_of({"a.txt": b"x", "b.txt": b"y"})
    real_monotonic = time.monotonic
    offset = [0.0]

    def starved_monotonic() -> float:
        offset[0] += 20.0  # every look at the clock: another 20 s of waiting for a core
        return real_monotonic() + offset[0]

    monkeypatch.setattr(time, "monotonic", starved_monotonic)
    members, anomalies = expand(obj(data), ContainerLimits(max_time_s=10, max_wall_s=1000))
    assert anomalies == []
    assert {m.data for m in members} == {b"x", b"y"}


def test_bytes_limit() -> None:
    data = zip_of({"a.bin": os.urandom(300_000), "b.bin": os.urandom(300_000)})
    members, anomalies = expand(obj(data), ContainerLimits(max_expanded_bytes=400_000))
    assert anomalies == ["container.limit-exceeded:bytes"]


def test_ratio_limit_spares_small_members() -> None:
    data = zip_of({"blank.txt": b" " * 200_000})  # 200 KB at ~1000:1, below the grace
    members, anomalies = expand(obj(data))
    assert anomalies == []
    assert len(members) == 1


def test_xz_that_asks_for_a_huge_dictionary_is_refused() -> None:
    data = bytearray(lzma.compress(b"small"))
    # The block header follows the 12-byte stream header; its LZMA2 filter property byte
    # encodes the dictionary size. Code 36 = 1 GiB; then fix the header's CRC32.
    header_size = (data[12] + 1) * 4
    flags = data[13]
    assert flags & 0xC0 == 0, "expected no size fields in the block header"
    assert data[14:16] == b"\x21\x01"
    data[16] = 36
    crc = zlib.crc32(bytes(data[12 : 12 + header_size - 4]))
    data[12 + header_size - 4 : 12 + header_size] = struct.pack("<I", crc)

    _, anomalies = expand(obj(bytes(data)), ContainerLimits(max_decoder_memory=128 * MiB))

    assert anomalies == ["container.limit-exceeded:memory"]


# -- bombs: each must stop within the time limit in bounded memory -----------------------------


def _ten_gib_zip() -> bytes:
    raw = deflate_zeros(10 * 1024)
    return crafted_zip([("zeros.bin", raw, 8, 10 * 1024 * MiB, 0)])


def _lying_zip() -> bytes:
    # The headers say 1 KB; the data inflates to 10 GiB.
    return crafted_zip([("small.txt", deflate_zeros(10 * 1024), 8, 1000, 0)])


def _overlapping_zip() -> bytes:
    # 2,000 directory entries all pointing at one 100 MiB kernel: 200 GB if each is expanded.
    raw = deflate_zeros(100)
    entries = [(f"f{i}.bin", raw, 8, 100 * MiB, 0) for i in range(2000)]
    return crafted_zip(entries, share_data=True)


def _ten_gib_gzip() -> bytes:
    return gzip_stream(deflate_zeros(10 * 1024))


def _ten_gib_xz() -> bytes:
    return lzma.compress(bytes(10 * MiB), preset=0) * 1024  # concatenated streams are valid xz


def _ten_gib_bzip2() -> bytes:
    return bz2.compress(bytes(10 * MiB)) * 1024


def _nested_42_style() -> bytes:
    # 42.zip: 16 copies of 16 copies of … a highly compressible file, 5 levels deep.
    layer = zip_of({"0.bin": bytes(4 * MiB)})
    for _ in range(4):
        layer = zip_of({f"{i}.zip": layer for i in range(16)})
    return layer


def _tar_gz_bomb() -> bytes:
    return tar_of({"zeros.bin": bytes(80 * MiB)}, "w:gz")


def _sevenzip_bomb() -> bytes:
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w") as archive:
        archive.writestr(bytes(80 * MiB), "zeros.bin")
    return buf.getvalue()


# Each bomb is built once and shared by both limit settings.
BOMBS = {
    "zip-10GiB": _ten_gib_zip,
    "zip-lying-sizes": _lying_zip,
    "zip-overlapping-entries": _overlapping_zip,
    "gzip-10GiB": _ten_gib_gzip,
    "xz-10GiB": _ten_gib_xz,
    "bzip2-10GiB": _ten_gib_bzip2,
    "nested-42": _nested_42_style,
    "tar.gz": _tar_gz_bomb,
    "7z": _sevenzip_bomb,
}


@functools.cache
def _built(build: Callable[[], bytes]) -> bytes:
    return build()


@pytest.mark.parametrize("build", BOMBS.values(), ids=BOMBS.keys())
@pytest.mark.parametrize(
    "limits",
    [
        LIMITS,
        # With the ratio check off, the byte limit must still stop it (and quickly).
        ContainerLimits(max_ratio=1e12, max_expanded_bytes=64 * MiB),
    ],
    ids=["default", "no-ratio"],
)
def test_bomb_stops_in_bounded_time_and_memory(
    build: Callable[[], bytes], limits: ContainerLimits
) -> None:
    data = _built(build)
    assert len(data) < 20 * MiB  # small on disk

    tracemalloc.start()
    started, cpu_started = time.monotonic(), time.process_time()
    try:
        members, anomalies = expand(obj(data, "bomb.bin"), limits)
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert limit_anomalies(anomalies), anomalies
    if limits.max_ratio > 1e6:
        assert limit_anomalies(anomalies) == ["container.limit-exceeded:bytes"]
    assert elapsed < limits.max_time_s
    assert cpu < BOMB_CPU_SECONDS  # the work itself, whatever else loads the machine
    assert peak < BOMB_PEAK_BYTES
    assert sum(len(m.data) for m in members) <= min(limits.max_expanded_bytes, 100 * MiB)


def test_overlapping_entries_are_flagged_even_when_small() -> None:
    raw = zlib.compress(b"payload", wbits=-15)
    crc = zlib.crc32(b"payload")
    data = crafted_zip([("a.txt", raw, 8, 7, crc), ("b.exe", raw, 8, 7, crc)], share_data=True)
    _, anomalies = expand(obj(data))
    assert "container.corrupt" in anomalies


def test_zip_newer_than_zipfile_is_unsupported_not_clean() -> None:
    data = bytearray(zip_of({"a.exe": b"MZ"}))
    central = data.find(b"PK\x01\x02")
    data[central + 6] = 71  # "version needed to extract": 7.1, which zipfile refuses
    members, anomalies = expand(obj(bytes(data)))
    assert anomalies == ["container.unsupported"]


def test_mutated_archives_never_raise() -> None:
    members = {"a.txt": b"hello " * 300, "e.com": testdata.eicar(), "n.zip": zip_of({"x": b"y"})}
    seeds = [
        zip_of(members),
        zip_of(members, zipfile.ZIP_LZMA),
        tar_of(members, "w:gz"),
        tar_of(members, "w:xz"),
        sevenzip_of(members),
    ]
    rng = random.Random(3)
    for _ in range(400):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        found, anomalies = expand(obj(bytes(data)), ContainerLimits(max_time_s=5))
        assert all(a.startswith("container.") for a in anomalies)
        assert all(m.depth >= 1 for m in found)
