"""Template values of a site definition: what an operator fills in (``{{ name }}`` in
``fabric.yaml`` and the endpoint files), from ``--set`` or the site's ``values.yaml``.

Every value is checked before it is substituted (``TemplateVar.pattern`` or ``choices``), so no
site file reaches a YAML parser, a Jinja template or a batch script with an unchecked string.
``fabric.sites.load_site`` reads, checks and renders; ``fabric.endpoint_files`` renders the
endpoint files with the same ``render``.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from fabric.errors import InvalidSiteConfig

__all__ = ["SAFE_VALUE", "TEMPLATE", "TemplateVar", "render", "resolve_values", "values_file"]

SAFE_VALUE = r"^[A-Za-z0-9_.:/@+-]+$"
"""Characters a value substituted into site files may hold (template values, the site
folder): none a YAML scalar, a Jinja template or a shell line would read as syntax."""


class TemplateVar(BaseModel):
    """A value the operator fills in (``{{ name }}`` in ``fabric.yaml`` and ``config.yaml``).

    Values are validated before substitution, so a site file never reaches a YAML parser or a
    batch script with an unchecked string in it (the pattern forbids quotes, spaces and ``$``).
    """

    model_config = ConfigDict(extra="forbid")
    description: str = ""
    required: bool = True
    """A required value without a default must be given (``--set name=value`` or values.yaml)."""
    default: str | None = None
    pattern: str = SAFE_VALUE
    """Regular expression the whole value must match."""
    choices: list[str] = Field(default_factory=list)
    """If not empty, the value must be one of these."""


def resolve_values(declared: dict[str, TemplateVar], given: dict[str, str], *, strict: bool,
                   where: str = "site") -> dict[str, str]:
    """Validate ``given`` against the declared variables and fill defaults.

    Unknown names, values that fail a pattern or choice list, and (with ``strict``) missing
    required values raise ``InvalidSiteConfig`` naming every problem at once.
    """
    problems = [f"unknown template value {k!r} (declared: {sorted(declared)})"
                for k in given if k not in declared]
    out: dict[str, str] = {}
    for name, var in declared.items():
        value = given.get(name, var.default)
        if value is None:
            if var.required and strict:
                problems.append(f"{name!r} is required: {var.description or 'no description'}"
                                f" (give --set {name}=...)")
            out[name] = f"UNSET-{name}" if var.required else ""
            continue
        problems += _value_problems(name, var, str(value))
        out[name] = str(value)
    if problems:
        raise InvalidSiteConfig(f"{where}: " + "; ".join(problems), problems=problems)
    return out


def _value_problems(name: str, var: TemplateVar, value: str) -> list[str]:
    """What is wrong with ``value`` for ``var`` (an empty list when nothing)."""
    accepted = f"one of {var.choices}" if var.choices else f"matching {var.pattern}"
    if (value in var.choices) if var.choices else re.fullmatch(var.pattern, value):
        return []
    if value == "":
        return [f"{name!r} is empty: give a value {accepted}"]
    if var.choices:
        return [f"{name}={value!r} is not one of {var.choices}"]
    return [f"{name}={value!r} does not match {var.pattern}"]


TEMPLATE = TypeAdapter(dict[str, TemplateVar])
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def render(text: str, values: dict[str, str], where: str = "site") -> str:
    """Substitute ``{{ name }}`` placeholders; a placeholder with no value is an error."""
    unknown = sorted({m for m in _PLACEHOLDER.findall(text) if m not in values})
    if unknown:
        raise InvalidSiteConfig(f"{where}: template uses undeclared values {unknown}; "
                                "declare them under `template:` in fabric.yaml")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def values_file(folder: Path) -> dict[str, str]:
    """The operator's ``values.yaml`` (site-local, not shipped), if present, as the strings
    written there: YAML's BaseLoader types nothing, so ``account: 0123`` stays ``0123`` (not
    octal 83), ``1_000`` stays ``1_000`` and an empty value is ``""`` (refused as empty by
    ``resolve_values``), not ``None``."""
    file = folder / "values.yaml"
    if not file.exists():
        return {}
    try:
        data = yaml.load(file.read_text(), Loader=yaml.BaseLoader) or {}
    except yaml.YAMLError as exc:
        raise InvalidSiteConfig(f"{file}: {exc}", path=str(file)) from None
    if not isinstance(data, dict):
        raise InvalidSiteConfig(f"{file}: expected a mapping of name: value", path=str(file))
    nested = sorted(k for k, v in data.items() if not isinstance(v, str))
    if nested:
        raise InvalidSiteConfig(f"{file}: {nested} must be single values (a string, number "
                                "or name), not lists or mappings", path=str(file), keys=nested)
    return dict(data)
