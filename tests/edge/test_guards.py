"""Edge guards without servers: config bounds, start errors, dead-letter bounds, log throttling."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest

from revline.edge.config import EdgeSettings, load_edge_settings
from revline.edge.publisher import Publisher, ThrottledLog, guarded
from revline.edge.spool import DEAD_LETTER_MAX_ROWS, DeadLetter, Spool, pack_values
from revline.edge.status import format_status, read_dead_letters, read_status
from revline.settings import ConfigError
from revline.tools.localservices import free_port
from tests.fixtures.services import wait_until

VIN = "1HGCM82633A004352"
ROOT = Path(__file__).resolve().parents[2]
T0 = 1_750_000_000.0  # test data time, s: never the wall clock


def numeric_settings() -> list[tuple[str, type]]:
    """Every int or float key of the edge settings (optional ones included)."""
    info = msgspec.inspect.type_info(EdgeSettings)
    assert isinstance(info, msgspec.inspect.StructType)
    found: list[tuple[str, type]] = []
    for field in info.fields:
        union = isinstance(field.type, msgspec.inspect.UnionType)
        kinds = field.type.types if union else (field.type,)  # type: ignore[attr-defined]
        for kind in kinds:
            if isinstance(kind, msgspec.inspect.IntType):
                found.append((field.name, int))
            elif isinstance(kind, msgspec.inspect.FloatType):
                found.append((field.name, float))
    return found


def test_every_numeric_setting_refuses_absurd_values_naming_the_key() -> None:
    """No number is unbounded: 1e300, inf and 2**63-1 stop the start with the key named."""
    keys = numeric_settings()
    assert len(keys) >= 20  # the introspection found the settings, not nothing
    for key, kind in keys:
        absurd = ["1e300", "inf", "nan"] if kind is float else [str(2**63 - 1), "-1"]
        for value in absurd:
            env = {"REVLINE_EDGE_VIN": VIN, f"REVLINE_EDGE_{key.upper()}": value}
            with pytest.raises(ConfigError) as caught:
                load_edge_settings(environ=env)
            assert caught.value.key == key, (key, value, str(caught.value))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "revline.cli", "edge", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


# Nothing listens on port 1: a test that got past the check it meant to test could not reach
# any broker, let alone the machine's shared one.
NOWHERE = "mqtt://127.0.0.1:1"


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("ack_timeout_s = 1e300", "ack_timeout_s"),
        ("spool_max_mb = 1e30", "spool_max_mb"),
        ("batch_max_age_s = inf", "batch_max_age_s"),
    ],
)
def test_absurd_values_from_the_issue_stop_revline_edge_with_one_line(
    tmp_path: Path, line: str, key: str
) -> None:
    """``revline edge`` with such a TOML value exits 2 with one line naming the key."""
    config = tmp_path / "edge.toml"
    config.write_text(f'vin = "{VIN}"\nmqtt_url = "{NOWHERE}"\n{line}\n')
    done = run_cli("--config", str(config), "--spool-path", str(tmp_path / "s.db"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"config error: {key} (file {config})" in done.stderr
    assert not (tmp_path / "s.db").exists()


def test_unusable_spool_path_and_tls_file_are_one_line_and_a_nonzero_exit(
    tmp_path: Path,
) -> None:
    """A spool path that cannot be created, or a missing CA file: one line, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # root can write anywhere, but not under a file
    spool = run_cli(
        "--vin", VIN, "--clock", "trusted", "--mqtt-url", NOWHERE,
        "--spool-path", str(blocker / "spool.db"),
    )  # fmt: skip
    assert spool.returncode == 1
    expected = f"revline edge: cannot open the spool {blocker / 'spool.db'} (spool_path): "
    assert spool.stderr.startswith(expected), spool.stderr
    assert spool.stderr.count("\n") == 1, spool.stderr

    env = {"REVLINE_EDGE_CA_FILE": str(tmp_path / "missing-ca.pem"), "PATH": "/usr/bin:/bin"}
    tls = run_cli(
        "--vin", VIN, "--mqtt-url", "mqtts://127.0.0.1:1", "--spool-path", str(tmp_path / "s.db"),
        env=env,
    )  # fmt: skip
    assert tls.returncode == 2
    assert tls.stderr.count("\n") == 1, tls.stderr
    assert "config error: ca_file: cannot read" in tls.stderr


def letter(i: int, size: int = 10, reason: str = "undecodable") -> DeadLetter:
    payload = bytes([i % 256]) * size
    return DeadLetter(
        received_at=T0 + i, topic=f"ack/{VIN}", reason=reason, detail=f"#{i}", payload=payload,
        size=size,
    )  # fmt: skip


def test_dead_letters_keep_the_newest_rows_and_count_the_rest(tmp_path: Path) -> None:
    """Past the row limit the oldest dead letters go, counted; status shows count and reason."""
    path = tmp_path / "s.db"
    with Spool(path) as spool:
        spool.dead_letter([letter(i) for i in range(DEAD_LETTER_MAX_ROWS)])
        spool.dead_letter([letter(DEAD_LETTER_MAX_ROWS + i, reason="invalid") for i in range(5)])
        spool.dead_letter([], unkept=7)  # a flood too fast to keep: counted all the same
    letters = read_dead_letters(path)
    assert len(letters) == DEAD_LETTER_MAX_ROWS
    assert [d.detail for d in letters[:2]] == [
        f"#{DEAD_LETTER_MAX_ROWS + 4}",
        f"#{DEAD_LETTER_MAX_ROWS + 3}",
    ]
    assert letters[-1].detail == "#5"  # #0-#4 evicted
    status = read_status(path, now=T0 + 2000)
    assert status.rejected == DEAD_LETTER_MAX_ROWS + 5 + 7
    assert status.rejected_kept == DEAD_LETTER_MAX_ROWS
    assert status.last_rejected_reason == "invalid"
    assert "bad acks         1012 dead-lettered (1000 kept), last invalid" in format_status(status)
    assert read_dead_letters(path, limit=3) == letters[:3]


