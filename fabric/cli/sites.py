"""``fabric sites`` and ``fabric site check NAME``: list and validate site definitions.

A site definition is checked against both schemas it must satisfy: the fabric's own
(``fabric.sites.SiteConfig``) and Globus Compute 4.x's, the way ``globus-compute-endpoint start``
reads an endpoint directory: ``config.yaml`` through its own ``get_config`` (refused if it has an
``engine:``, as ``start`` refuses it), then ``user_config_template.yaml.j2`` rendered with the
submitter values ``user_config_schema.json`` validates, as a user endpoint is started, and loaded
again (it must carry the engine). The check then builds the Parsl provider and launcher
that would start each hosted model's server and renders the batch script Parsl would submit,
without submitting it, so an operator sees the exact ``#PBS``/``#SBATCH`` lines before a job
is ever queued.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric.endpoint_files import ENDPOINT_FILES, render_endpoint_files
from fabric.errors import FabricError, InvalidSiteConfig
from fabric.sites import (
    HostedModel,
    SiteConfig,
    list_sites,
    load_site,
)

SERVER_COMMAND = "$FABRIC_MODEL_SERVER_CMD"
"""Stands in for the model-server command in rendered scripts (the launcher wraps it)."""


@dataclass
class RenderedJob:
    """The batch script Parsl would write for one hosted model, and how it would submit it."""

    model: str
    script: str
    submit_command: str


@dataclass
class SiteReport:
    """What ``fabric site check`` found."""

    site: SiteConfig
    endpoint_config: str
    engine: str
    files: dict[str, str]
    """The rendered endpoint files by name (``fabric.endpoint_files.ENDPOINT_FILES``)."""
    jobs: list[RenderedJob]
    warnings: list[str]


def render_job_scripts(site: SiteConfig) -> list[RenderedJob]:
    """Render (never submit) the batch script of each hosted model's server.

    The launcher the site's deployments use builds them (``JobLauncher.from_config``, then its
    ``render``: ``submit`` up to the scheduler's command), so whatever a deployment would
    refuse (the ``jobs:`` block, or a model's plan, named in the message), the check refuses
    with the same typed error.
    """
    from fabric.endpoint.jobs import JobLauncher

    with tempfile.TemporaryDirectory(prefix="fabric-render-") as tmp:
        launcher = JobLauncher.from_config(site.jobs, Path(tmp))
        where = str(launcher.script_dir)
        return [_render_one(launcher, hosted, where) for hosted in site.models]


def _render_one(launcher: Any, hosted: HostedModel, script_dir: str) -> RenderedJob:
    plan = hosted.plan
    try:
        script, submit = launcher.render(SERVER_COMMAND, plan.ranks, plan.nodes,
                                         f"fabric-{hosted.name}")
    except FabricError as exc:
        raise type(exc)(f"models[{hosted.name}].plan (pp={plan.pp}, tp={plan.tp}, "
                        f"nodes={plan.nodes}): {exc.message}", **exc.details) from None
    return RenderedJob(hosted.name, script.replace(script_dir, "<script_dir>"),
                       submit.replace(script_dir, "<script_dir>"))


def write_endpoint_files(files: dict[str, str], folder: Path) -> list[Path]:
    """Write rendered endpoint files into an endpoint directory (made 0700, as ``configure``
    makes it); returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = []
    for name in ENDPOINT_FILES:
        (folder / name).write_text(files[name])
        out.append(folder / name)
    return out


def load_endpoint_dir(ep_dir: Path, user_opts: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """``(manager config, user endpoint config)`` of an endpoint directory, read the way
    ``globus-compute-endpoint start`` reads it (``get_config``; an ``engine:`` block in
    ``config.yaml`` refused with start's own reason) and its user endpoint is made (the
    template rendered with ``user_opts`` validated against the schema, then loaded)."""
    import os
    import pwd
    import uuid

    from globus_compute_endpoint.endpoint.config import CoreEndpointConfig
    from globus_compute_endpoint.endpoint.config.utils import (
        get_config,
        load_config_yaml,
        load_user_config_schema,
        load_user_config_template,
        render_config_user_template,
    )
    from globus_compute_endpoint.endpoint.endpoint import Endpoint
    from globus_compute_endpoint.endpoint.identity_mapper import MappedPosixIdentity

    where = f"{ep_dir} (Globus Compute's loader)"
    try:
        manager = get_config(ep_dir)
    except Exception as exc:  # the loader raises click.ClickException for every problem
        raise InvalidSiteConfig(f"{where}: config.yaml: {exc}") from None
    if not isinstance(manager, CoreEndpointConfig):
        raise InvalidSiteConfig(
            f"{where}: config.yaml contains an `engine` field; `globus-compute-endpoint "
            "start` will not start it (move the engine block to user_config_template.yaml.j2)")
    template_path = Endpoint.user_config_template_path(ep_dir, manager)
    identity = MappedPosixIdentity(local_user_record=pwd.getpwuid(os.getuid()),
                                   matched_identity=uuid.UUID(int=0),
                                   globus_identity_candidates=[])
    try:
        rendered = render_config_user_template(
            manager, load_user_config_template(template_path), template_path, identity,
            load_user_config_schema(Endpoint.user_config_schema_path(ep_dir, manager)),
            user_opts or {})
        user = load_config_yaml(rendered)
    except Exception as exc:
        raise InvalidSiteConfig(f"{where}: {template_path.name}: "
                                f"{type(exc).__name__}: {exc}") from None
    if getattr(user, "engine", None) is None:
        raise InvalidSiteConfig(f"{where}: {template_path.name} renders no engine block")
    return manager, user


def check_site(name: str, values: dict[str, str] | None = None) -> SiteReport:
    """Validate one site against both schemas and render its model-server job scripts."""
    site, files = render_endpoint_files(name, values, strict=True)
    with tempfile.TemporaryDirectory(prefix="fabric-endpoint-") as tmp:
        write_endpoint_files(files, Path(tmp))
        config, user = load_endpoint_dir(Path(tmp))
    engine = type(user.engine).__name__
    user.engine.shutdown()  # built, never started: nothing to stop but its bookkeeping
    warnings = []
    if getattr(config, "allowed_functions", None) is None and site.endpoint_id is not None:
        warnings.append("allowed_functions is unset: Globus Compute will run ANY function sent "
                        "to this endpoint; run `fabric site register-functions` and re-render")
    from fabric.wire.functions import NAMES

    missing = sorted(NAMES - set(site.function_ids))
    if site.function_ids and missing:
        warnings.append(f"function_ids lacks {missing}: allowed_functions will refuse them; "
                        "run `fabric site register-functions` again")
    if site.policy is None and site.name != "local":
        warnings.append("no policy section: every caller Globus Compute admits may use any model")
    from fabric.models_registry import site_catalog

    known = set(site_catalog(site).names())
    warnings += _unknown_policy_models(site, known)
    for hosted in site.models:
        if hosted.name not in known:
            raise InvalidSiteConfig(f"{name}: hosted model {hosted.name!r} is in no catalog")
        if hosted.plan.ranks != hosted.plan.nodes * max(1, hosted.plan.gpus_per_node) and \
                hosted.plan.gpus_per_node:
            warnings.append(f"{hosted.name}: pp x tp = {hosted.plan.ranks} ranks but the job asks "
                            f"for {hosted.plan.nodes} nodes x {hosted.plan.gpus_per_node} GPUs")
        if hosted.plan.device == "xpu":
            warnings.append(f"{hosted.name}: device xpu is NOT yet supported by the fabric engine")
    jobs = render_job_scripts(site)
    return SiteReport(site, files["config.yaml"], engine, files, jobs, warnings)


def _unknown_policy_models(site: SiteConfig, known: set[str]) -> list[str]:
    """A warning per ``policy.models`` key that names no catalog model: its callers fall to
    ``policy.default`` (which denies by default). A warning, not an error: a model the operator
    registers later with ``fabric models add`` lives in the state dir, and a rule written for it
    ahead of time is right."""
    import difflib

    out = []
    for key in sorted(set(site.policy.models if site.policy else {}) - known):
        near = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        out.append(f"policy.models.{key} names no catalog model{hint}: its callers get "
                   "policy.default instead")
    return out


def _parse_sets(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidSiteConfig(f"--set expects name=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def cmd_sites(args: argparse.Namespace) -> int:
    """Print one line per shipped site definition."""
    for name in list_sites():
        try:
            site = load_site(name)
        except InvalidSiteConfig as exc:
            print(f"{name:<15} INVALID: {exc}")
            continue
        scheduler = site.jobs.provider.type.replace("Provider", "")
        models = ", ".join(f"{m.name}(pp{m.plan.pp}xtp{m.plan.tp})" for m in site.models)
        ep = site.endpoint_id or "-"
        print(f"{name:<15} {scheduler:<7} endpoint={ep:<36}  {site.description}")
        print(f"{'':<15} models: {models or '-'}")
    return 0


def cmd_site_check(args: argparse.Namespace) -> int:
    """Validate a site, print its rendered job scripts, optionally write the endpoint config."""
    report = check_site(args.name, _parse_sets(args.set))
    site = report.site
    print(f"site {site.name}: fabric.yaml OK; config.yaml OK (Globus Compute loader, as "
          f"`start` reads it); user_config_template.yaml.j2 OK (engine {report.engine})")
    for job in report.jobs:
        print(f"\n--- model server job for {job.model} ---")
        if job.submit_command:
            print(f"# submit: {job.submit_command}")
        print(job.script.rstrip())
    for warning in report.warnings:
        print(f"WARNING: {warning}")
    if args.write:
        for path in write_endpoint_files(report.files, Path(args.write).expanduser()):
            print(f"wrote {path}")
    return 0


def cmd_register_functions(args: argparse.Namespace) -> int:
    """Register the fabric's endpoint functions with Globus Compute (operator, once)."""
    import yaml
    from globus_compute_sdk import Client, Executor

    from fabric.globus.auth import make_app
    from fabric.globus.transport import register_functions

    site = load_site(args.name, _parse_sets(args.set))
    # Registration needs no endpoint: only the login and the web service.
    executor = Executor(client=Client(app=make_app([site]), do_version_check=False))
    try:
        ids = register_functions(site, executor, public=not args.private)
    finally:
        executor.shutdown(wait=False)
    print("# paste into the site's fabric.yaml, then re-render config.yaml with "
          "`fabric site check --write`")
    print(yaml.safe_dump({"function_ids": ids}, sort_keys=True).rstrip())
    return 0


def register(subparsers: Any) -> None:
    """Add ``sites`` and ``site check`` to the ``fabric`` CLI (argparse sub-parsers).

    Each command sets ``func`` (``func(args) -> int``, the exit status).
    """
    p = subparsers.add_parser("sites", help="list the site definitions in endpoints/")
    p.set_defaults(func=cmd_sites)
    site = subparsers.add_parser("site", help="site definition tools")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    check = site_sub.add_parser("check", help="validate a site and render its job scripts")
    check.add_argument("name", help="site name (endpoints/<name>) or folder")
    check.add_argument("--set", action="append", metavar="NAME=VALUE",
                       help="template value (repeatable), e.g. --set account=myproject")
    check.add_argument("--write", metavar="DIR",
                       help="write the rendered endpoint files (config.yaml, "
                       "user_config_template.yaml.j2, user_config_schema.json) into this "
                       "endpoint directory")
    check.set_defaults(func=cmd_site_check)
    reg = site_sub.add_parser(
        "register-functions",
        help="register the fabric's endpoint functions with Globus Compute; prints function_ids")
    reg.add_argument("name", help="site name (endpoints/<name>) or folder")
    reg.add_argument("--set", action="append", metavar="NAME=VALUE", help="template value")
    reg.add_argument("--private", action="store_true",
                     help="register privately (only you can run them) instead of publicly")
    reg.set_defaults(func=cmd_register_functions)
