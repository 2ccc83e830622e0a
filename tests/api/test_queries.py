"""What a telemetry request asks for, checked without a server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from revline.api.queries import (
    QueryError,
    TelemetryQuery,
    boundary_sql,
    copy_sql,
    decode_cursor,
    encode_cursor,
    from_us,
    parse_fields,
    parse_time,
    to_us,
)

VIN = "1HGCM82633A004352"


@given(
    st.sampled_from(["", VIN]),
    st.integers(min_value=0, max_value=2**62 - 1),
    st.integers(min_value=0, max_value=2**63 - 1),
)
def test_a_cursor_names_the_key_it_was_made_from(vin: str, ts: int, seq: int) -> None:
    """encode_cursor and decode_cursor are inverse for every key."""
    assert decode_cursor(encode_cursor((vin, ts, seq))) == (vin, ts, seq)


@given(st.text(max_size=300))
def test_anything_else_is_not_a_cursor(text: str) -> None:
    """Arbitrary text is refused with QueryError (or is, by chance, a well-formed key)."""
    try:
        _vin, ts, seq = decode_cursor(text)
    except QueryError:
        return
    assert ts >= 0
    assert seq >= 0


def test_times_are_iso_with_a_zone_or_microseconds() -> None:
    """ISO times need a zone; digits are microseconds; both are exact."""
    assert parse_time("2024-06-01T12:00:00Z", "from") == datetime(2024, 6, 1, 12, tzinfo=UTC)
    assert parse_time("1717243200000001", "from") == from_us(1_717_243_200_000_001)
    assert to_us(from_us(1_717_243_200_000_001)) == 1_717_243_200_000_001
    for bad in ("2024-06-01T12:00:00", "yesterday", "12" * 30):
        with pytest.raises(QueryError, match="from"):
            parse_time(bad, "from")


def test_fields_are_checked_against_the_field_table() -> None:
    """Known fields keep their order; an unknown one is named; raw-only columns need raw."""
    assert parse_fields("rpm,speed,rpm", "raw") == ("rpm", "speed")
    assert parse_fields("extra", "raw") == ("extra",)
    with pytest.raises(QueryError, match="unknown field 'extra'"):
        parse_fields("extra", "1m")
    with pytest.raises(QueryError, match="'nope'"):
        parse_fields("speed,nope", "raw")


def test_the_sql_reads_after_the_cursor_up_to_the_page_end() -> None:
    """The boundary looks limit-1 rows ahead; the COPY is bounded by the cursor and the end key,
    and rollups read their own table."""
    start, end = from_us(0), from_us(10**15)
    query = TelemetryQuery(vins=(VIN,), start=start, end=end, fields=("speed",), limit=10,
                           after=("", 5, 6))
    sql, args = boundary_sql(query)
    assert "OFFSET 9 LIMIT 2" in sql
    assert "(ts, seq) > ($4, $5)" in sql
    assert args[:3] == [VIN, start, end]
    sql, args = copy_sql(query, ("", 50, 1))
    assert "(ts, seq) <= ($6, $7)" in sql
    assert sql.startswith("SELECT row_to_json(t)::text FROM (SELECT ts AS ts, seq AS seq, speed")
    assert sql.endswith("ORDER BY t.ts, t.seq")
    rollup = TelemetryQuery(vins=(VIN,), start=start, end=end, fields=("speed",),
                            resolution="1h", format="csv")
    sql, _ = copy_sql(rollup, None)
    assert "FROM samples_1h" in sql
    assert "speed_avg AS speed_avg" in sql
    with pytest.raises(QueryError, match="after from"):
        TelemetryQuery(vins=(VIN,), start=end, end=start, fields=()).check()
