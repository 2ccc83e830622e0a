"""Consumers in a shared group: stable member ids, a short member session, and an orphaned
member (killed, replaced under another client id) that stops swallowing traffic in bounded time.

Mosquitto hands an offline member of a shared subscription its share of the messages, into its
saved session. A member that died and came back under a new client id leaves such a session
behind: until it expires, it swallows that share, and the devices' resends too.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from revline.consumer.config import (
    GROUP_SESSION_EXPIRY_S,
    LONE_SESSION_EXPIRY_S,
    load_settings,
    startup_warnings,
)
from revline.edge.config import EdgeSettings
from revline.edge.publisher import resend_timeout
from revline.edge.spool import DURABLE, SpoolReader
from revline.settings import ConfigError
from tests.fixtures.broker import MqttClient
from tests.fixtures.consumer import ConsumerFactory, ConsumerProcess, cold_counts
from tests.fixtures.edge import StoppableSim, running_edge, spool_read, spool_settled
from tests.fixtures.services import MosquittoFactory, wait_until

SAMPLES = "revline_consumer_samples_total"


def test_a_group_member_gets_a_short_session_and_a_lone_consumer_a_long_one() -> None:
    """Unset, the session expiry is a minute in a group and a day alone; set, it is as set."""
    member = load_settings(environ={}, flags={"group": "g", "client_id": "m1"})
    lone = load_settings(environ={})
    flags = {"group": "g", "client_id": "m1", "session_expiry_s": 7}
    chosen = load_settings(environ={}, flags=flags)
    assert member.effective_session_expiry_s == GROUP_SESSION_EXPIRY_S
    assert lone.effective_session_expiry_s == LONE_SESSION_EXPIRY_S
    assert GROUP_SESSION_EXPIRY_S < LONE_SESSION_EXPIRY_S
    assert chosen.effective_session_expiry_s == 7


def test_a_member_id_is_the_login_and_never_the_hostname() -> None:
    """With a login the client id defaults to it; a member with neither id nor login is refused."""
    env = {"MQTT_URL": "mqtt://revline-consumer-2:secret@broker:1883"}
    assert load_settings(environ=env, flags={"group": "g"}).effective_client_id == (
        "revline-consumer-2"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, flags={"group": "g"})
    assert info.value.key == "client_id"
    assert "\n" not in str(info.value)


def test_a_member_is_warned_at_start_what_an_orphan_costs() -> None:
    """The start-up warning names the member, its session expiry and what to do."""
    member = load_settings(environ={}, flags={"group": "g", "client_id": "m1"})
    (warning,) = startup_warnings(member)
    assert "'m1'" in warning
    assert f"session_expiry_s={GROUP_SESSION_EXPIRY_S} s" in warning
    assert startup_warnings(load_settings(environ={})) == []


def _swallowed(spool: str) -> bool:
    # A batch without its end-to-end ack while later ones have theirs: a consumer acks in arrival
    # order, so no live member holds it; it sits in the dead member's session.
    states = spool_read(spool, SpoolReader.batch_states)
    ids = sorted(states)
    return any(
        states[batch] < DURABLE
        and sum(1 for later in ids if later > batch and states[later] == DURABLE) >= 3
        for batch in ids
    )


def test_a_member_killed_and_replaced_under_a_new_id_loses_nothing_within_the_bound(
    make_mosquitto: MosquittoFactory,
    database_url: str,
    unique_vin: str,
    tmp_path: Path,
    make_consumer: ConsumerFactory,
) -> None:
    """Members a and b, b killed -9, c started instead: every sample is stored exactly once
    within session expiry + 8 x ack timeout, and the broker has forgotten b's session."""
    expiry_s, ack_timeout_s = 4, 2.0
    # The longest a batch can wait for its next resend, so the longest after b's session
    # expired (docs/consumer.md states this bound with the production values).
    bound_s = expiry_s + resend_timeout(ack_timeout_s, attempts=99)
    broker = make_mosquitto()
    group = f"g{unique_vin.lower()}"
    args = ["--group", group, "--session-expiry-s", str(expiry_s), "--batch-max-age-ms", "50"]
    spool = str(tmp_path / "spool.db")
    settings = EdgeSettings(
        vin=unique_vin,
        mqtt_url=broker.url,
        spool_path=spool,
        clock="trusted",
        batch_max_age_s=0.2,
        ack_timeout_s=ack_timeout_s,
        shutdown_timeout_s=10.0,
    )
    sampling = threading.Event()
    source = StoppableSim(sampling, hz=10.0, speedup=20.0)  # 200 samples/s, ~5 batches/s

    def member(name: str) -> ConsumerProcess:
        return make_consumer(mqtt_url=broker.url, client_id=name, args=args)

    orphan = f"b-{unique_vin}"
    with running_edge(settings, source=source):
        a = member(f"a-{unique_vin}")
        b = member(orphan)
        wait_until(lambda: a.metric(SAMPLES) > 0 < b.metric(SAMPLES), what="both storing")
        b.kill()
        wait_until(lambda: _swallowed(spool), what="a batch stuck in b's session", every=0.05)
        c = member(f"c-{unique_vin}")
        wait_until(lambda: c.metric(SAMPLES) > 0, what="the replacement storing")
        sampling.set()
        wait_until(
            lambda: spool_settled(spool, lambda: cold_counts(database_url, unique_vin)[0]),
            what=f"every sample stored within {bound_s} s (+ 20 s for a loaded machine)",
            timeout=bound_s + 20,
        )
        total = spool_read(spool, SpoolReader.sample_count)
        assert cold_counts(database_url, unique_vin) == (total, total)
        probe = MqttClient(broker.port, None, None, client_id=orphan, clean_start=False)
        probe.close()
        assert not probe.session_present  # expired: nothing is routed to b any more
        assert "group member" in a.log_text()


