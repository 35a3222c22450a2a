"""The ``mlops`` command (installed by ``uv sync``; also ``python -m mlops.cli``).

Every command works on one ``MLOPS_HOME`` (``--home``, else ``$MLOPS_HOME``, else ``./.mlops``) and
calls the same core functions and Dagster definitions as the assets, so the CLI can never do a
thing differently from the platform acting on its own.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

import click

from mlops.core.names import CHALLENGER, CHAMPION, registered_model_name


def _quiet_libraries() -> None:
    # Beta/preview notices of the pinned libraries are for their developers, not for operators.
    from dagster import BetaWarning, PreviewWarning

    warnings.filterwarnings("ignore", category=BetaWarning)
    warnings.filterwarnings("ignore", category=PreviewWarning)
    logging.getLogger("mlflow").setLevel(logging.ERROR)


def _resources(home: str | None) -> dict:
    _quiet_libraries()
    from definitions import build_definitions

    return build_definitions(home).resources


def _known_tenant(resources: dict, tenant: str) -> None:
    from resources.tenants import UnknownTenantError

    try:
        resources["catalog"].get(tenant)
    except UnknownTenantError as exc:
        raise click.BadParameter(str(exc), param_hint="TENANT") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--home", envvar="MLOPS_HOME", type=click.Path(file_okay=False),
              help="The platform's state directory (default: $MLOPS_HOME, else ./.mlops).")
@click.pass_context
def main(ctx: click.Context, home: str | None) -> None:
    """The SaaS MLOps platform: build, serve, monitor, retrain and promote per tenant."""
    ctx.obj = home


@main.command()
@click.option("--tenant", "tenants", multiple=True, help="Only this tenant (repeatable). Default: every tenant.")
@click.option("--use-case", "use_cases", multiple=True,
              help="Only this use case (repeatable; see `mlops usecase list`). Default: churn and every declared one.")
@click.pass_obj
def build(home: str | None, tenants: tuple[str, ...], use_cases: tuple[str, ...]) -> None:
    """Data, features and a validated champion for every tenant and use case (their pipeline jobs)."""
    _quiet_libraries()
    from dagster import DagsterInstance

    from definitions import build_definitions

    defs = build_definitions(home)
    settings, catalog, registry = (defs.resources[k] for k in ("settings", "catalog", "registry"))
    settings.ensure_home()
    registry.ensure_experiment()
    names = list(tenants) or sorted(catalog.all())
    for name in names:
        _known_tenant(defs.resources, name)
    declared = _usecase_names(defs)
    unknown = [u for u in use_cases if u not in declared]
    if unknown:
        raise click.BadParameter(f"no use case {unknown[0]!r}: declared are {declared}", param_hint="--use-case")
    failures = []
    with DagsterInstance.from_config(str(settings.dagster_home)) as instance:
        existing = set(instance.get_dynamic_partitions("tenant"))
        instance.add_dynamic_partitions("tenant", [n for n in names if n not in existing])
        for use_case in use_cases or declared:
            job = defs.resolve_job_def(f"{use_case}_pipeline")
            for name in names:
                start = time.perf_counter()
                result = job.execute_in_process(
                    instance=instance, partition_key=name, raise_on_error=False,
                    run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                )
                status = "ok" if result.success else "FAILED"
                click.echo(f"[{name}] {job.name} {status} in {time.perf_counter() - start:.1f}s (run {result.run_id})")
                if not result.success:
                    failures.append(f"{use_case}/{name}")
                    for event in result.all_events:
                        if event.is_failure:
                            click.echo(f"  {event.step_key}: {event.message}")
    click.echo("\nModels in the MLflow registry (aliases):")
    for use_case in use_cases or declared:
        for name in names:
            champion = registry.alias_version(name, CHAMPION, use_case=use_case)
            challenger = registry.alias_version(name, CHALLENGER, use_case=use_case)
            click.echo(f"  {registered_model_name(name, use_case)}: champion={champion.version if champion else '-'} "
                       f"challenger={challenger.version if challenger else '-'}")
    click.echo(f"\nState:   {settings.root}")
    click.echo("UI:      mlops ui   -> http://127.0.0.1:3000 (asset graph, checks, runs)")
    click.echo(f"MLflow:  .venv/bin/mlflow ui --backend-store-uri {settings.mlflow_tracking_uri} --port 5000")
    if failures:
        raise SystemExit(1)


def _job_names(defs) -> list[str]:
    return [job.name for job in defs.resolve_all_job_defs()]


def _usecase_names(defs) -> list[str]:
    """churn first, then the declared use cases, by name (each has a ``<name>_pipeline`` job)."""
    names = sorted(name.removesuffix("_pipeline") for name in _job_names(defs) if name.endswith("_pipeline"))
    return sorted(names, key=lambda n: n != "churn")


@main.group()
def usecase() -> None:
    """Declared use cases (``usecases/<name>/usecase.yaml``; more roots in $MLOPS_USECASE_PATHS)."""


@usecase.command("list")
def usecase_list() -> None:
    """Every declared use case, with its problem type and entity (churn is built in)."""
    from mlops.core.usecase import UseCaseError, discover_usecases, usecase_roots

    click.echo("churn      binary      account  (built in)")
    try:
        found = discover_usecases(usecase_roots())
    except UseCaseError as exc:
        raise click.ClickException(str(exc)) from None
    for name, uc in sorted(found.items()):
        click.echo(f"{name:10s} {uc.problem_type:11s} {uc.entity.name:8s} {uc.folder}")


@usecase.command("check")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
def usecase_check(folder: str) -> None:
    """Read and check the use case declared in FOLDER; every problem names its file and field."""
    from mlops.core.usecase import UseCaseError, load_usecase

    try:
        uc = load_usecase(folder)
    except UseCaseError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{uc.name}: {uc.title} ({uc.problem_type}, entity {uc.entity.name} by {uc.entity.key}); "
               f"{len(uc.tables)} tables, {len(uc.features.columns)} features, label {uc.label.column} "
               f"after {uc.label.horizon_days} days")


@main.command()
@click.option("--headless", is_flag=True, help="No web UI; exit with the timeline (non-zero if the loop did not close).")
@click.option("--small", is_flag=True, help="Two small tenants (tests, CI).")
@click.option("--reset", is_flag=True, help="Delete MLOPS_HOME first (the demo starts from an empty home).")
@click.option("--max-days", type=click.IntRange(1, 120), default=120, show_default=True,
              help="Give up after this many simulated days (the simulated world's labels end after 120).")
@click.option("--until", "until", type=click.Choice(["restored", "promoted"]), default="restored", show_default=True,
              help="Stop once realized performance is back above the floor, or the day after the first promotion.")
@click.option("--service-port", type=click.IntRange(1, 65535), default=3001, show_default=True)
@click.option("--ui-port", type=click.IntRange(1, 65535), default=3000, show_default=True)
@click.option("--use-cases", "use_cases", default=None,
              help="Comma-separated use cases to build and replay: churn, fraud  [default: both]")
@click.option("--seed", type=int, default=None,
              help="The seed of the drifted tenant's world (acme)  [default: 101]")
@click.pass_obj
def demo(home: str | None, headless: bool, small: bool, reset: bool, max_days: int, until: str, service_port: int,
         ui_port: int, use_cases: str | None, seed: int | None) -> None:
    """The closed loop: build, start Dagster and the service, replay days with concept drift for one
    tenant until the platform has retrained, promoted and restored performance on its own, for
    every use case (churn and payment fraud)."""
    from mlops.demo import DEFAULT_USE_CASES, DEMO_USE_CASES, ClosedLoopDemo, prepare_home
    from mlops.process_guard import exit_without_teardown

    names = DEFAULT_USE_CASES if use_cases is None else tuple(
        dict.fromkeys(n.strip() for n in use_cases.split(",") if n.strip()))
    unknown = [n for n in names if n not in DEMO_USE_CASES]
    if not names or unknown:
        raise click.BadParameter(f"{', '.join(unknown) or 'none given'}: the demo replays "
                                 f"{', '.join(DEMO_USE_CASES)}", param_hint="--use-cases")
    _quiet_libraries()
    prepare_home(home, reset=reset)
    code = ClosedLoopDemo(home, headless=headless, small=small, max_days=max_days, service_port=service_port,
                          ui_port=ui_port, until_restored=until == "restored", use_cases=names, seed=seed).run()
    exit_without_teardown(code)  # everything it started is stopped and its files written


@main.command("add-tenant")
@click.argument("name")
@click.option("--region", default="eu", show_default=True)
@click.option("--accounts", type=int, default=1000, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--days", type=int, default=180, show_default=True)
@click.option("--scenario", default="none", show_default=True)
@click.option("--drift-day", type=int, default=None)
@click.pass_obj
def add_tenant(home: str | None, name: str, region: str, accounts: int, seed: int, days: int, scenario: str,
               drift_day: int | None) -> None:
    """Register a new tenant (its partition appears when the tenant sensor next runs)."""
    from resources.tenants import TenantSpec

    try:
        spec = TenantSpec(name=name, region=region, n_accounts=accounts, seed=seed, days=days, scenario=scenario,
                          drift_day=drift_day)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    r = _resources(home)
    r["settings"].ensure_home()
    r["catalog"].add(spec)
    click.echo(f"added tenant {spec.name} ({spec.region}); build it with: mlops build --tenant {spec.name}")


@main.command()
@click.pass_obj
def init(home: str | None) -> None:
    """Create MLOPS_HOME and the Dagster instance config."""
    root = _resources(home)["settings"].ensure_home()
    click.echo(f"MLOPS_HOME ready at {root}")


@main.command("verify-audit")
@click.argument("tenant")
@click.pass_obj
def verify_audit(home: str | None, tenant: str) -> None:
    """Check the tenant's audit log hash chain."""
    from mlops.core import audit
    from resources.warehouse import WarehouseBusyError

    r = _resources(home)
    _known_tenant(r, tenant)
    try:
        with r["warehouse"].connect(tenant, read_only=True) as con:
            report = audit.verify_chain(con)
    except (WarehouseBusyError, FileNotFoundError) as exc:  # a writer holds it past the wait; never built
        raise click.ClickException(f"cannot verify the audit log of {tenant}: {exc}") from None
    if not report.ok:
        click.echo(f"audit log of {tenant}: chain broken at entry {report.first_bad_seq}", err=True)
        raise SystemExit(1)
    click.echo(f"audit log of {tenant}: {report.entries} entries, chain intact")


