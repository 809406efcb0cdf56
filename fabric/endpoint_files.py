"""A site as the files Globus Compute 4.x starts: ``fabric site check NAME --write DIR``.

An endpoint is the endpoint manager's ``config.yaml`` (no engine: 4.x refuses one there), the
user-endpoint template ``user_config_template.yaml.j2`` (engine, provider, worker_init) and the
JSON schema of the values a submitter may pass to that template. This module renders the three
from a site definition (``fabric.sites``); the CLI writes and checks them with
globus-compute-endpoint's own loaders.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fabric.errors import InvalidSiteConfig
from fabric.site_values import SAFE_VALUE, render
from fabric.sites import SiteConfig, load_site, site_dir


def allowed_serializers(site: SiteConfig) -> list[str]:
    """What the endpoint's workers may deserialise: the fabric's functions by reference
    (``DillCode``; ``allowed_functions`` says which) and plain JSON data (``JSONData``: all the
    fabric's own functions take, ``run_user_function`` too: the caller's code arrives as a
    string that only the user function's own process unpickles). No pickled data, whatever
    ``site.allow_user_functions`` says: no caller's pickle is opened by a worker."""
    del site  # the same for every site since user functions run in a process of their own
    return [f"globus_compute_sdk.serialize.{n}" for n in ("DillCode", "JSONData")]


ENDPOINT_FILES = ("config.yaml", "user_config_template.yaml.j2", "user_config_schema.json")
"""What ``fabric site check --write DIR`` writes: the endpoint manager's config (no engine:
Globus Compute 4.x refuses one there), the user-endpoint template (engine, provider,
worker_init) and the JSON schema of the values a submitter may pass to that template."""


def user_config_schema(site: SiteConfig) -> dict[str, Any]:
    """JSON schema for ``user_endpoint_config`` values sent with a task (Globus Compute
    validates them before it renders ``user_config_template.yaml.j2``). A submitter may only
    ask for fewer or more request workers in *their* user endpoint, up to the site's
    ``max_request_workers``; nothing a caller passes reaches a shell line or a provider."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "request_workers": {
                "type": "integer", "minimum": 1, "maximum": site.max_request_workers,
                "description": "request workers of this user endpoint"},
        },
        "additionalProperties": False,
    }


def allowed_function_ids(site: SiteConfig) -> list[str]:
    """The registered ids of the fabric's endpoint functions (``fabric.wire.functions``'
    one list), the site's ``allowed_functions``. An id under a name that list does not know
    is an error: the allow-list and the functions the policy knows come from one place."""
    from fabric.wire.functions import NAMES

    unknown = sorted(set(site.function_ids) - NAMES)
    if unknown:
        raise InvalidSiteConfig(f"function_ids names {unknown}: not fabric endpoint functions "
                                f"(known: {sorted(NAMES)}); re-run register-functions")
    return sorted(site.function_ids.values())


def safe_site_dir(folder: Path) -> str:
    """The absolute site folder as ``{{ site_dir }}`` carries it, or ``InvalidSiteConfig``:
    the templates export it in a shell line (``FABRIC_SITE=...``) inside a YAML string that
    Globus Compute renders with Jinja, so a space, quote, ``$`` or brace would break one of the
    three; refused rather than quoted for all three at once."""
    path = str(folder.resolve())
    if not re.fullmatch(SAFE_VALUE, path):
        bad = sorted({c for c in path if not re.fullmatch(SAFE_VALUE, c)})
        raise InvalidSiteConfig(
            f"site folder {path!r} has characters {bad} its endpoint files cannot carry "
            "(worker_init exports it as FABRIC_SITE); copy or move it to a path of letters, "
            "digits and _.:/@+- only", path=path, accepted=SAFE_VALUE)
    return path


def render_endpoint_files(
    name_or_path: str | Path, values: dict[str, str] | None = None, *, strict: bool = True
) -> tuple[SiteConfig, dict[str, str]]:
    """The site and its endpoint files (``ENDPOINT_FILES``), template values filled in.

    Besides the declared values, ``{{ allowed_functions }}`` becomes the JSON list of the
    registered fabric function UUIDs (``allowed_function_ids``), or ``null`` while none are
    registered (Globus Compute then allows any function: ``fabric site check`` warns about
    it), ``{{ allowed_serializers }}`` the engine's deserializer allow-list
    (``allowed_serializers``), ``{{ max_request_workers }}`` the site's request workers and
    ``{{ site_dir }}`` the absolute folder of the definition (workers find it via
    FABRIC_SITE). Only bare ``{{ name }}`` placeholders are the fabric's: Jinja expressions
    with a filter (``{{ request_workers | default(4) }}``) are left for Globus Compute, which
    fills them from the submitter's ``user_endpoint_config`` when it starts a user endpoint.
    """
    site = load_site(name_or_path, values, strict=strict)
    folder = site_dir(name_or_path)
    ids = allowed_function_ids(site)
    builtins = {"allowed_functions": json.dumps(ids) if ids else "null",
                "allowed_serializers": json.dumps(allowed_serializers(site)),
                "max_request_workers": str(site.max_request_workers),
                "site_dir": safe_site_dir(folder)}
    out = {}
    for name in ENDPOINT_FILES[:2]:
        file = folder / name
        if not file.exists():
            raise InvalidSiteConfig(f"{file} is missing: every site needs its endpoint "
                                    f"files {list(ENDPOINT_FILES[:2])}")
        out[name] = render(file.read_text(), {**site._values, **builtins}, str(file))
    out[ENDPOINT_FILES[2]] = json.dumps(user_config_schema(site), indent=2) + "\n"
    return site, out


def render_endpoint_config(
    name_or_path: str | Path, values: dict[str, str] | None = None, *, strict: bool = True
) -> tuple[SiteConfig, str]:
    """The site and its rendered ``config.yaml`` (``render_endpoint_files``)."""
    site, files = render_endpoint_files(name_or_path, values, strict=strict)
    return site, files["config.yaml"]
