"""The consumer's policy without a broker or a database: what each message becomes, what a batch
stores and dead-letters, what a database error means, PUBACK order and end-to-end acks."""

from __future__ import annotations

import itertools

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from revline.consumer.batcher import Batcher, Pending
from revline.consumer.budget import footprint
from revline.consumer.pipeline import (
    Fault,
    InOrder,
    Item,
    Split,
    acks,
    classify,
    dead_letter,
    fault,
    newest_sample,
    plan,
    sample_count,
)
from revline.consumer.subscriber import Inbound
from revline.consumer.writer import WriteResult
from revline.contract import Batch, Sample, decode_ack, encode, telemetry_topic

VINS = ("1HGCM82633A004352", "2HGCM82633A004352", "3HGCM82633A004352")
NOW_US = 1_700_000_000_000_000  # a fixed consumer clock: nothing here reads the wall clock
DAY_US = 86_400_000_000
_mids = itertools.count(1)


def _inbound(payload: bytes, vin: str = VINS[0]) -> Inbound:
    return Inbound(
        mid=next(_mids),
        qos=1,
        topic=telemetry_topic(vin),
        payload=payload,
        received_at=NOW_US / 1e6,
        generation=1,
    )


def _batch(vin: str, batch: int, n: int = 3, ts: int = NOW_US - 60_000_000) -> Batch:
    samples = [Sample(ts=ts + i, seq=i, speed=50.0) for i in range(n)]
    return Batch(v=1, vin=vin, batch=batch, samples=samples)


def _classify(payload: bytes, vin: str = VINS[0]) -> Item:
    return classify(
        _inbound(payload, vin), now_us=NOW_US, max_future_us=300_000_000, max_age_us=300 * DAY_US
    )


def test_a_good_message_becomes_a_batch_charged_its_footprint() -> None:
    """A message that decodes and passes the checks is a batch to store, charged to the byte
    budget what its raw bytes and decoded samples hold."""
    payload = encode(_batch(VINS[0], 7, n=5))
    item = _classify(payload)
    assert item.rejected is None
    assert item.batch == _batch(VINS[0], 7, n=5)
    assert item.samples == 5
    assert item.size == footprint(len(payload), item.batch)


def test_an_undecodable_message_is_a_dead_letter_with_its_raw_bytes() -> None:
    """Bytes that are not a batch become a dead letter keeping them, with the contract's reason
    and the receive time; no batch, so no vehicle to ack."""
    item = _classify(b"\xc1 not msgpack")
    assert item.batch is None
    assert item.rejected is not None
    assert item.rejected.payload == b"\xc1 not msgpack"
    assert item.rejected.topic == telemetry_topic(VINS[0])
    assert item.rejected.received_at.timestamp() == NOW_US / 1e6
    assert item.rejected.reason not in ("future_timestamp", "too_old", "duplicate_sample")
    assert item.samples == 0
    assert item.size == footprint(len(b"\xc1 not msgpack"), None)


@pytest.mark.parametrize(
    ("ts", "reason"),
    [(NOW_US + 3_600_000_000, "future_timestamp"), (NOW_US - 400 * DAY_US, "too_old")],
)
def test_a_refused_batch_is_dead_lettered_but_kept_for_its_ack(ts: int, reason: str) -> None:
    """A batch that decoded but cannot be stored is a dead letter that keeps the decoded batch,
    so that the device still gets its end-to-end ack."""
    item = _classify(encode(_batch(VINS[1], 9, ts=ts)), VINS[1])
    assert item.rejected is not None
    assert item.rejected.reason == reason
    assert item.batch == _batch(VINS[1], 9, ts=ts)
    assert [ack.batches for ack in acks([item])] == [[9]]


_KINDS = st.sampled_from(["good", "undecodable", "future"])


def _item(kind: str, vin: str, batch: int) -> Item:
    if kind == "good":
        return _classify(encode(_batch(vin, batch)), vin)
    if kind == "future":
        return _classify(encode(_batch(vin, batch, ts=NOW_US + DAY_US)), vin)
    return _classify(b"\x93" + bytes([batch % 256]), vin)


_ITEMS = st.lists(
    st.builds(_item, _KINDS, st.sampled_from(VINS), st.integers(min_value=0, max_value=5)),
    max_size=30,
)


@given(items=_ITEMS)
def test_a_closed_batch_is_split_into_store_and_dead_letters_in_order(items: list[Item]) -> None:
    """Each message of a closed batch lands in exactly one list, in arrival order: accepted
    batches are stored, everything refused before the database is dead-lettered."""
    todo = plan(items)
    assert todo.store == [item for item in items if item.rejected is None]
    assert todo.refused == [item.rejected for item in items if item.rejected is not None]
    assert len(todo.store) + len(todo.refused) == len(items)
    assert all(item.batch is not None for item in todo.store)


