"""Fixtures of the API tests: ``revline api`` processes on the test's migrated database, and keys
made in that database."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from revline.api.keys import add_key
from tests.fixtures.api import (
    ACCEPT_T0,
    ApiFactory,
    ApiProcess,
    KeyMaker,
    run,
    with_connection,
)


@pytest.fixture
def make_api(migrated_db: str) -> Iterator[ApiFactory]:
    """Factory of started ``revline api`` processes on the test's database, closed after it."""
    made: list[ApiProcess] = []

    def make(args: Sequence[str] = ()) -> ApiProcess:
        api = ApiProcess(migrated_db, [*ACCEPT_T0, *args])
        made.append(api)
        return api.start()

    yield make
    for api in reversed(made):
        print(f"--- log of revline api on port {api.port} ---\n{api.log_text()[-6000:]}")
        api.close()


@pytest.fixture
def api(make_api: ApiFactory) -> ApiProcess:
    """One started API with generous rate limits."""
    return make_api(["--rate-per-s", "10000", "--burst", "10000"])


@pytest.fixture
def make_key(migrated_db: str) -> KeyMaker:
    """Make a key with the given scopes in the test's database; returns the key."""

    def make(*scopes: str, name: str = "test", rate_per_s: float | None = None,
             burst: int | None = None) -> str:
        async def work(connection: Any) -> str:
            _, key = await add_key(
                connection, name, scopes, rate_per_s=rate_per_s, burst=burst
            )
            return key

        key: str = run(with_connection(migrated_db, work))
        return key

    return make


