"""``revline audit``'s arguments and errors: one line each, and an exit status that says which."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from revline.audit.cli import parse_since
from revline.settings import ConfigError
from tests.fixtures.audit import audit
from tests.fixtures.services import free_port

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", NOW - timedelta(seconds=90)),
        ("15m", NOW - timedelta(minutes=15)),
        ("6h", NOW - timedelta(hours=6)),
        ("2d", NOW - timedelta(days=2)),
        ("2024-05-31T00:00:00", datetime(2024, 5, 31, tzinfo=UTC)),
        ("2024-05-31T02:00:00+02:00", datetime(2024, 5, 31, tzinfo=UTC)),
    ],
)
def test_since_takes_a_duration_back_from_now_or_a_time(text: str, expected: datetime) -> None:
    """--since 6h is six hours before now; an ISO time without a zone is UTC."""
    assert parse_since(text, NOW) == expected


def test_a_since_that_is_neither_is_a_config_error_naming_the_key() -> None:
    """--since yesterday is refused with the key named."""
    with pytest.raises(ConfigError, match="since"):
        parse_since("yesterday", NOW)


def test_a_bad_vin_and_an_unreachable_database_are_one_line_each(database_url: str) -> None:
    """A malformed VIN exits 2, a database nobody listens on exits 3, one that was never
    migrated exits 3 saying to migrate; each says so in one line."""
    code, out = audit(database_url, "NOT-A-VIN")
    assert (code, len(out.strip().splitlines())) == (2, 1)
    assert "vin" in out
    code, out = audit(f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    assert (code, len(out.strip().splitlines())) == (3, 1)
    assert "database unreachable" in out
    code, out = audit(database_url)
    assert (code, out.strip()) == (
        3,
        "revline audit: database has no audit tables: run `revline migrate`",
    )
