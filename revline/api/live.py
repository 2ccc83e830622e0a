"""The live feed: one LISTEN connection, fanned out to every open live stream.

The consumer's writes (and HTTP ingest's) NOTIFY ``revline_state`` (and ``revline_dtc`` for
trouble-code changes) with ``<vin> <ts>`` after commit (:mod:`revline.storage.notify`).
:class:`Hub` holds one connection listening to them and to ``revline_api_keys`` (revocations),
and marks each :class:`Subscription` that cares about the vin. A subscription keeps only *which*
vehicles changed (latest ts per vin), never a queue of events: a slow client costs at most one
entry per vehicle, and it re-reads the hot table for what changed.

If the listening connection is lost, notifications sent meanwhile are gone: on reconnect every
subscription is told to resync (re-read everything it shows), and the key cache is dropped (a
revocation may have been missed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, Final

import asyncpg

from revline.api.keys import KEYS_CHANNEL
from revline.backoff import backoff_delay
from revline.logs import kv
from revline.storage.errors import describe
from revline.storage.notify import DTC_CHANNEL, STATE_CHANNEL, parse_state_payload

__all__ = ["Hub", "Subscription"]

log = logging.getLogger("revline.api.live")

_PING_EVERY_S: Final = 10.0
"""A listening connection is pinged this often: a dead TCP peer is otherwise never noticed."""


class Subscription:
    """What one live stream is waiting for: changed vehicles, and whether to resync."""

    def __init__(self, channel: str, wants: Callable[[str], bool]) -> None:
        self.channel = channel
        self.wants = wants
        self.changed: dict[str, int] = {}
        self.resync = False
        self.closed = False
        """The server is stopping: end the stream."""
        self.wake = asyncio.Event()

    def take(self) -> tuple[dict[str, int], bool]:
        """The vehicles changed since the last call (vin -> newest ts, µs) and the resync flag."""
        changed, resync = self.changed, self.resync
        self.changed, self.resync = {}, False
        self.wake.clear()
        return changed, resync


class Hub:
    """One LISTEN connection for the whole server; :meth:`run` keeps it up."""

    def __init__(
        self,
        dsn: str,
        *,
        on_revoked: Callable[[str | None], None],
        connect_timeout_s: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._on_revoked = on_revoked
        self._connect_timeout_s = connect_timeout_s
        self._subscriptions: set[Subscription] = set()
        self.listening = asyncio.Event()
        self.notifications = 0

    @contextlib.contextmanager
    def subscribe(self, channel: str, wants: Callable[[str], bool]) -> Iterator[Subscription]:
        """A subscription to ``channel`` (``revline_state`` or ``revline_dtc``) for the vehicles
        ``wants`` accepts, removed when the block ends."""
        subscription = Subscription(channel, wants)
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    def close_streams(self) -> None:
        """Tell every live stream to end (the server is stopping)."""
        for subscription in self._subscriptions:
            subscription.closed = True
            subscription.wake.set()

    @property
    def subscribers(self) -> int:
        """Live streams open now."""
        return len(self._subscriptions)

    def _on_state(self, _c: Any, _pid: int, channel: str, payload: str) -> None:
        parsed = parse_state_payload(payload)
        if parsed is None:
            return
        self.notifications += 1
        vin, ts = parsed
        for subscription in self._subscriptions:
            if subscription.channel == channel and subscription.wants(vin):
                if ts > subscription.changed.get(vin, -1):
                    subscription.changed[vin] = ts
                subscription.wake.set()

    def _on_key(self, _c: Any, _pid: int, _channel: str, payload: str) -> None:
        self._on_revoked(payload)

    def _lost(self) -> None:
        self.listening.clear()
        for subscription in self._subscriptions:
            subscription.resync = True
            subscription.wake.set()

    async def run(self) -> None:
        """Listen until cancelled; reconnect with backoff, one log line per failure kind."""
        failures = 0
        last_error = ""
        while True:
            try:
                connection = await asyncpg.connect(self._dsn, timeout=self._connect_timeout_s)
            except Exception as exc:  # noqa: BLE001 - an outage: wait and retry, never stop
                failures += 1
                error = describe(exc)
                if error != last_error:
                    log.warning("live feed: database unreachable; retrying", extra=kv(error=error))
                    last_error = error
                await asyncio.sleep(backoff_delay(failures, initial=0.5, maximum=15.0))
                continue
            try:
                await self._listen(connection)
            except Exception as exc:  # noqa: BLE001 - connection lost: reconnect
                error = describe(exc)
                log.warning("live feed: connection lost; reconnecting", extra=kv(error=error))
            finally:
                self._lost()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), timeout=2)
            if failures or last_error:
                log.info("live feed: listening again")
            failures, last_error = 0, ""

    async def _listen(self, connection: Any) -> None:
        gone = asyncio.Event()
        connection.add_termination_listener(lambda _c: gone.set())
        await connection.add_listener(STATE_CHANNEL, self._on_state)
        await connection.add_listener(DTC_CHANNEL, self._on_state)
        await connection.add_listener(KEYS_CHANNEL, self._on_key)
        self._on_revoked(None)  # anything revoked while we were not listening
        self.listening.set()
        while not gone.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), timeout=_PING_EVERY_S)
                break
            await connection.fetchval("SELECT 1", timeout=_PING_EVERY_S)
        raise ConnectionError("listening connection closed")