def test_dead_letters_stay_within_a_small_share_of_the_spool_cap(tmp_path: Path) -> None:
    """A flood of big bad acks keeps at most cap/20 of payload and never evicts a sample."""
    path = tmp_path / "s.db"
    with Spool(path, max_bytes=1_000_000) as spool:  # spool_max_mb = 1, the smallest allowed
        assert spool.dead_letter_budget() == 50_000
        spool.write([(int(T0 * 1e6) + i, pack_values({"rpm": 800.0}), None) for i in range(2000)])
        for i in range(100):
            spool.dead_letter([letter(i, size=20_000)])
        spool.dead_letter([letter(100, size=3_000_000)])
        assert spool.enforce_cap() == (0, 0)
    letters = read_dead_letters(path)
    assert sum(len(d.payload) for d in letters) <= 50_000
    assert letters[0].size == 3_000_000  # the newest is kept, cut to the budget
    assert letters[0].payload == bytes([100]) * 50_000
    assert read_status(path).samples == 2000


def test_a_spool_from_before_dead_letters_reads_as_none(tmp_path: Path) -> None:
    """Status and the dead-letter reader work on a spool file that has no rejected table."""
    path = tmp_path / "old.db"
    with Spool(path) as spool:
        spool.db.execute("DROP TABLE rejected")
    assert read_dead_letters(path) == []
    assert read_status(path).rejected_kept == 0


def test_a_recurring_event_is_logged_once_per_interval_with_its_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first event is logged at once; the rest of the interval's go into the next line."""
    now = [0.0]
    logger = logging.getLogger("revline.test.throttle")
    throttled = ThrottledLog(logger, logging.WARNING, "bad thing", every_s=60, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="revline.test.throttle")
    for i in range(100):
        now[0] = i * 0.5  # 100 events in 50 s
        throttled(error=f"e{i}")
    throttled.tick()
    assert [r.fields for r in caplog.records] == [{"count": 1, "error": "e0"}]  # type: ignore[attr-defined]
    now[0] = 60.0
    throttled.tick()  # the interval is over: the 99 counted events are reported, once
    now[0] = 61.0
    throttled.tick()
    assert [r.fields["count"] for r in caplog.records] == [1, 99]  # type: ignore[attr-defined]
    assert caplog.records[1].fields["error"] == "e99"  # type: ignore[attr-defined]
    assert throttled.total == 100
    throttled(error="late")
    throttled(error="later")
    throttled.tick(force=True)  # at stop: the count is said, as something already past
    assert caplog.records[-1].getMessage() == "bad thing (earlier, not reported yet)"
    assert caplog.records[-1].fields == {"count": 2, "error": "later"}  # type: ignore[attr-defined]


def test_a_guarded_callback_reports_its_exception_instead_of_raising() -> None:
    """What a paho callback raises goes to the error handler, with the callback's name."""
    seen: list[tuple[str, str]] = []

    def on_message(payload: bytes) -> None:
        raise RecursionError(f"too deep: {len(payload)}")

    wrapped = guarded(lambda name, exc: seen.append((name, str(exc))))(on_message)
    wrapped(b"\x91" * 1000)
    assert seen == [("on_message", "too deep: 1000")]


def _first_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "broker unreachable; retrying"]


def test_each_failed_connection_is_one_line_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused, unresolvable, closed before CONNACK: a warning with the reason, no traceback."""
    caplog.set_level(logging.WARNING, logger="revline.edge.publisher")
    mute = socket.create_server(("127.0.0.1", 0))  # accepts, then hangs up: not MQTT (TLS...)

    def hang_up() -> None:
        with contextlib.suppress(OSError):
            while True:
                mute.accept()[0].close()

    threading.Thread(target=hang_up, daemon=True).start()
    cases = [
        (f"mqtt://127.0.0.1:{free_port()}", "Connection refused"),
        ("mqtt://no-such-host.invalid:1883", "no-such-host.invalid"),
        (f"mqtt://127.0.0.1:{mute.getsockname()[1]}", "connection closed before CONNACK"),
    ]
    try:
        for i, (url, _) in enumerate(cases):
            settings = EdgeSettings(vin=VIN, mqtt_url=url, spool_path=str(tmp_path / f"{i}.db"))
            with Spool(settings.spool_path) as spool:
                publisher = Publisher(settings, spool)
                thread = threading.Thread(target=publisher.run, daemon=True)
                thread.start()
                try:
                    lines = i + 1
                    wait_until(
                        lambda: len(_first_lines(caplog)) >= lines,  # noqa: B023
                        what=f"a line for {url}",
                        timeout=30,
                    )
                finally:
                    publisher.stop()
                    thread.join(30)
    finally:
        mute.close()
    # One line each, however many attempts (a count said at stop reads "(earlier, ...)").
    assert len(_first_lines(caplog)) == len(cases)
    for record, (url, reason) in zip(_first_lines(caplog), cases, strict=True):
        assert record.exc_info is None
        fields = record.fields  # type: ignore[attr-defined]
        assert fields["broker"] == url
        if reason != "no-such-host.invalid":  # resolver wording differs between libcs
            assert reason in fields["error"]
