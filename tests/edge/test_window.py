"""The publisher's send window without a broker or a spool: what goes next, resends, acks."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from revline.edge.window import BACKLOG, SendWindow, resend_timeout

TIMEOUT = 10.0


def window(*, inflight_max: int = 20, unacked_max: int = 100) -> SendWindow:
    return SendWindow(inflight_max=inflight_max, unacked_max=unacked_max, ack_timeout_s=TIMEOUT)


def test_the_ack_timeout_doubles_per_send_up_to_eight_times() -> None:
    """The wait for the end-to-end ack is 1x, 2x, 4x, then 8x the ack timeout, never more."""
    assert [resend_timeout(TIMEOUT, n) for n in range(1, 7)] == [10, 20, 40, 80, 80, 80]


def test_a_batch_is_resent_once_its_ack_is_overdue_and_waits_longer_each_time() -> None:
    """Without an ack a sent batch is due again after the timeout, then after twice as long."""
    w = window()
    assert not w.sent(7, lo=0, samples=10, mid=1, now=0.0)
    w.puback(1)
    w.pubacks_recorded()
    assert w.next_send(TIMEOUT - 0.1, backlog_start=None) is None
    assert w.next_send(TIMEOUT, backlog_start=None) == 7
    assert w.sent(7, lo=0, samples=10, mid=2, now=TIMEOUT)  # a resend
    assert w.next_send(TIMEOUT, backlog_start=None) is None  # in flight: not due again
    w.puback(2)
    w.pubacks_recorded()
    assert w.next_send(TIMEOUT + 2 * TIMEOUT - 0.1, backlog_start=None) is None
    assert w.next_send(TIMEOUT + 2 * TIMEOUT, backlog_start=None) == 7


def test_resends_and_backlog_go_oldest_first() -> None:
    """A due resend goes before backlog that is newer than it, after backlog that is older."""
    w = window()
    w.sent(1, lo=500, samples=100, mid=1, now=0.0)
    w.sent(2, lo=900, samples=100, mid=2, now=0.0)
    w.lost()  # both due at once
    assert w.next_send(0.0, backlog_start=100) == BACKLOG
    assert w.next_send(0.0, backlog_start=600) == 1
    w.sent(1, lo=500, samples=100, mid=3, now=0.0)
    assert w.next_send(0.0, backlog_start=600) == BACKLOG
    assert w.next_send(0.0, backlog_start=None) == 2


def test_the_live_tail_may_go_first_until_the_window_is_full() -> None:
    """Live data may start a fill while both limits allow it; at shutdown only PUBACKs count."""
    w = window(inflight_max=2, unacked_max=3)
    assert w.may_send_live()
    w.sent(0, lo=0, samples=1, mid=1, now=0.0)
    w.sent(1, lo=1, samples=1, mid=2, now=0.0)
    assert not w.may_send_live()  # two messages wait for a PUBACK
    assert w.next_send(0.0, backlog_start=5) is None
    w.puback(1)
    w.puback(2)
    w.pubacks_recorded()
    w.sent(2, lo=2, samples=1, mid=3, now=0.0)
    w.puback(3)
    w.pubacks_recorded()
    assert w.unacked == 3
    assert not w.may_send_live()  # three batches wait for their ack
    assert w.may_send_live(final=True)
    assert w.next_send(0.0, backlog_start=5) is None  # no backlog beyond the unacked limit


def test_a_due_resend_goes_even_when_the_unacked_limit_is_reached() -> None:
    """The unacked limit holds back new batches, never the resend of an old one."""
    w = window(unacked_max=1)
    w.sent(0, lo=0, samples=1, mid=1, now=0.0)
    w.lost()
    assert w.next_send(0.0, backlog_start=10) == 0


def test_an_ack_is_believed_only_after_the_puback() -> None:
    """An ack naming a batch the broker has not taken is ignored, and believed once it has."""
    w = window()
    w.sent(4, lo=0, samples=10, mid=9, now=0.0)
    verdict = w.ack([4], next_batch=5)
    assert (verdict.believed, verdict.not_pubacked, verdict.unknown) == ([], [4], [])
    assert w.unrecorded_acks() == []
    w.puback(9)  # before the spool recorded it: an ack in the same network pass counts
    assert w.ack([4], next_batch=5).believed == [4]
    assert w.unrecorded_acks() == [4]
    assert w.acks_recorded() == 1
    assert 4 not in w
    assert w.inflight == 1  # the PUBACK itself is still to be recorded
    w.pubacks_recorded()
    assert w.empty


def test_acks_for_batches_never_made_are_unknown_and_repeats_are_harmless() -> None:
    """Ids at or past the next batch id are unknown; older ids not in the window are repeats."""
    w = window()
    verdict = w.ack([3, 5, 6], next_batch=5)
    assert (verdict.believed, verdict.not_pubacked, verdict.unknown) == ([], [], [5, 6])


def test_a_lost_connection_makes_every_unpubacked_batch_due_at_once() -> None:
    """After a lost connection, batches waiting for a PUBACK are sent again, PUBACKed ones not."""
    w = window()
    w.sent(0, lo=0, samples=1, mid=1, now=0.0)
    w.sent(1, lo=1, samples=1, mid=2, now=0.0)
    w.puback(1)
    w.pubacks_recorded()
    w.puback(2)  # arrived, but the connection went before the spool recorded it
    w.lost()
    assert w.unrecorded_pubacks() == []
    assert w.inflight == 0
    assert w.next_send(0.0, backlog_start=None) == 1
    assert w.ack([0, 1], next_batch=2).believed == [0, 1]  # the broker did take both


def test_a_refused_publish_is_resent_after_the_ack_timeout() -> None:
    """A PUBACK with an error frees the slot; the batch goes again when its ack is overdue."""
    w = window()
    w.sent(0, lo=0, samples=1, mid=1, now=0.0)
    w.refused(1)
    assert w.inflight == 0
    assert w.next_send(1.0, backlog_start=None) is None
    assert w.next_send(TIMEOUT, backlog_start=None) == 0
    assert w.ack([0], next_batch=1).not_pubacked == [0]


def test_batches_of_an_earlier_run_are_due_at_once() -> None:
    """Unacked batches found at start go first by age; a PUBACKed one's ack is believed."""
    w = window()
    w.resume(3, lo=300, samples=100, pubacked=False)
    w.resume(2, lo=200, samples=100, pubacked=True)
    assert w.next_send(0.0, backlog_start=None) == 2
    assert w.ack([2, 3], next_batch=4).believed == [2]


