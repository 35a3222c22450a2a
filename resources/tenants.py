"""The tenants the platform serves: who they are, where their data lives, how they are simulated.

Tenants are Dagster dynamic partitions (``TENANT_PARTITIONS``), so a tenant can be added at runtime.
The catalog here is the source of truth for a tenant's region and simulator settings: the three
built-in demo tenants plus any added under ``MLOPS_HOME/tenants.json``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import dagster as dg

from mlops.core.environment import file_lock, write_atomic

TENANT_PARTITIONS = dg.DynamicPartitionsDefinition(name="tenant")

REGIONS = ("eu", "us", "apac")
SCENARIOS = ("none", "covariate_shift", "concept_drift", "hard_concept_drift", "data_quality")
_TENANT_NAME = re.compile(r"^[a-z][a-z0-9_-]{1,39}$")


class UnknownTenantError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class TenantSpec:
    """One customer of the SaaS product, with the settings of its simulated business."""

    name: str
    region: str
    n_accounts: int
    seed: int
    days: int = 180
    scenario: str = "none"
    drift_day: int | None = None
    # The simulated clock: how many of the ``days`` have happened so far (None: all of them). The
    # closed-loop demo advances it one day at a time; ingestion only sees days before it.
    today: int | None = None
    extra: dict = field(default_factory=dict)
    # How many entities a use case's simulator simulates where it is not ``n_accounts`` (e.g.
    # ``{"fraud": 3000}``: fraud is rare, and a payment-fraud floor needs more accounts than churn's).
    use_case_accounts: dict = field(default_factory=dict)

    @property
    def visible_days(self) -> int:
        return self.days if self.today is None else self.today

    @property
    def world(self) -> str:
        """Identifies the tenant's simulated world, whatever its clock (``today`` left out)."""
        return f"{self.name}|{self.region}|{self.n_accounts}|{self.seed}|{self.days}|{self.scenario}|{self.drift_day}"

    def for_use_case(self, use_case: str) -> TenantSpec:
        """The spec a use case's simulator gets: ``n_accounts`` from ``use_case_accounts`` if set."""
        n = self.use_case_accounts.get(use_case)
        return self if n is None else replace(self, n_accounts=int(n), use_case_accounts={})

    def __post_init__(self) -> None:
        if not _TENANT_NAME.match(self.name):
            raise ValueError(
                f"tenant name {self.name!r} is invalid: use 2-40 lowercase letters, digits, '-' or '_'"
            )
        if self.region not in REGIONS:
            raise ValueError(f"tenant {self.name!r}: region {self.region!r} is not one of {REGIONS}")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"tenant {self.name!r}: scenario {self.scenario!r} is not one of {SCENARIOS}")
        if self.n_accounts < 50:
            raise ValueError(f"tenant {self.name!r}: n_accounts must be at least 50, got {self.n_accounts}")
        for use_case, n in self.use_case_accounts.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 50:
                raise ValueError(f"tenant {self.name!r}: use_case_accounts[{use_case!r}] must be an integer of at "
                                 f"least 50, got {n!r}")
        if self.days < 90:
            raise ValueError(f"tenant {self.name!r}: days must be at least 90, got {self.days}")
        if self.today is not None and not 60 <= self.today <= self.days:
            raise ValueError(f"tenant {self.name!r}: today must be between 60 and days={self.days}, got {self.today}")
        if self.drift_day is not None and not 0 < self.drift_day < self.days:
            raise ValueError(f"tenant {self.name!r}: drift_day must be between 1 and days-1, got {self.drift_day}")


# Three tenants of different sizes and regions: 10,500 accounts, 180 days of history.
DEFAULT_TENANTS: tuple[TenantSpec, ...] = (
    TenantSpec(name="acme", region="eu", n_accounts=6000, seed=101),
    TenantSpec(name="globex", region="us", n_accounts=3000, seed=202),
    TenantSpec(name="initech", region="us", n_accounts=1500, seed=303),
)


class TenantCatalog(dg.ConfigurableResource):
    """Looks tenants up by name: built-in defaults, overridden or extended by ``tenants.json``."""

    tenants_file: str

    def _custom(self) -> dict[str, TenantSpec]:
        path = Path(self.tenants_file)
        if not path.exists():
            return {}
        raw = json.loads(path.read_text())
        return {name: TenantSpec(**spec) for name, spec in raw.items()}

    def all(self) -> dict[str, TenantSpec]:
        specs = {t.name: t for t in DEFAULT_TENANTS}
        specs.update(self._custom())
        return specs

    def get(self, name: str) -> TenantSpec:
        specs = self.all()
        if name not in specs:
            raise UnknownTenantError(
                f"unknown tenant {name!r}: known tenants are {sorted(specs)}; add one with "
                "`mlops add-tenant`"
            )
        return specs[name]

    def set_today(self, name: str, today: int) -> TenantSpec:
        """Move a tenant's simulated clock (the demo replays one day at a time)."""
        with self._locked():
            spec = replace(self.get(name), today=today)
            self._write(spec)
        return spec

    def add(self, spec: TenantSpec) -> None:
        """Register (or update) a tenant in ``tenants.json``, atomically."""
        with self._locked():
            self._write(spec)

    def _write(self, spec: TenantSpec) -> None:
        path = Path(self.tenants_file)
        custom = {name: asdict(s) for name, s in self._custom().items()}
        custom[spec.name] = asdict(spec)
        write_atomic(path, json.dumps(custom, indent=2, sort_keys=True).encode())

    def _locked(self):
        """One read-modify-write of ``tenants.json`` at a time across processes: two writers (the
        demo's tenant workers moving their clocks) would otherwise each write back the other's
        tenant as it was, and a tenant's clock would go back a day."""
        return file_lock(Path(self.tenants_file).with_suffix(".lock"))
