"""One exception root: every public error mailtower raises derives from MailtowerError and lives
in its package's errors module, and no two public errors share a name."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections import defaultdict

import mailtower
from mailtower.errors import MailtowerError

ERROR_MODULES = ("errors", "exceptions", "_errors")


def _modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(mailtower.__path__, "mailtower."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # entry points: importing one parses no arguments, but runs nothing new
        names.append(info.name)
    return names


def _public_errors() -> dict[str, list[type[BaseException]]]:
    found: dict[str, list[type[BaseException]]] = defaultdict(list)
    for name in _modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attr.startswith("_")
            ):
                found[attr].append(value)
    return found


def test_every_public_error_derives_from_the_root_and_lives_in_an_errors_module() -> None:
    wrong = []
    for name, classes in _public_errors().items():
        for cls in classes:
            private_module = any(part.startswith("_") for part in cls.__module__.split(".")[1:-1])
            leaf = cls.__module__.rsplit(".", 1)[-1]
            if leaf.startswith("_") and leaf not in ERROR_MODULES:
                continue  # a private module's own control-flow signal (caught where raised)
            if private_module:
                continue
            if not issubclass(cls, MailtowerError) or leaf not in ERROR_MODULES:
                wrong.append(f"{cls.__module__}.{name}")
    assert sorted(wrong) == [], "errors outside the hierarchy or outside an errors module"


def test_no_two_public_errors_share_a_name() -> None:
    assert {n: c for n, c in _public_errors().items() if len(c) > 1} == {}


def test_no_two_classes_of_one_name_anywhere_in_the_package() -> None:
    """One name, one meaning: a reader meeting ``Window`` or ``Change`` knows which one."""
    seen: dict[str, set[str]] = defaultdict(set)
    for name in _modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if inspect.isclass(value) and value.__module__ == name and attr == value.__name__:
                seen[attr].add(name)
    assert {n: sorted(m) for n, m in seen.items() if len(m) > 1} == {}