def test_newest_sample_looks_at_every_batch() -> None:
    """The lag is measured from the newest stored sample, whichever batch holds it."""
    older, newer = _batch(VINS[0], 1, ts=NOW_US - 50), _batch(VINS[1], 2, ts=NOW_US - 10)
    assert newest_sample([newer, older]) == NOW_US - 10 + 2
    assert newest_sample([]) is None


_VALUES_ERRORS = [
    asyncpg.exceptions.NumericValueOutOfRangeError("value out of range"),  # 22003
    asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence"),  # 22021
    asyncpg.exceptions.UniqueViolationError("duplicate key"),  # 23505
    asyncpg.exceptions.CheckViolationError("violates check constraint"),  # 23514
    OverflowError("int too big to convert"),
    UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
]
_OUTAGES = [
    asyncpg.exceptions.InsufficientPrivilegeError("permission denied"),  # 42501
    asyncpg.exceptions.UndefinedTableError("relation does not exist"),  # 42P01
    asyncpg.exceptions.NotNullViolationError("null value in column"),  # 23502: the schema's
    asyncpg.exceptions.ReadOnlySQLTransactionError("read-only transaction"),  # 25006
    asyncpg.exceptions.DiskFullError("no space left"),  # 53100
    asyncpg.exceptions.AdminShutdownError("terminating connection"),  # 57P01
    ConnectionRefusedError(111, "Connection refused"),
    TimeoutError(),
    RuntimeError("anything not known"),
]


@pytest.mark.parametrize("exc", _VALUES_ERRORS, ids=lambda e: type(e).__name__)
def test_only_errors_about_the_values_are_judged_bad_values(exc: Exception) -> None:
    """Out of range, bad encoding, a duplicate or check violation: the values written."""
    assert fault(exc) is Fault.VALUES


@pytest.mark.parametrize("exc", _OUTAGES, ids=lambda e: type(e).__name__)
def test_every_other_error_is_an_outage(exc: Exception) -> None:
    """Privileges, missing objects, read-only, disk, shutdowns, connections, timeouts and any
    unknown error are outages: retried, never a reason to dead-letter."""
    assert fault(exc) is Fault.OUTAGE


class GaveUpError(Exception):
    """What the one-by-one pass below raises when it must give up: an outage."""


def _write_each(
    items: list[Item], outcomes: dict[int, Exception | None], *, probe_works: bool
) -> tuple[Split, int]:
    """The consumer's one-by-one pass (service._write_each) against a made-up database: each
    message's write raises ``outcomes[mid]`` (None: it works), the probe works or raises."""
    split = Split()
    probes = 0
    for item, batch in split.todo(items):
        exc = outcomes[item.inbound.mid]
        if exc is None:
            split.wrote(batch, WriteResult(1, sample_count(batch), sample_count(batch) - 1))
            continue
        if fault(exc) is Fault.OUTAGE:
            raise GaveUpError from exc
        if split.needs_probe(exc):
            probes += 1
            if not probe_works:
                raise GaveUpError
            split.probe_worked()
        split.refuse(item, exc)
    return split, probes


_OUTCOMES = st.sampled_from(
    [None, None, _VALUES_ERRORS[0], _VALUES_ERRORS[2], _VALUES_ERRORS[4], _OUTAGES[0]]
)


@given(
    items=st.lists(
        st.builds(_item, st.just("good"), st.sampled_from(VINS), st.just(1)), max_size=12
    ),
    data=st.data(),
    probe_works=st.booleans(),
)
def test_a_message_is_dead_lettered_only_for_its_own_values_after_a_probe(
    items: list[Item], data: st.DataObject, probe_works: bool
) -> None:
    """Writing a refused batch one message at a time: a message is dead-lettered only when its
    own write was refused for its values and a probe proved the database writes; any outage, or
    a probe that fails, gives up (the whole batch is retried, nothing dead-lettered)."""
    outcomes = {item.inbound.mid: data.draw(_OUTCOMES) for item in items}
    errors = [outcomes[item.inbound.mid] for item in items]
    values = [e for e in errors if e is not None and fault(e) is Fault.VALUES]
    first_outage = next(
        (i for i, e in enumerate(errors) if e is not None and fault(e) is Fault.OUTAGE), None
    )
    first_values = next(
        (i for i, e in enumerate(errors) if e is not None and fault(e) is Fault.VALUES), None
    )
    gives_up = first_outage is not None or (bool(values) and not probe_works)
    if gives_up:
        with pytest.raises(GaveUpError):
            _write_each(items, outcomes, probe_works=probe_works)
        return
    split, probes = _write_each(items, outcomes, probe_works=probe_works)
    assert probes == (1 if first_values is not None else 0)
    assert split.stored == [i.batch for i, e in zip(items, errors, strict=True) if e is None]
    assert [r.payload for r in split.refused] == [
        i.inbound.payload for i, e in zip(items, errors, strict=True) if e is not None
    ]
    assert {r.reason for r in split.refused} <= {"db_error"}
    assert split.result.batches == len(split.stored)
    assert split.result.samples == sum(map(sample_count, split.stored))


