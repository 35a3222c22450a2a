"""Command-line entry points: ``python -m resources.cli <command>``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings


def _defs(home: str | None):
    from definitions import build_definitions

    return build_definitions(home)


def run_pipeline(home: str | None = None, tenants: list[str] | None = None) -> int:
    """Materialize the churn pipeline for every tenant (or the given ones) into a real instance."""
    from dagster import DagsterInstance

    defs = _defs(home)
    settings, catalog, registry = (defs.resources[k] for k in ("settings", "catalog", "registry"))
    settings.ensure_home()
    registry.ensure_experiment()
    names = tenants or sorted(catalog.all())
    for name in names:
        catalog.get(name)  # unknown tenants fail here, with the list of known ones
    job = defs.resolve_job_def("churn_pipeline")
    failures = []
    with DagsterInstance.get() as instance:
        existing = set(instance.get_dynamic_partitions("tenant"))
        instance.add_dynamic_partitions("tenant", [n for n in names if n not in existing])
        for name in names:
            start = time.perf_counter()
            result = job.execute_in_process(
                instance=instance, partition_key=name, raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            )
            status = "ok" if result.success else "FAILED"
            print(f"[{name}] churn_pipeline {status} in {time.perf_counter() - start:.1f}s (run {result.run_id})")
            if not result.success:
                failures.append(name)
                for event in result.all_events:
                    if event.is_failure:
                        print(f"  {event.step_key}: {event.message}")
    print("\nModels in the MLflow registry (aliases):")
    for name in names:
        champion = registry.alias_version(name, "champion")
        challenger = registry.alias_version(name, "challenger")
        print(f"  churn-{name}: champion={str(champion.version) if champion else '-'} "
              f"challenger={challenger.version if challenger else '-'}")
    print(f"\nState:   {settings.root}")
    print("UI:      make ui   -> http://127.0.0.1:3000 (asset graph, checks, runs)")
    print(f"MLflow:  .venv/bin/mlflow ui --backend-store-uri {settings.mlflow_tracking_uri} --port 5000")
    return 1 if failures else 0


def add_tenant(args) -> int:
    from resources.tenants import TenantSpec

    defs = _defs(args.home)
    spec = TenantSpec(name=args.name, region=args.region, n_accounts=args.accounts, seed=args.seed,
                      days=args.days, scenario=args.scenario, drift_day=args.drift_day)
    defs.resources["settings"].ensure_home()
    defs.resources["catalog"].add(spec)
    print(f"added tenant {spec.name} ({spec.region}); its partition appears when the sensor next runs, "
          f"or run: python -m resources.cli build --tenant {spec.name}")
    return 0


def verify_audit(args) -> int:
    from resources import audit

    defs = _defs(args.home)
    warehouse = defs.resources["warehouse"]
    with warehouse.connect(args.tenant, read_only=True) as con:
        report = audit.verify_chain(con)
    if report.ok:
        print(f"audit log of {args.tenant}: {report.entries} entries, chain intact")
        return 0
    print(f"audit log of {args.tenant}: chain broken at entry {report.first_bad_seq}", file=sys.stderr)
    return 1


def api_key(args) -> int:
    from resources.serving import ApiKeyStore, serving_dir

    defs = _defs(args.home)
    settings = defs.resources["settings"]
    store = ApiKeyStore(serving_dir(settings.root))
    if args.action == "create":
        defs.resources["catalog"].get(args.target)
        store.path.parent.mkdir(parents=True, exist_ok=True)
        print(store.create(args.target))
    else:
        store.revoke(args.target)
        print(f"revoked key {args.target}")
    return 0


def deployment_action(args) -> int:
    from assets.deployment import promote_challenger, rollback_champion

    r = _defs(args.home).resources
    r["catalog"].get(args.tenant)
    if args.command == "rollback":
        current, previous = rollback_champion(args.tenant, r["registry"], r["settings"], r["warehouse"],
                                              reason=args.reason)
        print(f"{args.tenant}: champion rolled back from v{current} to v{previous}")
    else:
        entry = promote_challenger(args.tenant, r["registry"], r["feature_store"], r["settings"], r["warehouse"],
                                   reason=args.reason)
        print(f"{args.tenant}: champion is now v{entry['champion']['version']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # Beta/preview notices of the pinned libraries are for their developers, not for operators.
    from dagster import BetaWarning, PreviewWarning

    warnings.filterwarnings("ignore", category=BetaWarning)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=PreviewWarning)
    parser = argparse.ArgumentParser(prog="python -m resources.cli")
    parser.add_argument("--home", help="MLOPS_HOME (default: $MLOPS_HOME or ./.mlops)")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build data, features and a validated champion for every tenant")
    build.add_argument("--tenant", action="append", help="only this tenant (repeatable)")
    demo = sub.add_parser("demo", help="the closed loop: build, start Dagster and the service, replay days "
                                       "with concept drift for one tenant until it is retrained and promoted")
    demo.add_argument("--headless", action="store_true", help="no web UI; exit with the timeline (non-zero "
                                                              "if the loop did not close)")
    demo.add_argument("--small", action="store_true", help="two small tenants (tests, CI)")
    demo.add_argument("--reset", action="store_true", help="delete MLOPS_HOME first (the demo starts from an empty home)")
    demo.add_argument("--max-days", type=int, default=60, help="give up after this many simulated days")
    demo.add_argument("--service-port", type=int, default=3001)
    demo.add_argument("--ui-port", type=int, default=3000)
    add = sub.add_parser("add-tenant", help="register a new tenant")
    add.add_argument("name")
    add.add_argument("--region", default="eu")
    add.add_argument("--accounts", type=int, default=1000)
    add.add_argument("--seed", type=int, default=1)
    add.add_argument("--days", type=int, default=180)
    add.add_argument("--scenario", default="none")
    add.add_argument("--drift-day", type=int, default=None)
    sub.add_parser("init", help="create MLOPS_HOME and the Dagster instance config")
    ver = sub.add_parser("verify-audit", help="check the tenant's audit log hash chain")
    ver.add_argument("tenant")
    key = sub.add_parser("api-key", help="create (for a tenant) or revoke (by key id) a service API key")
    key.add_argument("action", choices=["create", "revoke"])
    key.add_argument("target", help="tenant name for create, key id for revoke")
    for name in ("rollback", "promote"):
        cmd = sub.add_parser(name, help=f"{name} the tenant's champion in the registry and the running service")
        cmd.add_argument("tenant")
        cmd.add_argument("--reason", default=f"manual {name}")
    args = parser.parse_args(argv)
    if args.command == "api-key":
        return api_key(args)
    if args.command in ("rollback", "promote"):
        return deployment_action(args)
    if args.command == "build":
        return run_pipeline(args.home, args.tenant)
    if args.command == "demo":
        from resources.closed_loop import ClosedLoopDemo, prepare_home

        prepare_home(args.home, reset=args.reset)
        return ClosedLoopDemo(args.home, headless=args.headless, small=args.small, max_days=args.max_days,
                              service_port=args.service_port, ui_port=args.ui_port).run()
    if args.command == "init":
        root = _defs(args.home).resources["settings"].ensure_home()
        print(f"MLOPS_HOME ready at {root}")
        return 0
    if args.command == "add-tenant":
        return add_tenant(args)
    return verify_audit(args)


if __name__ == "__main__":
    sys.exit(main())
