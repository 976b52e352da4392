"""Union MIME parsing finds payloads hidden by MIME tricks, with their candidate file names."""

from __future__ import annotations

import base64
import binascii

import pytest
from mime_builders import (
    EICAR,
    MARKER,
    analyse_text,
    assert_found,
    attachment_message,
    b64_lines,
    decoded_objects,
    uuencode,
    yencode,
)

from mailtower.scanning.mime import analyse

EOLS = pytest.mark.parametrize("eol", ["\r\n", "\n"], ids=["crlf", "lf"])
B64 = base64.b64encode(EICAR).decode()


def _mixed(boundary_decl: str, body: str) -> str:
    return f"""From: a@example.com
To: b@example.net
Subject: test
MIME-Version: 1.0
Content-Type: multipart/mixed; {boundary_decl}

{body}"""


@EOLS
def test_plain_attachment_found_with_its_name(eol: str) -> None:
    result = analyse(attachment_message(eol=eol))
    assert_found(result, filename="eicar.com")
    assert result.anomalies == []


@EOLS
def test_nested_boundary_prefix_of_outer_is_a_collision(eol: str) -> None:
    text = _mixed(
        'boundary="XYZ-outer-1234"',
        f"""--XYZ-outer-1234
Content-Type: multipart/alternative; boundary="XYZ-outer"

--XYZ-outer
Content-Type: text/plain

hello
--XYZ-outer
Content-Type: application/octet-stream; name="inner.bin"
Content-Transfer-Encoding: base64

{b64_lines(EICAR)}
--XYZ-outer--
--XYZ-outer-1234--
""",
    )
    result = analyse_text(text, eol)
    assert_found(result, filename="inner.bin")
    assert "mime.boundary-collision" in result.anomalies


def test_part_behind_a_line_only_a_prefix_matching_client_splits_on() -> None:
    # Python reads the attachment as text inside the first part; a client that matches
    # boundaries by prefix sees a second part and decodes it.
    text = _mixed(
        'boundary="XYZ"',
        f"""--XYZ
Content-Type: text/plain

hello
--XYZ-not-a-boundary
Content-Type: application/octet-stream; name="hidden.exe"
Content-Transfer-Encoding: base64

{b64_lines(EICAR)}
--XYZ--
""",
    )
    result = analyse_text(text)
    assert_found(result, filename="hidden.exe")
    assert "mime.boundary-collision" in result.anomalies
    assert "mime.views-disagree" in result.anomalies


@pytest.mark.parametrize(
    ("decl", "delim"),
    [
        ('boundary="Frontier"', "FRONTIER"),  # declared in one case, used in another
        ("boundary='single'", "single"),  # single quotes: Python keeps them in the boundary
        ('BOUNDARY = "spaced"', "spaced"),
        ('boundary="unterminated', "unterminated"),
        ("boundary*=utf-8''encoded", "encoded"),
    ],
)
def test_boundary_declared_with_other_quoting_or_case(decl: str, delim: str) -> None:
    text = _mixed(
        decl,
        f"""--{delim}
Content-Type: application/octet-stream; name="q.com"
Content-Transfer-Encoding: base64

{b64_lines(EICAR)}
--{delim}--
""",
    )
    assert_found(analyse_text(text), filename="q.com")


@EOLS
@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(
            lambda s: "\n".join(s[i : i + 13] for i in range(0, len(s), 13)), id="odd-lines"
        ),
        pytest.param(lambda s: "!".join(s[i : i + 5] for i in range(0, len(s), 5)), id="junk"),
        pytest.param(lambda s: s.rstrip("="), id="no-padding"),
        pytest.param(lambda s: s + "===", id="extra-padding"),
        pytest.param(lambda s: " ".join(s), id="spaces"),
        pytest.param(lambda s: s[:20] + "\x00*#" + s[20:50] + "\n\n" + s[50:], id="nul-and-blank"),
        pytest.param(
            lambda s: "\n".join(s[i : i + 7] for i in range(0, len(s), 7)) + "$$", id="odd-junk"
        ),
    ],
)
def test_base64_with_junk_odd_lines_and_bad_padding(eol: str, mangle) -> None:
    text = _mixed(
        'boundary="b"',
        f"""--b
Content-Type: application/octet-stream; name="junk.com"
Content-Transfer-Encoding: base64

{mangle(B64)}
--b--
""",
    )
    assert_found(analyse_text(text, eol), filename="junk.com")


def test_base64_junk_is_reported() -> None:
    mangled = "!".join(B64[i : i + 5] for i in range(0, len(B64), 5))
    text = _mixed('boundary="b"', f"--b\nContent-Transfer-Encoding: base64\n\n{mangled}\n--b--\n")
    result = analyse_text(text)
    assert_found(result)
    assert "mime.base64-junk" in result.anomalies


def test_concatenated_base64_streams_decoded_past_the_padding() -> None:
    # "QQ==" then more data: strict decoders stop at the padding, others go on.
    first = base64.b64encode(b"A").decode()
    text = _mixed(
        'boundary="b"',
        f"--b\nContent-Transfer-Encoding: base64\n\n{first}\n{B64}\n--b--\n",
    )
    result = analyse_text(text)
    assert_found(result)
    assert "mime.base64-junk" in result.anomalies


