"""The field table: what the contract, spool, sampler, PID map and writer derive from it, and the
rules that keep old spools and old databases readable when a field is added.

The SQL side (columns of every table and view, values through them, the upgrade of a database
holding data) is checked on real servers in tests/storage/test_fields_sql.py.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import msgspec
import obd
import pytest
from obd.protocols.protocol import Frame, Message

from revline.consumer.writer import COLD_SCALES, STAGING_COLUMNS, STATE_COLUMNS, cold_column
from revline.contract import NUMERIC_FIELDS, Batch, ContractError, Sample, decode_batch, encode
from revline.edge.pids import FIELD_BY_PID, UNIT_BY_PID, convert
from revline.edge.sampler import clean_values
from revline.edge.spool import FIELD_SCALES, _field_bit, pack_values, row_to_sample
from revline.fields import FIELDS, Field

VIN = "1HGCM82633A004352"
T0 = 1_717_243_200_000_000  # 2024-06-01T12:00:00Z

SPOOLED: tuple[tuple[str, int], ...] = (
    ("speed", 10),
    ("rpm", 4),
    ("coolant", 10),
    ("intake", 10),
    ("throttle", 100),
    ("load", 100),
    ("maf", 100),
    ("fuel", 100),
    ("battery", 1000),
    ("lat", 10_000_000),
    ("lon", 10_000_000),
    ("alt", 10),
    ("heading", 10),
    ("gps_speed", 10),
)
"""Positions and scales of the fields in spools written since the first release: frozen."""


def typical(field: Field) -> float:
    """A value inside the field's bounds, at the device's resolution, neither 0 nor a bound."""
    raw = field.lo + (field.hi - field.lo) * 0.6180339887
    return round(raw * field.device_scale) / field.device_scale


def test_fields_are_only_ever_appended() -> None:
    """The fields that spools already hold keep their position and scale: new ones go last."""
    assert FIELD_SCALES[: len(SPOOLED)] == SPOOLED


def test_each_field_is_stored_exactly_and_without_overflow() -> None:
    """Names are SQL-safe and unique; the database keeps every device step exactly; the cold
    integer type holds both bounds; OBD command and pint unit come together."""
    assert len({f.name for f in FIELDS}) == len(FIELDS)
    reserved = {"vin", "ts", "seq", "flags", "extra", "received_at", "updated_at", "bucket"}
    for field in FIELDS:
        assert re.fullmatch(r"[a-z][a-z0-9_]{0,40}", field.name), field.name
        assert field.name not in reserved
        assert field.lo < field.hi
        assert 10**field.db_digits % field.device_scale == 0, field.name
        top = {"smallint": 2**15 - 1, "integer": 2**31 - 1, "bigint": 2**63 - 1}[field.cold_type]
        assert max(abs(field.lo), abs(field.hi)) * 10**field.db_digits <= top
        assert (field.obd is None) == (field.obd_unit is None), field.name


def test_value_types_tell_every_database_step_apart() -> None:
    """``real`` only where float32 holds every step of the cold column, else double."""
    assert {f.name: f.value_type for f in FIELDS}["lat"] == "double precision"
    assert {f.name: f.value_type for f in FIELDS}["speed"] == "real"
    for field in FIELDS:
        if field.value_type == "real":
            step = 10.0**-field.db_digits
            top = max(abs(field.lo), abs(field.hi))
            assert top * 2**-23 < step, field.name


def test_the_contract_takes_each_field_from_the_table() -> None:
    """Sample has one optional float per field, between ts/seq and extra/flags, bounded by the
    table: both bounds pass, a step beyond either is invalid."""
    assert tuple(f.name for f in FIELDS) == NUMERIC_FIELDS
    assert Sample.__struct_fields__ == ("ts", "seq", *NUMERIC_FIELDS, "extra", "flags", "dtc")
    for field in FIELDS:
        for value in (field.lo, field.hi, typical(field)):
            measurement: dict[str, Any] = {field.name: value}
            sample = Sample(ts=T0, seq=1, **measurement)
            decoded = decode_batch(encode(Batch(v=1, vin=VIN, batch=1, samples=[sample])))
            assert getattr(decoded.samples[0], field.name) == value
        for value in (field.lo - 0.001, field.hi + 0.001, math.nan):
            sample_map = {"ts": T0, "seq": 1, field.name: value}
            payload = msgspec.msgpack.encode(
                {"v": 1, "vin": VIN, "batch": 1, "samples": [sample_map]}
            )
            with pytest.raises(ContractError) as caught:
                decode_batch(payload)
            assert caught.value.reason == "invalid"


def test_the_sampler_drops_what_the_contract_refuses() -> None:
    """The sampler's bounds are the table's: a value at a bound stays, one beyond is dropped."""
    inside = {f.name: f.hi for f in FIELDS}
    outside = {f.name: f.hi + 1 for f in FIELDS}
    assert clean_values(inside, {}) == (inside, {}, [])
    assert clean_values(outside, {}) == ({}, {}, list(outside))


def test_every_field_round_trips_through_the_spool_at_its_resolution() -> None:
    """All fields and ``extra`` packed into one row come back as the same sample."""
    values = {f.name: typical(f) for f in FIELDS}
    sample = row_to_sample(5, T0, pack_values(values, {"TIMING_ADVANCE": 12.5}), flagged=False)
    assert {name: getattr(sample, name) for name in NUMERIC_FIELDS} == values
    assert sample.extra == {"TIMING_ADVANCE": 12.5}


def test_rows_of_an_older_spool_stay_readable() -> None:
    """A row written before fields were appended (a presence mask over the first fields, bit 15
    for ``extra``) decodes with the fields it has, the newer ones absent."""
    speed, rpm, gps_speed = 1 << 0, 1 << 1, 1 << 13
    old = msgspec.msgpack.encode([speed | rpm | gps_speed | 1 << 15, 523, 7401, 870, {"X": 1.5}])
    sample = row_to_sample(9, T0, old, flagged=True)
    assert (sample.speed, sample.rpm, sample.gps_speed) == (52.3, 1850.25, 87.0)
    assert sample.extra == {"X": 1.5}
    assert sample.flags == 1
    assert all(getattr(sample, f.name) is None for f in FIELDS[len(SPOOLED) :])


def test_presence_bits_never_collide_with_extra() -> None:
    """Field bits are distinct and skip bit 15 (``extra``'s), however many fields there are."""
    bits = [_field_bit(i) for i in range(48)]
    assert len(set(bits)) == len(bits)
    assert 1 << 15 not in bits
    assert bits[:15] == [1 << i for i in range(15)]


def python_obd_answer(command: str) -> object:
    """What python-OBD's own decoder makes of an answer of 0x10 bytes to ``command``."""
    cmd = obd.commands[command]
    message = Message([Frame("")])
    message.data = bytearray([0x41, *bytes.fromhex(cmd.command.decode()[2:])])
    message.data += bytearray([0x10] * (cmd.bytes - 2))
    return cmd.decode([message])


def test_the_pid_map_converts_python_obd_answers_to_each_field() -> None:
    """Each OBD field maps from its python-OBD command; the answer, decoded by python-OBD, is
    converted to the table's unit (a unit of another dimension would raise). A command python-OBD
    lacks (read by a custom command) is checked with a quantity in the table's pint unit."""
    assert {f.obd for f in FIELDS if f.obd is not None} == set(FIELD_BY_PID) == set(UNIT_BY_PID)
    for field in FIELDS:
        if field.obd is None:
            continue
        if obd.commands.has_name(field.obd):
            answer: Any = python_obd_answer(field.obd)
        else:
            answer = obd.Unit.Quantity(typical(field), field.obd_unit)
        converted = convert(field.obd, answer)
        assert converted is not None
        assert converted[0::2] == (field.name, False)
        assert converted[1] == pytest.approx(answer.to(field.obd_unit).magnitude)


def test_the_writer_columns_follow_the_table() -> None:
    """Staging rows are ``(vin, *astuple(sample))``; hot-state and cold columns are the table's,
    in its order."""
    values: dict[str, Any] = {f.name: typical(f) for f in FIELDS}
    sample = Sample(ts=T0, seq=3, flags=1, **values)
    row = dict(zip(STAGING_COLUMNS, (VIN, *msgspec.structs.astuple(sample)), strict=True))
    assert row == {"vin": VIN, **msgspec.structs.asdict(sample)}
    assert STATE_COLUMNS[4:-2] == tuple(c for f in FIELDS for c in (f.name, f"{f.name}_ts"))
    assert [cold_column(f.name) for f in FIELDS] == [f"{f.name}_e{f.db_digits}" for f in FIELDS]
    assert [COLD_SCALES[f.name] for f in FIELDS] == [(f.db_digits, f.cold_type) for f in FIELDS]


def test_the_wire_doc_names_every_field() -> None:
    """docs/wire.md's Sample table has a row naming each field of the table."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "wire.md").read_text()
    table = doc.split("\n## Sample\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert {f.name for f in FIELDS} <= named