def test_three_members_on_separate_processes_lose_nothing_when_one_is_killed_for_good(
    make_mosquitto: MosquittoFactory,
    database_url: str,
    unique_vin: str,
    tmp_path: Path,
    make_consumer: ConsumerFactory,
) -> None:
    """Three separate `revline consumer` processes in one group (as on three hosts), one killed
    -9 and never replaced, a real edge publishing and resending: every sample is stored exactly
    once within the orphan's session expiry + 8 x ack timeout, by the two that remain."""
    expiry_s, ack_timeout_s = 4, 2.0
    bound_s = expiry_s + resend_timeout(ack_timeout_s, attempts=99)
    broker = make_mosquitto()
    group = f"g{unique_vin.lower()}"
    args = ["--group", group, "--session-expiry-s", str(expiry_s), "--batch-max-age-ms", "50"]
    spool = str(tmp_path / "spool.db")
    settings = EdgeSettings(
        vin=unique_vin,
        mqtt_url=broker.url,
        spool_path=spool,
        clock="trusted",
        batch_max_age_s=0.2,
        ack_timeout_s=ack_timeout_s,
        shutdown_timeout_s=10.0,
    )
    sampling = threading.Event()
    source = StoppableSim(sampling, hz=10.0, speedup=20.0)

    def member(name: str) -> ConsumerProcess:
        return make_consumer(mqtt_url=broker.url, client_id=name, args=args)

    with running_edge(settings, source=source):
        members = [member(f"{m}-{unique_vin}") for m in "abc"]
        wait_until(
            lambda: all(m.metric(SAMPLES) > 0 for m in members), what="all three storing"
        )
        members[1].kill()
        stored_at_kill = cold_counts(database_url, unique_vin)[0]
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] > stored_at_kill + 200,
            what="the two others storing on",
        )
        sampling.set()
        wait_until(
            lambda: spool_settled(spool, lambda: cold_counts(database_url, unique_vin)[0]),
            what=f"every sample stored within {bound_s} s (+ 20 s for a loaded machine)",
            timeout=bound_s + 20,
        )
        total = spool_read(spool, SpoolReader.sample_count)
        assert total > stored_at_kill
        assert cold_counts(database_url, unique_vin) == (total, total)
        alive = members[0].metric(SAMPLES) + members[2].metric(SAMPLES)
        assert alive >= total - stored_at_kill  # the survivors carried the rest