@pytest.mark.parametrize("cte", [None, "7bit", "base-64", "BASE64 (it is)", "x-unknown"])
def test_base64_body_with_missing_or_garbled_cte(cte: str | None) -> None:
    header = f"Content-Transfer-Encoding: {cte}\n" if cte else ""
    text = _mixed(
        'boundary="b"',
        f"""--b
Content-Type: application/octet-stream; name="nocte.com"
{header}
{b64_lines(EICAR)}
--b--
""",
    )
    result = analyse_text(text)
    assert_found(result, filename="nocte.com")
    if cte != "BASE64 (it is)":  # Python reads that one too (case-insensitive, comment)
        assert "mime.cte-mismatch" in result.anomalies


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("filename*0*=utf-8''ev%69l; filename*1*=.c; filename*2=om", "evil.com"),
        ('filename*0="part"; filename*1="two.exe"', "parttwo.exe"),
        ("filename*=UTF-8''%E2%80%AEgpj.exe", "\u202egpj.exe"),  # RTLO kept
        ("filename*=x-nonexistent''bad%20name.exe", "bad name.exe"),  # unknown charset
        ("filename*=iso-8859-1''r%E9sum%E9.exe", "r\u00e9sum\u00e9.exe"),
        ("filename*=utf-8''%E9t%E9.exe", "utf-8''%E9t%E9.exe"),  # mis-encoded: raw kept
        ("filename*=utf-8''%E9t%E9.exe", "\u00e9t\u00e9.exe"),  # … and a Latin-1 guess
    ],
)
def test_rfc2231_file_names(params: str, expected: str) -> None:
    text = _mixed(
        'boundary="b"',
        f"""--b
Content-Type: application/octet-stream
Content-Disposition: attachment; {params}
Content-Transfer-Encoding: base64

{b64_lines(EICAR)}
--b--
""",
    )
    assert_found(analyse_text(text), filename=expected)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("=?utf-8?B?{}?=".format(base64.b64encode(b"invoice.pdf.exe").decode()), "invoice.pdf.exe"),
        ("=?iso-8859-1?Q?fa=E7ade_file.scr?=", "fa\u00e7ade file.scr"),
        ("=?utf-8?q?two?= =?utf-8?q?_words.exe?=", "two words.exe"),
        ("=?utf-8?B?{}".format(base64.b64encode(b"unterminated.exe").decode()), "unterminated.exe"),
        ("=?bogus-charset?Q?odd.exe?=", "odd.exe"),
        ("=?utf-8?B?{}?=".format(base64.b64encode(b"C:\\temp\\..\\deep.exe").decode()), "deep.exe"),
    ],
)
def test_rfc2047_names(name: str, expected: str) -> None:
    text = _mixed(
        'boundary="b"',
        f"""--b
Content-Type: application/octet-stream; name="{name}"
Content-Transfer-Encoding: base64

{b64_lines(EICAR)}
--b--
""",
    )
    assert_found(analyse_text(text), filename=expected)


@pytest.mark.parametrize(
    "name", ["invoice.pdf          .exe", "photo.jpg.exe", "report\u202efdp.exe", " lead.exe"]
)
def test_disguised_names_kept_verbatim(name: str) -> None:
    quoted = name.replace('"', '\\"')
    data = attachment_message(name=quoted)
    assert_found(analyse(data), filename=name)


def test_path_components_stripped() -> None:
    data = attachment_message(name="C:\\\\Users\\\\x\\\\..\\\\run.exe")
    assert_found(analyse(data), filename="run.exe")
    data = attachment_message(name="../../etc/cron.d/job")
    assert_found(analyse(data), filename="job")


def test_different_names_in_type_and_disposition_are_a_mismatch() -> None:
    text = _mixed(
        'boundary="b"',
        f"""--b
Content-Type: audio/x-wav; name="song.wav"
Content-Disposition: attachment; filename="song.exe"
Content-Transfer-Encoding: base64

{b64_lines(EICAR)}
--b--
""",
    )
    result = analyse_text(text)
    obj = assert_found(result, filename="song.exe")
    assert "song.wav" in obj.filenames
    assert "audio/x-wav" in obj.content_types
    assert "mime.filename-mismatch" in result.anomalies


@EOLS
def test_uuencode_in_text_body(eol: str) -> None:
    text = f"""From: a@example.com
Subject: uu

Here it comes:

{uuencode(EICAR, "uu.com")}

bye
"""
    result = analyse_text(text, eol)
    assert_found(result, filename="uu.com")
    assert "mime.uuencode" in result.anomalies


def test_uuencode_inside_quoted_printable_text_part() -> None:
    uu = uuencode(MARKER, "m.bin")
    qp = binascii.b2a_qp(uu.encode(), istext=True).decode()
    text = _mixed(
        'boundary="b"',
        "--b\nContent-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n\n"
        f"{qp}\n--b--\n",
    )
    assert_found(analyse_text(text), MARKER, filename="m.bin")


