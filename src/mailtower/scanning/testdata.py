"""Test payloads built at run time, so no scanner ever meets them on disk in this repository."""

from __future__ import annotations

import hashlib

# The EICAR anti-virus test file (eicar.org), assembled from pieces so that the literal string
# never appears in the repository.
_EICAR_PARTS = (
    r"X5O!P%@AP[4\PZX54(P^)7CC)7}$",
    "EICAR-STANDARD-ANTIVIRUS",
    "-TEST-FILE!$H+H*",
)

# mailtower's own test pattern: harmless text that the lab's test signatures flag as a virus,
# for tests that must not depend on EICAR.
_MARKER_PARTS = ("MAILTOWER", "-TEST-SIGNATURE-", "7f3c1a9e")


# Test outbreaks: distinct virus names the lab's signatures give, so a test can start an
# outbreak the GOC has never seen (VirusEye's "new outbreak") on a lab that already saw EICAR.
OUTBREAKS = 100


def outbreak_name(index: int) -> str:
    return f"Mailtower.Test.Outbreak-{index:02d}"


def outbreak_marker(index: int) -> bytes:
    """The harmless pattern the lab's signatures call ``outbreak_name(index)``."""
    return f"MAILTOWER-TEST-OUTBREAK-{index:02d}-c41e".encode()


def eicar() -> bytes:
    """The 68-byte EICAR test file."""
    return "".join(_EICAR_PARTS).encode()


def marker() -> bytes:
    """mailtower's own harmless test pattern."""
    return "".join(_MARKER_PARTS).encode()


def clamav_signatures() -> dict[str, str]:
    """The lab's ClamAV test databases: file name → content."""
    data = eicar()
    return {
        "mailtower-test.ndb": "".join(
            (
                f"Mailtower.Test.EICAR:0:*:{data.hex()}\n",
                f"Mailtower.Test.Marker:0:*:{marker().hex()}\n",
                *(f"{outbreak_name(i)}:0:*:{outbreak_marker(i).hex()}\n" for i in range(OUTBREAKS)),
            )
        ),
        "mailtower-test.hdb": (
            f"{hashlib.md5(data).hexdigest()}:{len(data)}:Mailtower.Test.EICAR.File\n"
        ),
    }
