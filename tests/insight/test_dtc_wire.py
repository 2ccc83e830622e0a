"""Trouble-code sets on the wire: spool rows, v1 and v2 carry ``Sample.dtc`` exactly."""

from __future__ import annotations

import msgspec
import pytest

from revline.contract import ContractError, decode_batch
from revline.edge.sampler import clean_dtc
from revline.edge.spool import SpoolBatch, encode_batch, pack_values, row_to_sample
from revline.wire_v2 import decode_any

VIN = "1HGCM82633A004352"
T0 = 1_717_243_200_000_000


def _batch() -> SpoolBatch:
    return SpoolBatch(
        id=7,
        rows=[
            (1, T0, pack_values({"speed": 50.0}, None, None), None),
            (2, T0 + 1, pack_values({"speed": 51.0}, {"MIL": 1.0}, ["P0300", "P0420"]), None),
            (3, T0 + 2, pack_values({}, None, []), None),
        ],
    )


def test_a_spooled_code_set_travels_in_v1_and_v2() -> None:
    """The set (and the empty set, "cleared") comes out of the spool and both wire versions."""
    batch = _batch()
    assert [row_to_sample(s, t, d, flagged=False).dtc for s, t, d, _ in batch.rows] == [
        None, ["P0300", "P0420"], [],
    ]
    for version in (1, 2):
        decoded = decode_any(encode_batch(VIN, batch, version))
        assert [s.dtc for s in decoded.samples] == [None, ["P0300", "P0420"], []]
        assert decoded.samples[1].extra == {"MIL": 1.0}


def test_a_v2_batch_without_codes_has_no_dtc_element() -> None:
    """Without codes the v2 envelope is the 6 elements it was before ``dtc`` existed."""
    rows: list[tuple[int, int, bytes, int | None]] = [(1, T0, pack_values({"speed": 50.0}), None)]
    envelope = msgspec.msgpack.decode(encode_batch(VIN, SpoolBatch(id=1, rows=rows), 2))
    assert len(envelope) == 6
    assert len(msgspec.msgpack.decode(encode_batch(VIN, _batch(), 2))) == 7


def test_the_edge_keeps_only_well_formed_codes_sorted_once() -> None:
    """A code the contract would refuse (and with it the batch) is dropped on the device."""
    assert clean_dtc(("P0420", "P0300", "P0420", "X1234", "p0100", "P03001")) == [
        "P0300", "P0420",
    ]
    assert clean_dtc(()) == []
    assert clean_dtc(None) is None


def test_the_contract_refuses_a_malformed_code() -> None:
    """A code that is not SAE J2012 makes the batch invalid (dead-lettered, never stored)."""
    payload = (
        b'{"v":1,"vin":"' + VIN.encode() + b'","batch":1,"samples":[{"ts":1,"seq":1,'
        b'"dtc":["P0300\\u0000"]}]}'
    )
    with pytest.raises(ContractError) as info:
        decode_batch(payload)
    assert info.value.reason == "invalid"
