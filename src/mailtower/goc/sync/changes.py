"""What an ensure or re-point step did: empty when the sync objects were already right."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Changes:
    """The actions taken on ``server`` (a label: ``goc``, ``tower-a``…), in order."""

    server: str
    actions: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.actions)

    def did(self, action: str) -> None:
        log.info("event=sync_change server=%s action=%s", self.server, action)
        self.actions.append(action)

    def __str__(self) -> str:
        if not self.actions:
            return f"{self.server}: no change"
        return "\n".join(f"{self.server}: {a}" for a in self.actions)