@EOLS
def test_yenc_in_text_body(eol: str) -> None:
    payload = EICAR + bytes(range(256))  # every byte value, escapes included
    text = f"From: a@example.com\nSubject: y\n\n{yencode(payload, 'y enc.com', line=40)}\n"
    data = text.replace("\n", eol).encode("latin-1")
    result = analyse(data)
    obj = assert_found(result, filename="y enc.com")
    assert obj.data == payload
    assert "mime.yenc" in result.anomalies


@EOLS
def test_attachment_inside_forwarded_message(eol: str) -> None:
    inner = attachment_message(name="fwd.com", boundary="inner-b", eol=eol).decode()
    text = _mixed(
        'boundary="outer-b"',
        f"""--outer-b
Content-Type: text/plain

see below
--outer-b
Content-Type: message/rfc822

{inner}
--outer-b--
""",
    )
    result = analyse_text(text, eol)
    assert_found(result, filename="fwd.com")
    assert "mime.views-disagree" not in result.anomalies


def test_base64_encoded_forwarded_message_is_decoded_and_read() -> None:
    inner = attachment_message(name="deep.com", boundary="inner-b")
    text = _mixed(
        'boundary="outer-b"',
        f"--outer-b\nContent-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
        f"{b64_lines(inner)}\n--outer-b--\n",
    )
    assert_found(analyse_text(text), filename="deep.com")


def test_message_partial_is_reported() -> None:
    text = _mixed(
        'boundary="b"',
        """--b
Content-Type: message/partial; id="abc@example.com"; number=1; total=2

Content-Type: application/octet-stream
Content-Transfer-Encoding: base64

WDVPIVAlQEFQWzRcUFpYNTQo
--b--
""",
    )
    assert "mime.message-partial" in analyse_text(text).anomalies


@EOLS
def test_missing_mime_version(eol: str) -> None:
    data = attachment_message(eol=eol).replace(b"MIME-Version: 1.0" + eol.encode(), b"")
    assert b"MIME-Version" not in data
    assert_found(analyse(data), filename="eicar.com")


@EOLS
def test_missing_closing_boundary(eol: str) -> None:
    data = attachment_message(eol=eol)
    data = data[: data.rindex(b"--==b0undary==--")]
    result = analyse(data)
    assert_found(result, filename="eicar.com")
    assert "mime.missing-boundary-end" in result.anomalies


def test_mixed_line_endings() -> None:
    data = attachment_message(eol="\r\n")
    head, sep, tail = data.partition(b"Content-Type: application")
    assert_found(analyse(head + sep + tail.replace(b"\r\n", b"\n")), filename="eicar.com")


@pytest.mark.parametrize(
    ("original", "where"),
    [
        (b"Subject: the file", b"Subject: the\x00file"),
        (b"Here is the file.", b"Here is\x00 the\x00\x00file."),
        (b"Content-Type: text/plain;", b"Content-Type: text/plain\x00;"),
        (b"--==b0undary==\r\nContent-Type: app", b"--==b0undary==\x00\r\nContent-Type: app"),
    ],
)
def test_nul_bytes(original: bytes, where: bytes) -> None:
    data = attachment_message()
    assert original in data
    result = analyse(data.replace(original, where))
    assert_found(result, filename="eicar.com")
    assert "mime.nul-byte" in result.anomalies


def test_attachment_hidden_after_the_closing_boundary() -> None:
    data = (
        attachment_message(payload=b"harmless", boundary="b")
        + (
            '--b\nContent-Type: application/octet-stream; name="late.com"\n'
            f"Content-Transfer-Encoding: base64\n\n{b64_lines(EICAR)}\n"
        )
        .replace("\n", "\r\n")
        .encode()
    )
    result = analyse(data)
    assert_found(result, filename="late.com")


def test_base64_in_the_preamble() -> None:
    text = _mixed(
        'boundary="b"', f"{b64_lines(EICAR)}\n--b\nContent-Type: text/plain\n\nhi\n--b--\n"
    )
    result = analyse_text(text)
    assert_found(result)
    assert "mime.data-outside-parts" in result.anomalies


def test_space_before_header_colon() -> None:
    data = attachment_message().replace(
        b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding : base64"
    )
    assert_found(analyse(data), filename="eicar.com")


def test_duplicate_headers_read_both_ways() -> None:
    text = _mixed(
        'boundary="b"',
        f"""--b
Content-Type: text/plain; name="a.txt"
Content-Transfer-Encoding: 7bit
Content-Type: application/octet-stream; name="a.exe"
Content-Transfer-Encoding: base64

{b64_lines(EICAR)}
--b--
""",
    )
    result = analyse_text(text)
    obj = assert_found(result, filename="a.exe")
    assert "a.txt" in obj.filenames
    assert "mime.duplicate-header" in result.anomalies


def test_destroyed_structure_still_decodes_base64_runs() -> None:
    data = attachment_message().replace(b'boundary="==b0undary=="', b'boundary="gone"')
    assert not decoded_objects(analyse(data), b"never")  # sanity: helper works on absent data
    assert_found(analyse(data))
