import duckdb

from mlops.core import audit


def _log(con, n):
    for i in range(n):
        audit.append_entry(con, tenant="t", actor="test", action="act", subject=f"s{i}", outcome="ok",
                           details={"i": i})


def test_untouched_chain_verifies():
    con = duckdb.connect()
    _log(con, 5)
    report = audit.verify_chain(con)
    assert report.ok and report.entries == 5


def test_an_edited_entry_is_found():
    con = duckdb.connect()
    _log(con, 5)
    con.execute("UPDATE audit_log SET outcome = 'forged' WHERE seq = 3")
    assert audit.verify_chain(con).first_bad_seq == 3


def test_a_deleted_entry_is_found():
    con = duckdb.connect()
    _log(con, 5)
    con.execute("DELETE FROM audit_log WHERE seq = 2")
    assert audit.verify_chain(con).first_bad_seq == 3


def test_a_rewritten_tail_with_recomputed_hash_still_breaks_the_link():
    con = duckdb.connect()
    _log(con, 3)
    con.execute("UPDATE audit_log SET details = '{}', entry_hash = repeat('a', 64) WHERE seq = 2")
    assert audit.verify_chain(con).first_bad_seq == 2
