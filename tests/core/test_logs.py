"""The one rate limit for recurring log lines, and the one place library noise is silenced."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from revline.logs import Throttle, ThrottledLog, quiet_libraries


def test_a_throttle_says_the_first_event_at_once_then_one_line_per_interval() -> None:
    """Events every second for 95 s: lines at 0, 30, 60 and 90 s, each counting its events."""
    throttle = Throttle(30.0)
    lines = [(t, n) for t in range(96) if (n := throttle.event(float(t)))]
    assert lines == [(0, 1), (30, 30), (60, 30), (90, 30)]
    assert throttle.total == 96
    assert throttle.held == 92
    assert throttle.reset() == 92
    assert throttle.event(200.0) == 1  # after the trouble is over the next event is news again


def test_a_throttle_says_a_new_kind_at_once_and_limits_each_kind_apart() -> None:
    """A second kind of fault is logged at once, not held back behind the first kind's line."""
    throttle = Throttle(10.0)
    assert throttle.event(0.0, "08006") == 1
    assert throttle.event(1.0, "08006") == 0
    assert throttle.event(2.0, "53300") == 1
    assert throttle.event(3.0, "53300") == 0
    assert throttle.event(11.0, "08006") == 2
    assert throttle.pending() == ["53300"]


def test_a_held_back_count_is_reported_when_due_or_forced() -> None:
    """What was held back comes out with the next due line, or at once when forced (at stop)."""
    throttle = Throttle(60.0)
    assert throttle.event(0.0) == 1
    assert [throttle.event(float(t)) for t in range(1, 4)] == [0, 0, 0]
    assert throttle.due(30.0) == 0
    assert throttle.due(30.0, force=True) == 3
    assert throttle.due(31.0, force=True) == 0  # nothing left to say


def test_a_throttle_keeps_a_bounded_number_of_kinds() -> None:
    """Errors of ever new kinds (hostile input naming them) cannot grow its memory."""
    throttle = Throttle(10.0)
    for key in range(1000):
        assert throttle.event(0.0, str(key)) == 1
    assert len(throttle.pending()) <= 64


def test_a_throttled_log_writes_the_count_with_the_latest_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The logger shell writes what the Throttle decides, with the latest event's fields."""
    now = [0.0]
    logger = logging.getLogger("revline.test.throttled")
    log = ThrottledLog(logger, logging.WARNING, "broker down", every_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="revline.test.throttled"):
        log(error="refused")
        for t in range(1, 5):
            now[0] = float(t)
            log(error=f"refused {t}")
        now[0] = 61.0
        log.tick()
        log(error="late")
        log.tick(force=True)
    lines = [(r.getMessage(), r.__dict__["fields"]) for r in caplog.records]
    assert lines == [
        ("broker down", {"count": 1, "error": "refused"}),
        ("broker down", {"count": 4, "error": "refused 4"}),
        ("broker down (earlier, not reported yet)", {"count": 1, "error": "late"}),
    ]
    assert log.total == 6


def test_library_noise_is_silenced_unless_debugging() -> None:
    """python-OBD's own console handler goes and its lines wait for --log-level debug."""
    obd = logging.getLogger("obd")
    saved = (obd.handlers[:], obd.level, obd.propagate)
    try:
        obd.addHandler(logging.StreamHandler())  # what python-OBD does when imported
        quiet_libraries(logging.INFO)
        assert obd.handlers == []
        assert not obd.isEnabledFor(logging.ERROR)
        assert not logging.getLogger("pint.util").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("stamina").isEnabledFor(logging.WARNING)
        quiet_libraries(logging.DEBUG)
        assert obd.isEnabledFor(logging.DEBUG)
    finally:
        obd.handlers[:], obd.level, obd.propagate = saved
        quiet_libraries(logging.getLogger().level)


def test_importing_python_obd_and_pint_says_nothing_at_info() -> None:
    """The edge's start used to print three pint warnings; after setup they are silent."""
    code = (
        "import logging; from revline.logs import setup_logging, quiet_libraries\n"
        "setup_logging('info')\n"
        "import obd\n"
        "quiet_libraries()\n"
        "logging.getLogger('obd.elm327').error('could not open port')\n"
        "logging.getLogger('revline.edge').info('edge starting')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONWARN")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1
    assert "edge starting" in lines[0]