def test_an_evicted_batch_is_forgotten() -> None:
    """A batch the spool evicted is never sent again nor waited for."""
    w = window()
    w.sent(0, lo=0, samples=1, mid=1, now=0.0)
    w.refused(1)
    w.forget([0])
    assert w.next_send(TIMEOUT, backlog_start=None) is None
    assert w.empty


def test_nothing_is_forgotten_before_the_spool_has_recorded_it() -> None:
    """PUBACKs and acks stay pending until confirmed recorded; a failed write loses neither."""
    w = window()
    w.sent(0, lo=0, samples=1, mid=1, now=0.0)
    w.puback(1)
    assert w.unrecorded_pubacks() == [0]
    assert w.unrecorded_pubacks() == [0]  # asked again (the spool write failed): still there
    w.pubacks_recorded()
    assert w.unrecorded_pubacks() == []
    w.ack([0], next_batch=1)
    w.ack([0], next_batch=1)  # a resend acked twice
    assert w.unrecorded_acks() == [0]
    w.lost()  # the spool failed, the connection was started over: the ack is still true
    assert w.unrecorded_acks() == [0]
    assert w.acks_recorded() == 1
    assert w.unrecorded_acks() == []


def test_limits_are_checked() -> None:
    """A window that could never send is a bug, refused at once."""
    with pytest.raises(ValueError, match="inflight_max"):
        SendWindow(inflight_max=0, unacked_max=1, ack_timeout_s=1.0)


# --- the window driven by a simulated spool and network -----------------------------------------


