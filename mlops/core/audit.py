"""Append-only, tamper-evident audit log, stored in each tenant's warehouse.

Each entry carries the hash of the entry before it, so editing or deleting any row breaks the
chain from that row on; ``verify_chain`` finds the first broken link.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass

import duckdb

AUDIT_DDL = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT PRIMARY KEY,
    recorded_at TIMESTAMP NOT NULL,
    tenant VARCHAR NOT NULL,
    actor VARCHAR NOT NULL,
    action VARCHAR NOT NULL,
    subject VARCHAR NOT NULL,
    outcome VARCHAR NOT NULL,
    details VARCHAR NOT NULL,
    prev_hash VARCHAR NOT NULL,
    entry_hash VARCHAR NOT NULL
)
"""

GENESIS = "0" * 64


def _entry_hash(prev_hash: str, fields: tuple) -> str:
    payload = json.dumps([prev_hash, *[str(f) for f in fields]], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def append_entry(
    con: duckdb.DuckDBPyConnection,
    *,
    tenant: str,
    actor: str,
    action: str,
    subject: str,
    outcome: str,
    details: dict,
) -> int:
    """Append one entry inside the caller's transaction; returns its sequence number."""
    con.execute(AUDIT_DDL)
    last = con.execute("SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
    recorded_at = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)
    details_json = json.dumps(details, sort_keys=True, default=str)
    fields = (seq, recorded_at.isoformat(), tenant, actor, action, subject, outcome, details_json)
    con.execute(
        "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [seq, recorded_at, tenant, actor, action, subject, outcome, details_json, prev,
         _entry_hash(prev, fields)],
    )
    return seq


@dataclass(frozen=True)
class ChainReport:
    entries: int
    first_bad_seq: int | None

    @property
    def ok(self) -> bool:
        return self.first_bad_seq is None


def verify_chain(con: duckdb.DuckDBPyConnection) -> ChainReport:
    """Recompute every hash; report the first entry whose content or link was altered. Works on a
    read-only connection (an audit is a read); a warehouse without an audit log has 0 entries."""
    if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'audit_log'").fetchone()[0]:
        return ChainReport(0, None)
    rows = con.execute(
        "SELECT seq, recorded_at, tenant, actor, action, subject, outcome, details, prev_hash, entry_hash "
        "FROM audit_log ORDER BY seq"
    ).fetchall()
    prev = GENESIS
    for expected_seq, row in enumerate(rows, start=1):
        seq, recorded_at, *rest, prev_hash, entry_hash = row
        fields = (seq, recorded_at.isoformat(), *rest)
        if seq != expected_seq or prev_hash != prev or _entry_hash(prev, fields) != entry_hash:
            return ChainReport(len(rows), seq)
        prev = entry_hash
    return ChainReport(len(rows), None)