@main.group("loop")
def loop_group() -> None:
    """Decay episodes of the closed loop: what it did, and closing an escalated one."""


@loop_group.command("status")
@click.argument("tenant")
@click.option("--use-case", default="churn", show_default=True)
@click.pass_obj
def loop_status(home: str | None, tenant: str, use_case: str) -> None:
    """The tenant's decay episodes of USE_CASE: status, floor, retrains, promotions, time to restore."""
    import pandas as pd

    from mlops.core import loop

    r = _resources(home)
    _known_tenant(r, tenant)
    with r["warehouse"].connect(tenant) as con:
        kpis = loop.episode_kpis(loop.episodes(con, use_case))
        active = loop.active_episode(con, use_case)
    if not kpis:
        click.echo(f"{tenant}/{use_case}: no decay episode")
        return
    click.echo(pd.DataFrame(kpis).to_string(index=False))
    if active is not None and active.status == loop.ESCALATED:
        click.echo(f"\nepisode {active.episode} was escalated on {active.escalated_at.date()}: "
                   f"{active.evidence}\nclose it with: mlops loop close {tenant} --use-case {use_case} --note '...'")


@loop_group.command("close")
@click.argument("tenant")
@click.option("--use-case", default="churn", show_default=True)
@click.option("--note", required=True, help="What the person decided (kept in the episode and the audit log).")
@click.option("--actor", default="operator", show_default=True)
@click.pass_obj
def loop_close(home: str | None, tenant: str, use_case: str, note: str, actor: str) -> None:
    """Close the tenant's active decay episode of USE_CASE (an escalated one, once a person has looked):
    the next decay alert opens a new episode, with its own retrains."""
    import pandas as pd

    from mlops.core import loop

    r = _resources(home)
    _known_tenant(r, tenant)
    with r["warehouse"].transaction(tenant) as con:
        episode = loop.close_episode(con, use_case, now=pd.Timestamp.now().normalize(), note=note)
    if episode is None:
        raise click.ClickException(f"{tenant}/{use_case} has no open or escalated decay episode")
    r["warehouse"].audit(tenant, actor=actor, action="loop_episode_closed", subject=f"{use_case}/{tenant}",
                         outcome="closed", details={"episode": episode.episode, "note": note})
    click.echo(f"{tenant}/{use_case}: episode {episode.episode} closed")


