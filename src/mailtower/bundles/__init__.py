"""Signed rule bundles: YARA, Skeptic, reputation and ClamAV rule data as one versioned file,
signed by the GOC and checked by every tower before it is used.

Usage::

    keygen(Path("keys"))                                    # signing.key (0600), signing.pub
    build(Path("rules"), load_signing_key(key), 42, Path("rules-42.tar.gz"))
    verify(Path("rules-42.tar.gz"), load_public_key(pub), current=41)   # or raises
    install(Path("rules-42.tar.gz"), load_public_key(pub), Path("/var/lib/mailtower/rules"))
    rollback(Path("/var/lib/mailtower/rules"))
    publish(Path("rules-42.tar.gz"), load_public_key(pub), Path("/srv/mailtower/bundles"))
    parse_latest(body_of_latest_json)                       # what a published directory holds

A bundle is refused — with a BundleError subclass naming the reason, and nothing changed —
when it is unsigned, signed by another key, tampered with, not newer than the version in use,
unsafe to unpack, or when its rules do not load. The format is in ``_format``; the layout of
an installed rules root in ``_install``; of a published directory (the GOC's, a monitor's
mirror) in ``_publish``.
"""

from __future__ import annotations

from mailtower.bundles._bundle import Built, Bundle, build, collect, read, verify
from mailtower.bundles._canary import Canary
from mailtower.bundles._canary import from_files as canaries
from mailtower.bundles._errors import (
    BundleError,
    ForeignKeyBundle,
    InstallError,
    InvalidRules,
    KeyFileError,
    MalformedBundle,
    StaleBundle,
    TamperedBundle,
    UnsafeBundle,
    UnsignedBundle,
)
from mailtower.bundles._format import FORMAT_VERSION, SECTIONS, Manifest
from mailtower.bundles._install import (
    BundleChange,
    Installed,
    install,
    installed,
    rollback,
    rule_dirs,
    status,
)
from mailtower.bundles._keys import (
    key_id,
    keygen,
    load_public_key,
    load_signing_key,
    public_key_from_pem,
)
from mailtower.bundles._publish import (
    GOC_KEY_DIR,
    GOC_PUBLISH_DIR,
    LATEST,
    Latest,
    Published,
    bundle_file_name,
    parse_latest,
    publish,
    read_latest,
)

__all__ = [
    "Canary",
    "canaries",
    "FORMAT_VERSION",
    "GOC_KEY_DIR",
    "GOC_PUBLISH_DIR",
    "LATEST",
    "SECTIONS",
    "Built",
    "Bundle",
    "BundleError",
    "BundleChange",
    "ForeignKeyBundle",
    "InstallError",
    "Installed",
    "InvalidRules",
    "KeyFileError",
    "Latest",
    "MalformedBundle",
    "Published",
    "Manifest",
    "StaleBundle",
    "TamperedBundle",
    "UnsafeBundle",
    "UnsignedBundle",
    "build",
    "bundle_file_name",
    "collect",
    "install",
    "installed",
    "key_id",
    "keygen",
    "load_public_key",
    "load_signing_key",
    "public_key_from_pem",
    "parse_latest",
    "publish",
    "read",
    "read_latest",
    "rollback",
    "rule_dirs",
    "status",
    "verify",
]
