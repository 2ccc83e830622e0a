"""`revline tail` formatting: what a person sees for batches, acks and garbage."""

from __future__ import annotations

from revline.contract import Ack, Batch, Sample, encode, encode_json
from revline.tools.tail import format_message

VIN = "1HGCM82633A004352"


def test_tail_summarises_a_batch_and_lists_samples_on_request() -> None:
    """A batch line names id, count, seq range and time range; --samples adds one line each."""
    batch = Batch(
        v=1,
        vin=VIN,
        batch=7,
        samples=[
            Sample(ts=1_764_115_200_000_000, seq=1, rpm=850.0),
            Sample(ts=1_764_115_200_100_000, seq=2, speed=0.0),
        ],
    )
    line = format_message(f"telemetry/{VIN}", encode(batch))
    assert line.startswith(f"telemetry/{VIN}  batch=7 samples=2 ")
    assert "seq=1..2" in line
    assert "2025-11-26T00:00:00.000+00:00..2025-11-26T00:00:00.100+00:00" in line
    detailed = format_message(f"telemetry/{VIN}", encode_json(batch), samples=True).splitlines()
    assert len(detailed) == 3
    assert "'rpm': 850.0" in detailed[1]
    assert "'speed': 0.0" in detailed[2]


def test_tail_shows_acks_and_says_why_garbage_is_rejected() -> None:
    """Acks list their batch ids; a malformed payload shows the reason and its first bytes."""
    ack = format_message(f"ack/{VIN}", encode(Ack(v=1, vin=VIN, batches=[3, 4])))
    assert ack == f"ack/{VIN}  ack batches=[3, 4]"
    bad = format_message(f"telemetry/{VIN}", b"{oops")
    assert "REJECTED undecodable" in bad
    assert "b'{oops'" in bad