@main.group("api-key")
def api_key() -> None:
    """Service API keys (stored salted and hashed)."""


@api_key.command("create")
@click.argument("tenant")
@click.pass_obj
def api_key_create(home: str | None, tenant: str) -> None:
    """Create a key for TENANT and print it (shown once)."""
    from mlops.core.serving import ApiKeyStore, serving_dir

    r = _resources(home)
    _known_tenant(r, tenant)
    store = ApiKeyStore(serving_dir(r["settings"].root))
    store.path.parent.mkdir(parents=True, exist_ok=True)
    click.echo(store.create(tenant))


@api_key.command("revoke")
@click.argument("key_id")
@click.pass_obj
def api_key_revoke(home: str | None, key_id: str) -> None:
    """Revoke a key by its id (mlk_<id>_...); the service refuses it within a second."""
    from mlops.core.serving import ApiKeyStore, serving_dir

    store = ApiKeyStore(serving_dir(_resources(home)["settings"].root))
    try:
        store.revoke(key_id)
    except KeyError as exc:
        raise click.BadParameter(str(exc), param_hint="KEY_ID") from None
    click.echo(f"revoked key {key_id}")


def _deployment_command(action: str, who: str):
    """A command that changes what serves for TENANT, recorded in the audit log with who and why."""
    def decorate(fn):
        fn = click.pass_obj(fn)
        fn = click.option("--actor", default=lambda: os.environ.get("USER", "operator"), show_default="$USER",
                          help=f"Who {who} (recorded in the audit log).")(fn)
        fn = click.option("--reason", default=f"manual {action}", show_default=True,
                          help="Recorded in the audit log.")(fn)
        return main.command()(click.argument("tenant")(fn))
    return decorate


