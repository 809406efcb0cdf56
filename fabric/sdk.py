"""The SDK as users hold it: ``fabric.Fabric`` is the client plus the campaign entry point.

The client (``fabric.client.fabric.Fabric``) sits below campaigns: a campaign runs its shards
through client transports, so the client itself never imports ``fabric.campaign``
(``tests/test_layering.py``). The one method that reaches up, ``campaign``, is added here, in
the composition root of the SDK.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fabric.client import fabric as client

__all__ = ["Fabric"]


class Fabric(client.Fabric):
    """A connection to one site of the inference fabric (see ``fabric.client.fabric.Fabric``),
    which can also start batch campaigns."""

    def campaign(self, manifest: Any, *, run: Literal["here", "site"] = "here",
                 home: Path | None = None, schedule: dict[str, str] | None = None) -> Any:
        """Start a batch campaign (see docs/campaigns.md); returns a ``Campaign`` with
        ``.status()``, ``.wait()``, ``.results()`` and ``.cancel()``."""
        from fabric.campaign.api import campaign

        return campaign(self, manifest, run=run, home=home, schedule=schedule)
