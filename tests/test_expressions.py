"""Conditions (`filter` and `where:`): the columnar evaluation gives the row evaluation's
answers and failures, record for record, on random conditions over random columns with
nulls."""

from __future__ import annotations

import os

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.expressions import Condition

EXAMPLES = int(os.environ.get("EXPRESSION_EXAMPLES", "60"))

SCHEMA = pa.schema([("status", pa.int32()), ("bytes", pa.int64()), ("ratio", pa.float64()),
                    ("path", pa.string()), ("ok", pa.bool_())])

rows = st.lists(st.fixed_dictionaries({
    "status": st.one_of(st.none(), st.sampled_from([200, 301, 404, 500, 503])),
    "bytes": st.one_of(st.none(), st.integers(-5, 5000)),
    "ratio": st.one_of(st.none(), st.floats(-2, 2, allow_nan=False)),
    "path": st.one_of(st.none(), st.sampled_from(["/", "/api/x", "/health", "", "/ünï", "/api"])),
    "ok": st.one_of(st.none(), st.booleans()),
}), max_size=30)

numbers = st.sampled_from(["status", "bytes", "ratio", "0", "400", "2.5", "-1", "bytes + 1", "bytes * 2",
                           "9223372036854775808", "18446744073709551615 / bytes",
                           "bytes / 2", "bytes / status", "bytes - status", "-bytes"])
texts = st.sampled_from(["path", "'/api'", "''", "'/ünï'"])


@st.composite
def comparisons(draw) -> str:
    kind = draw(st.sampled_from(["num", "text", "in", "none", "starts", "mixed", "bool"]))
    op = draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]))
    if kind == "num":
        return f"{draw(numbers)} {op} {draw(numbers)}"
    if kind == "text":
        return f"{draw(texts)} {op} {draw(texts)}"
    if kind == "in":
        neg = draw(st.sampled_from(["in", "not in"]))
        return draw(st.sampled_from([f"status {neg} (404, 500)", f"path {neg} ['/', '/api']", f"bytes {neg} (1, 2.0)",
                                     f"bytes {neg} (9223372036854775808,)"]))
    if kind == "none":
        return f"{draw(st.sampled_from(['status', 'path', 'ratio', 'ok']))} is {draw(st.sampled_from(['', 'not ']))}None"
    if kind == "starts":
        return f"path.{draw(st.sampled_from(['startswith', 'endswith']))}({draw(st.sampled_from(['/api', '', 'x']))!r})"
    if kind == "bool":
        return draw(st.sampled_from(["ok", "not ok", "ok == True"]))
    return f"{draw(numbers)} {op} {draw(texts)}"  # unlike types: Python's rules


conditions = st.recursive(comparisons(), lambda inner: st.one_of(
    st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(lambda t: f"({t[0]}) {t[1]} ({t[2]})"),
    inner.map(lambda c: f"not ({c})"),
    st.tuples(inner, inner).map(lambda t: f"{t[0]} and {t[1]} or {t[0]}"),
    st.just("0 <= bytes < 100 <= status"),
), max_leaves=4)


@settings(max_examples=EXAMPLES, deadline=None)
@given(conditions, rows)
def test_columns_answer_as_rows_do(expression: str, records: list[dict]) -> None:
    condition = Condition(expression)
    table = pa.Table.from_pylist(records, schema=SCHEMA)
    expected, expected_failed = condition.rows(table.to_pylist())
    mask, failed = condition.mask(table)
    assert mask.to_pylist() == expected
    assert {i: m for i, m in failed.items()} == expected_failed


def test_the_common_forms_run_on_columns() -> None:
    """A condition of the common forms over non-null columns never takes the row rules."""
    table = pa.table({"status": pa.array([200, 404, 500], pa.int32()), "path": ["/", "/api/x", "/health"]})
    condition = Condition("status >= 400 and (path.startswith('/api') or status in (500, 503))")
    condition.rows = None  # the row rules are not there: the columns must answer alone
    mask, failed = condition.mask(table)
    assert mask.to_pylist() == [False, True, True] and failed == {}


def test_a_null_gets_the_row_rules_answer_and_names_the_field() -> None:
    table = pa.table({"bytes": pa.array([10, None, None], pa.int64()), "status": [200, 200, 500]})
    mask, failed = Condition("bytes is not None and bytes > 5").mask(table)
    assert mask.to_pylist() == [True, False, False] and failed == {}
    mask, failed = Condition("bytes > 5 or status >= 500").mask(table)
    assert mask.to_pylist() == [True, False, False]
    assert set(failed) == {1, 2} and failed[1][1] == "bytes" and "is null" in failed[1][0]