@dataclass
class Run:
    """The publisher's loop reduced to its decisions: a spool of ``backlog`` batches of 10 seqs,
    a network that PUBACKs, refuses, drops and acks as the test says."""

    w: SendWindow
    backlog: list[int]  # first seq of each batch still to take, oldest first
    now: float = 0.0
    next_batch: int = 0
    next_mid: int = 0
    los: dict[int, int] = field(default_factory=dict)  # batch id -> lo
    wire: dict[int, int] = field(default_factory=dict)  # mid -> batch id, sent, not PUBACKed
    taken: set[int] = field(default_factory=set)  # batch ids the broker has PUBACKed
    durable: set[int] = field(default_factory=set)
    sends: list[tuple[str, int]] = field(default_factory=list)

    def fill(self) -> None:
        while (
            step := self.w.next_send(self.now, self.backlog[0] if self.backlog else None)
        ) is not None:
            if step == BACKLOG:
                batch_id, lo = self.next_batch, self.backlog.pop(0)
                self.next_batch += 1
                self.los[batch_id] = lo
                self.sends.append(("backlog", lo))
            else:
                assert isinstance(step, int)
                batch_id, lo = step, self.los[step]
                self.sends.append(("resend", lo))
            self.next_mid += 1
            self.wire[self.next_mid] = batch_id
            self.w.sent(batch_id, lo, 10, self.next_mid, self.now)
            assert self.w.inflight <= self.w.inflight_max
            assert self.w.unacked <= self.w.unacked_max

    def puback(self, k: int, *, refuse: bool = False) -> None:
        if not self.wire:
            return
        mid = sorted(self.wire)[k % len(self.wire)]
        batch_id = self.wire.pop(mid)
        if refuse:
            self.w.refused(mid)
        else:
            self.taken.add(batch_id)
            self.w.puback(mid)

    def consumer_acks(self) -> None:
        """The consumer acks what the broker took (and only that)."""
        self.w.ack(sorted(self.taken), self.next_batch)

    def record(self) -> None:
        believed = self.w.unrecorded_acks()
        assert set(believed) <= self.taken  # never believed without a PUBACK
        self.w.pubacks_recorded()
        self.durable |= set(believed)
        self.w.acks_recorded()


OPS = st.lists(
    st.tuples(
        st.sampled_from(["fill", "puback", "refuse", "ack", "forge", "lose", "record", "wait"]),
        st.integers(0, 50),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=OPS,
    batches=st.integers(0, 30),
    inflight_max=st.integers(1, 5),
    unacked_max=st.integers(1, 8),
)
def test_every_batch_is_eventually_acked_and_none_without_a_puback(
    ops: list[tuple[str, int]], batches: int, inflight_max: int, unacked_max: int
) -> None:
    """Whatever the network does, no forged or early ack is believed, the limits hold, and once
    the network behaves every batch is sent, PUBACKed and acked, the oldest first."""
    run = Run(
        window(inflight_max=inflight_max, unacked_max=unacked_max), [i * 10 for i in range(batches)]
    )
    for op, k in ops:
        if op == "fill":
            run.fill()
        elif op in {"puback", "refuse"}:
            run.puback(k, refuse=op == "refuse")
        elif op == "ack":
            run.consumer_acks()
        elif op == "forge":  # anyone on the broker: ids of ours not yet taken, and future ones
            run.w.ack([k % (run.next_batch + 1), run.next_batch + k], run.next_batch)
        elif op == "lose":
            run.wire.clear()
            run.w.lost()
        elif op == "record":
            run.record()
        else:
            run.now += k
    # The network behaves from here on: everything must drain, in bounded time.
    for _ in range(4 * batches + 10):
        run.fill()
        while run.wire:
            run.puback(0)
        run.consumer_acks()
        run.record()
        run.now += resend_timeout(TIMEOUT, 99)
    assert run.w.empty
    assert not run.backlog
    assert run.durable == set(range(run.next_batch)) == run.taken
    firsts = [lo for kind, lo in run.sends if kind == "backlog"]
    assert firsts == sorted(firsts)  # the backlog goes oldest first