@_deployment_command("promotion", "promotes")
def promote(home: str | None, tenant: str, reason: str, actor: str) -> None:
    """Move TENANT's champion alias to its challenger and republish; the service swaps within a second."""
    from mlops.core.deployment import (
        DeploymentMismatchError,
        NothingToDeployError,
        RegistryUnavailableError,
        promote_challenger,
    )

    r = _resources(home)
    _known_tenant(r, tenant)
    try:
        previous = r["registry"].alias_version(tenant, CHAMPION)
        entry = promote_challenger(tenant, r["registry"], r["feature_store"], r["settings"], r["warehouse"],
                                   reason=reason, actor=actor)
    except (NothingToDeployError, RegistryUnavailableError, DeploymentMismatchError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{tenant}: champion is now v{entry['champion']['version']}")
    _alert_deployment(r, "promotion", tenant, previous.version if previous else None, entry["champion"]["version"],
                      reason, actor)


@_deployment_command("rollback", "rolls back")
def rollback(home: str | None, tenant: str, reason: str, actor: str) -> None:
    """Serve TENANT's previous champion again (manifest and registry alias)."""
    from mlops.core.deployment import DeploymentMismatchError, RegistryUnavailableError, rollback_champion
    from mlops.core.serving import NoPreviousChampionError, NotDeployedError

    r = _resources(home)
    _known_tenant(r, tenant)
    try:
        current, previous = rollback_champion(tenant, r["registry"], r["settings"], r["warehouse"], reason=reason,
                                              actor=actor)
    except (NotDeployedError, NoPreviousChampionError, RegistryUnavailableError, DeploymentMismatchError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{tenant}: champion rolled back from v{current} to v{previous}")
    _alert_deployment(r, "rollback", tenant, current, previous, reason, actor)


def _alert_deployment(r: dict, action: str, tenant: str, from_version, to_version, reason: str, actor: str) -> None:
    """Tell the alert webhook (if one is configured) about a manual promotion or rollback. The
    change is done whatever the webhook says; an alert it did not take is retried by the sensors."""
    import uuid

    from mlops.core.alerts import deployment_event

    alerts = r["alerts"]
    if not alerts.enabled:
        return
    event = deployment_event(action, tenant, registered_model_name(tenant), from_version and str(from_version),
                             str(to_version), reason, actor, event_id=f"{action}:{tenant}:cli:{uuid.uuid4().hex}",
                             ui_base_url=alerts.ui_base_url)
    delivery = alerts.notifier().notify([event])
    if delivery.pending or delivery.abandoned:
        click.echo(f"warning: {action} alert not delivered yet ({delivery.summary()})", err=True)


@main.command("env")
@click.pass_obj
def env(home: str | None) -> None:
    """Print the variables that point a library's own CLI at this home with telemetry off:
    ``env $(mlops env) bentoml build ...``."""
    from mlops.core.environment import platform_variables

    click.echo(" ".join(f"{k}={v}" for k, v in platform_variables(home).items()))


def _exec(argv: list[str], home: str | None) -> None:
    """Replace this process by a server of the platform, with the home and telemetry settings set."""
    from mlops.core.environment import PROJECT_ROOT, configure_environment

    configure_environment(home)  # MLOPS_HOME, DAGSTER_HOME, BENTOML_HOME, telemetry off
    os.chdir(PROJECT_ROOT)
    os.execv(argv[0], argv)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=3000, show_default=True)
@click.pass_obj
def ui(home: str | None, host: str, port: int) -> None:
    """The Dagster web UI and daemon (asset graph, checks, runs, sensors)."""
    root = _resources(home)["settings"].ensure_home()
    click.echo(f"MLOPS_HOME {root}: Dagster UI on http://{host}:{port}")
    _exec([os.path.join(os.path.dirname(sys.executable), "dagster"), "dev", "-w", "workspace.yaml", "-h", host,
           "-p", str(port)], home)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=3001, show_default=True)
@click.pass_obj
def serve(home: str | None, host: str, port: int) -> None:
    """The BentoML prediction service for every deployed tenant (OpenAPI docs at its root)."""
    _exec([sys.executable, "-m", "bentoml", "serve", "bentos.service:ChurnService", "--host", host,
           "--port", str(port)], home)


if __name__ == "__main__":
    main()