def test_a_dead_letter_names_the_sqlstate_and_needs_a_probe_first() -> None:
    """Refusing a message before a probe worked, or for an outage, is a bug in the caller and
    raises; after a probe, the dead letter says which SQLSTATE refused it."""
    item = _item("good", VINS[0], 1)
    split = Split()
    out_of_range = _VALUES_ERRORS[0]
    assert split.needs_probe(out_of_range)
    with pytest.raises(ValueError, match="probe"):
        split.refuse(item, out_of_range)
    split.probe_worked()
    assert not split.needs_probe(out_of_range)
    with pytest.raises(ValueError, match="data error"):
        split.refuse(item, _OUTAGES[0])
    split.refuse(item, out_of_range)
    (letter,) = split.refused
    assert letter == dead_letter(item.inbound, "db_error", "SQLSTATE 22003: value out of range")


@given(order=st.permutations(range(12)))
def test_work_is_released_in_start_order_whatever_order_it_ends_in(order: list[int]) -> None:
    """Each piece is released once, in the order it was started, and only once it and all
    before it are done."""
    sequence: InOrder[int] = InOrder()
    tickets = [sequence.start() for _ in range(12)]
    assert tickets == list(range(12))
    released: list[int] = []
    done: set[int] = set()
    for ticket in order:
        done.add(ticket)
        released.extend(sequence.done(ticket, ticket * 10))
        prefix = next(i for i in range(13) if i not in done)  # first still running
        assert released == [t * 10 for t in range(prefix)]
        assert len(sequence) == 12 - prefix
    with pytest.raises(ValueError, match="not running"):
        sequence.done(order[0], 0)


@given(items=_ITEMS)
def test_one_ack_per_vehicle_names_each_of_its_decoded_batches_once(items: list[Item]) -> None:
    """Acks go one per vehicle, in order of first appearance, each batch id once (a redelivered
    duplicate too), decoded-but-refused batches included, undecodable messages not."""
    sent = acks(items)
    decoded = [item.batch for item in items if item.batch is not None]
    assert [ack.vin for ack in sent] == list(dict.fromkeys(b.vin for b in decoded))
    for ack in sent:
        assert ack.batches == list(dict.fromkeys(b.batch for b in decoded if b.vin == ack.vin))
        assert decode_ack(encode(ack)) == ack  # a valid ack by the contract


@given(
    items=_ITEMS,
    max_items=st.integers(min_value=1, max_value=6),
    commits=st.data(),
)
def test_pubacks_follow_arrival_and_acks_name_only_committed_batches(
    items: list[Item], max_items: int, commits: st.DataObject
) -> None:
    """The pipeline end to end, without servers: messages are batched, batches commit in any
    order (some never, the database still down), and the consumer PUBACKs exactly the messages
    of the batches released so far, in arrival order, and acks only what they hold."""
    batcher: Batcher[Item] = Batcher(max_samples=1_000, max_age=1.0, max_items=max_items)
    closed: list[Pending[Item]] = []
    for item in items:
        closed.extend(batcher.add(item, item.samples, now=0.0, size=item.size))
    if len(batcher):
        closed.append(batcher.take())
    sequence: InOrder[Pending[Item]] = InOrder()
    tickets = {sequence.start(): pending for pending in closed}
    committed = commits.draw(st.permutations(list(tickets)))
    committed = committed[: commits.draw(st.integers(min_value=0, max_value=len(committed)))]

    pubacked: list[Inbound] = []
    acked: set[tuple[str, int]] = set()
    for ticket in committed:
        for pending in sequence.done(ticket, tickets[ticket]):
            pubacked.extend(item.inbound for item in pending.items)
            for ack in acks(pending.items):
                assert len(set(ack.batches)) == len(ack.batches)
                acked.update((ack.vin, batch) for batch in ack.batches)

    assert pubacked == [item.inbound for item in items][: len(pubacked)]
    released = items[: len(pubacked)]
    assert acked == {(i.batch.vin, i.batch.batch) for i in released if i.batch is not None}
    if len(committed) == len(tickets):
        assert len(pubacked) == len(items)

