"""The Litestar application: routes under ``/v1``, auth on each, errors as :class:`ErrorBody`.

Every handler checks the request's key first (:class:`~revline.api.auth.Authenticator`), then its
scope for the vehicle asked about. Database connections come from one read pool (a streamed
export holds one while it streams; a client that goes away gives it back at once) and, for
ingest, from the consumer's :class:`~revline.consumer.writer.Writer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlencode

import asyncpg
import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import Parameter
from litestar.response import Stream

from revline import __version__
from revline.api.auth import Authenticator, Principal
from revline.api.config import ApiSettings
from revline.api.errors import ApiError, ErrorBody
from revline.api.ingest import Ingest
from revline.api.live import Hub
from revline.api.metrics import ApiMetrics
from revline.api.models import (
    STATUS_COLUMNS,
    TRIP_COLUMNS,
    Trip,
    TroubleCode,
    VehicleList,
    VehicleStatus,
    VehicleSummary,
    status_from_row,
    trip_from_row,
)
from revline.api.queries import (
    Key,
    QueryError,
    TelemetryQuery,
    boundary_sql,
    copy_sql,
    decode_cursor,
    encode_cursor,
    from_us,
    parse_fields,
    parse_time,
    to_us,
)
from revline.contract import encode, encode_json, is_valid_vin
from revline.logs import kv
from revline.storage.errors import describe, is_data_error
from revline.storage.notify import DTC_CHANNEL, STATE_CHANNEL

__all__ = ["STATUS_SQL", "Resources", "create_app"]

log = logging.getLogger("revline.api")

_MSGPACK_TYPES: Final = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
_NDJSON: Final = "application/x-ndjson"
_CSV: Final = "text/csv; charset=utf-8"
_SSE: Final = "text/event-stream"
_STREAM_QUEUE: Final = 8
"""COPY chunks buffered between PostgreSQL and a slow client: beyond it, PostgreSQL waits."""
_ACQUIRE_TIMEOUT_S: Final = 10.0


class ExportError(Exception):
    """An export's COPY failed after its response had started."""


@dataclass
class Resources:
    """What the handlers share: settings, the read pool, the key checker, ingest, the hub."""

    settings: ApiSettings
    pool: Any
    auth: Authenticator
    ingest: Ingest
    hub: Hub
    streams: int = 0
    """Exports streaming now."""
    metrics: ApiMetrics | None = None


def _res(request: Request[Any, Any, Any]) -> Resources:
    resources: Resources = request.app.state["revline"]
    return resources


async def _principal(request: Request[Any, Any, Any]) -> Principal:
    return await _res(request).auth.check(request.headers)


def _check_vin(vin: str) -> None:
    if not is_valid_vin(vin):
        raise ApiError(404, "bad_vin", f"{vin[:40]!r} is not a VIN (17 of 0-9 A-Z without I, O, Q)")


@contextlib.asynccontextmanager
async def _connection(resources: Resources) -> AsyncIterator[Any]:
    """A connection of the read pool; 503 ``busy`` if none is free in time. Given back however
    the block ends (a client gone mid-stream cancels it: asyncpg's release resets it)."""
    try:
        connection = await resources.pool.acquire(timeout=_ACQUIRE_TIMEOUT_S)
    except TimeoutError:
        raise ApiError(
            503, "busy", "no database connection free; retry",
            headers={"Retry-After": str(resources.settings.retry_after_s)},
        ) from None
    try:
        yield connection
    finally:
        await resources.pool.release(connection)


# --- health ---


class Health(msgspec.Struct):
    """Whether the server can answer, and what it holds."""

    status: str
    database: bool
    live_feed: bool
    pool_size: int
    pool_idle: int
    streams: int
    live_streams: int


@get("/healthz", tags=["service"], summary="Health (no key needed)")
async def health(request: Request[Any, Any, Any]) -> Response[Health]:
    """200 when the database answers, else 503; with the read pool's connections in use."""
    resources = _res(request)
    ok = True
    try:
        await asyncio.wait_for(resources.pool.fetchval("SELECT 1"), timeout=5)
    except Exception:  # noqa: BLE001 - any failure means: not healthy
        ok = False
    body = Health(
        status="ok" if ok else "unavailable",
        database=ok,
        live_feed=resources.hub.listening.is_set(),
        pool_size=resources.pool.get_size(),
        pool_idle=resources.pool.get_idle_size(),
        streams=resources.streams,
        live_streams=resources.hub.subscribers,
    )
    return Response(body, status_code=200 if ok else 503)


@get("/metrics", tags=["service"], summary="Prometheus metrics (no key needed)",
     media_type="text/plain; version=0.0.4", include_in_schema=False)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Requests by handler and status, open streams, ingest outcomes."""
    resources = _res(request)
    assert resources.metrics is not None
    return Response(resources.metrics.render(), media_type="text/plain; version=0.0.4")


def _count_response(message: Any, scope: Any) -> None:
    """Litestar's before_send hook: one count per response, by handler name and status."""
    if message["type"] != "http.response.start":
        return
    handler = scope.get("route_handler")
    resources: Resources | None = scope["litestar_app"].state.get("revline")
    if resources is not None and resources.metrics is not None:
        name = getattr(handler, "handler_name", None) or "none"
        resources.metrics.requests.labels(name, str(message["status"])).inc()


# --- vehicles ---


@get("/v1/vehicles", tags=["vehicles"], summary="List vehicles (paged by VIN)")
async def vehicles(
    request: Request[Any, Any, Any],
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    after: str | None = None,
) -> VehicleList:
    """The vehicles this key may read that have sent data, by VIN; ``next`` is the ``after``
    of the following page."""
    principal = await _principal(request)
    scopes = principal.scopes
    if not scopes.reads_anything:
        raise ApiError(403, "forbidden", f"key {principal.key_id} may not read any vehicle")
    if after and not is_valid_vin(after):
        raise ApiError(400, "bad_query", "after: a VIN (the `next` of the previous page)")
    args: list[object] = [after or "", limit + 1]
    where = "vin > $1"
    if not scopes.read_all:
        args.append(sorted(scopes.read))
        where += " AND vin = ANY($3::text[])"
    async with _connection(_res(request)) as connection:
        rows = await connection.fetch(
            f"SELECT vin, ts, updated_at FROM vehicle_state WHERE {where} ORDER BY vin LIMIT $2",
            *args,
        )
    items = [VehicleSummary(r["vin"], r["ts"], r["updated_at"]) for r in rows[:limit]]
    return VehicleList(items=items, next=items[-1].vin if len(rows) > limit else None)


STATUS_SQL: Final = (
    f"SELECT {', '.join('s.' + c for c in STATUS_COLUMNS.split(', '))}, "
    "(SELECT json_agg(json_build_object('code', d.code, 'first_seen', d.first_seen, "
    "'last_seen', d.last_seen, 'detected_at', d.detected_at) ORDER BY d.code) "
    "FROM dtc_active d WHERE d.vin = s.vin) AS trouble_codes, "
    f"(SELECT row_to_json(t) FROM (SELECT {TRIP_COLUMNS} FROM trips "
    "WHERE trips.vin = s.vin ORDER BY start_ts DESC LIMIT 1) t) AS last_trip "
    "FROM vehicle_state s WHERE s.vin = ANY($1::text[]) ORDER BY s.vin"
)
"""A status in one statement (one snapshot, one round trip): the hot row, its active trouble
codes and its latest trip."""


async def _statuses(connection: Any, vins: Sequence[str]) -> list[VehicleStatus]:
    """The status of each of ``vins`` that has sent data."""
    found = []
    for row in await connection.fetch(STATUS_SQL, list(vins)):
        state = status_from_row(row)
        state.trouble_codes = msgspec.convert(row["trouble_codes"] or [], list[TroubleCode])
        if row["last_trip"] is not None:
            state.last_trip = msgspec.convert(row["last_trip"], Trip)
        found.append(state)
    return found


@get("/v1/vehicles/{vin:str}/status", tags=["vehicles"], summary="A vehicle's live status")
async def status(request: Request[Any, Any, Any], vin: str) -> VehicleStatus:
    """Last seen, position, the latest value of every measurement, odometer."""
    _check_vin(vin)
    principal = await _principal(request)
    principal.require_read(vin)
    async with _connection(_res(request)) as connection:
        found = await _statuses(connection, [vin])
    if not found:
        raise ApiError(404, "unknown_vehicle", f"no data from vehicle {vin} yet")
    return found[0]


# --- telemetry ---


def _next_link(request: Request[Any, Any, Any], cursor: str) -> str:
    params = {k: v for k, v in request.query_params.items() if k != "cursor"}
    params["cursor"] = cursor
    return f"{request.url.path}?{urlencode(params)}"


async def _page(
    request: Request[Any, Any, Any], query: TelemetryQuery, *, link: bool
) -> Stream:
    """The response of one page: headers say where the next one starts; the body is one COPY."""
    query.check()
    resources = _res(request)
    sql, args = boundary_sql(query)
    async with _connection(resources) as connection:
        rows = await connection.fetch(sql, *args)
    last: Key | None = None
    headers = {"Cache-Control": "no-store"}
    if len(rows) == 2:
        first = rows[0]
        last = (first["vin"] if query.bulk else "", to_us(first["ts"]), first["seq"])
        cursor = encode_cursor(last)
        headers["X-Next-Cursor"] = cursor
        if link:
            headers["Link"] = f'<{_next_link(request, cursor)}>; rel="next"'
    sql, args = copy_sql(query, last)
    media = _NDJSON if query.format == "ndjson" else _CSV
    body = _copy_stream(resources, sql, args, query.format)
    return Stream(body, media_type=media, headers=headers)


async def _copy_stream(
    resources: Resources, sql: str, args: list[object], fmt: str
) -> AsyncIterator[bytes]:
    """The rows of one COPY, chunk by chunk as PostgreSQL sends them, never more than
    :data:`_STREAM_QUEUE` chunks in memory. If the client goes away, the COPY is cancelled and
    its connection goes back to the pool."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=_STREAM_QUEUE)

    async def put(chunk: bytes | bytearray | memoryview) -> None:
        await queue.put(bytes(chunk))  # asyncpg may reuse its buffer: copy before it does

    async def produce() -> None:
        async with _connection(resources) as connection:
            options: dict[str, Any] = {"format": "csv", "header": True} if fmt == "csv" else {}
            await connection.copy_from_query(sql, *args, output=put, **options)
        await queue.put(None)

    resources.streams += 1
    task = asyncio.create_task(produce(), name="copy")
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if task.exception() is not None:
                    # The status line is sent: cutting the response short is the only way to
                    # tell the client (its chunked body never ends).
                    error = describe(task.exception() or Exception())
                    log.warning("export failed mid-stream", extra=kv(error=error))
                    raise ExportError(error)
                continue  # finished: what it queued is still to be read
            chunk = getter.result()
            if chunk is None:
                break
            yield chunk
    finally:
        resources.streams -= 1
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task


@get(
    "/v1/vehicles/{vin:str}/telemetry",
    tags=["telemetry"],
    summary="Telemetry of one vehicle over a time range (streamed, paged)",
    media_type=_NDJSON,
)
async def telemetry(
    request: Request[Any, Any, Any],
    vin: str,
    *,
    from_: Annotated[str, Parameter(query="from", description="ISO 8601 with zone, or µs")],
    to: Annotated[str, Parameter(description="end (exclusive): ISO 8601 with zone, or µs")],
    fields: Annotated[str | None, Parameter(description="comma-separated; default all")] = None,
    resolution: Literal["raw", "1m", "1h"] = "raw",
    format: Literal["ndjson", "csv"] = "ndjson",
    limit: Annotated[int | None, Parameter(ge=1)] = None,
    cursor: str | None = None,
) -> Stream:
    """Rows in time order, one JSON object a line (``ndjson``) or CSV with a header. ``raw``:
    every sample (``ts``, ``seq``, fields); ``1m``/``1h``: the rollups (``ts`` of the bucket,
    ``samples``, ``<field>_avg/_min/_max``). At most ``limit`` rows; when more follow, the
    ``X-Next-Cursor`` header (and ``Link: rel="next"``) gives the next page's ``cursor``."""
    _check_vin(vin)
    principal = await _principal(request)
    principal.require_read(vin)
    query = _telemetry_query(
        _res(request).settings, [vin], from_, to, fields, resolution, format, limit, cursor
    )
    return await _page(request, query, link=True)


def _telemetry_query(  # noqa: PLR0917 - the query's parts, in the URL's order
    settings: ApiSettings,
    vins: Sequence[str],
    start: str,
    end: str,
    fields: str | None,
    resolution: Literal["raw", "1m", "1h"],
    fmt: Literal["ndjson", "csv"],
    limit: int | None,
    cursor: str | None,
    *,
    named: bool = False,
) -> TelemetryQuery:
    try:
        if limit is not None and limit > settings.max_page_rows:
            raise QueryError(f"limit: at most {settings.max_page_rows}")  # noqa: TRY301
        query = TelemetryQuery(
            vins=tuple(sorted(set(vins))),
            start=parse_time(start, "from"),
            end=parse_time(end, "to"),
            fields=parse_fields(fields, resolution),
            resolution=resolution,
            format=fmt,
            limit=limit or settings.page_rows,
            after=decode_cursor(cursor) if cursor else None,
            named=named,
        )
        if query.after is not None and bool(query.after[0]) != query.bulk:
            raise QueryError("cursor: belongs to another query")  # noqa: TRY301
        query.check()
    except QueryError as exc:
        raise ApiError(400, "bad_query", str(exc)) from None
    return query


class BulkQuery(msgspec.Struct, forbid_unknown_fields=True):
    """A telemetry page over many vehicles: rows ordered by VIN, then time."""

    vins: list[str]
    from_: str = msgspec.field(name="from")
    to: str = ""
    fields: list[str] | None = None
    resolution: Literal["raw", "1m", "1h"] = "raw"
    format: Literal["ndjson", "csv"] = "ndjson"
    limit: int | None = None
    cursor: str | None = None


@post(
    "/v1/telemetry/query",
    tags=["telemetry"],
    summary="Telemetry of many vehicles (streamed, paged)",
    media_type=_NDJSON,
    status_code=200,
    request_max_body_size=256 * 1024,
)
async def bulk(request: Request[Any, Any, Any], data: BulkQuery) -> Stream:
    """As the one-vehicle telemetry, for up to ``max_bulk_vins`` vehicles; each row names its
    ``vin``. The next page: the same body with ``cursor`` from ``X-Next-Cursor``."""
    principal = await _principal(request)
    settings = _res(request).settings
    if not 1 <= len(data.vins) <= settings.max_bulk_vins:
        raise ApiError(400, "bad_query", f"vins: 1 to {settings.max_bulk_vins} vehicles")
    for vin in data.vins:
        _check_vin(vin)
        principal.require_read(vin)
    fields = ",".join(data.fields) if data.fields else None
    query = _telemetry_query(
        settings, data.vins, data.from_, data.to, fields, data.resolution, data.format,
        data.limit, data.cursor, named=True,
    )
    return await _page(request, query, link=False)


# --- trips, odometer history, trouble codes (insight's tables, sql/008_insight.sql) ---


def _range(from_: str, to: str) -> tuple[datetime, datetime]:
    try:
        start, end = parse_time(from_, "from"), parse_time(to, "to")
    except QueryError as exc:
        raise ApiError(400, "bad_query", str(exc)) from None
    if end <= start:
        raise ApiError(400, "bad_query", "to: must be after from")
    return start, end


class TripList(msgspec.Struct):
    """Trips by start time; ``next``: the ``from`` of the next page (null: the end)."""

    vin: str
    items: list[Trip]
    next: str | None


@get("/v1/vehicles/{vin:str}/trips", tags=["vehicles"], summary="Trips in a time range")
async def trips(
    request: Request[Any, Any, Any],
    vin: str,
    *,
    from_: Annotated[str, Parameter(query="from", description="ISO 8601 with zone, or µs")],
    to: Annotated[str, Parameter(description="end (exclusive): ISO 8601 with zone, or µs")],
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
) -> TripList:
    """Trips that started in ``[from, to)``, oldest first. Recomputed when late data arrives:
    an open trip (``closed`` false) may still grow."""
    _check_vin(vin)
    principal = await _principal(request)
    principal.require_read(vin)
    start, end = _range(from_, to)
    async with _connection(_res(request)) as connection:
        rows = await connection.fetch(
            f"SELECT {TRIP_COLUMNS} FROM trips WHERE vin = $1 AND start_ts >= $2 "
            "AND start_ts < $3 ORDER BY start_ts LIMIT $4",
            vin, start, end, limit + 1,
        )
    items = [trip_from_row(r) for r in rows[:limit]]
    more = len(rows) > limit
    return TripList(vin, items, rows[limit]["start_ts"].isoformat() if more else None)


class OdometerPoint(msgspec.Struct):
    """The odometer at one trip end (insight's ``odometer_history``)."""

    ts: datetime
    odometer_km: float
    """Never goes backwards: the OBD reading when plausible, else the last value plus the trip
    distance."""
    source: str
    """``obd`` (read from the car) or ``distance`` (accumulated trip distance)."""
    reading_km: float | None = None
    """The OBD reading as taken, null if the car has none."""
    anomaly: str | None = None
    """``jump`` or ``rollback`` when the reading was not believed."""
    anomaly_km: float | None = None


class OdometerHistory(msgspec.Struct):
    """Odometer points, oldest first; ``next``: the ``from`` of the next page (null: the end)."""

    vin: str
    items: list[OdometerPoint]
    next: str | None


@get("/v1/vehicles/{vin:str}/odometer", tags=["vehicles"], summary="Odometer history")
async def odometer(
    request: Request[Any, Any, Any],
    vin: str,
    *,
    from_: Annotated[str, Parameter(query="from", description="ISO 8601 with zone, or µs")],
    to: Annotated[str, Parameter(description="end (exclusive): ISO 8601 with zone, or µs")],
    limit: Annotated[int, Parameter(ge=1, le=10_000)] = 1000,
) -> OdometerHistory:
    """The odometer at each trip end in ``[from, to)`` (mileage verification): monotonic,
    with implausible readings flagged rather than applied."""
    _check_vin(vin)
    principal = await _principal(request)
    principal.require_read(vin)
    start, end = _range(from_, to)
    async with _connection(_res(request)) as connection:
        rows = await connection.fetch(
            "SELECT ts, odometer_km, source, reading_km, anomaly, anomaly_km "
            "FROM odometer_history WHERE vin = $1 AND ts >= $2 AND ts < $3 ORDER BY ts LIMIT $4",
            vin, start, end, limit + 1,
        )
    items = [OdometerPoint(**dict(r)) for r in rows[:limit]]
    more = len(rows) > limit
    return OdometerHistory(vin, items, rows[limit]["ts"].isoformat() if more else None)


class TroubleCodeList(msgspec.Struct):
    """Trouble-code events of a vehicle, by first appearance."""

    vin: str
    items: list[TroubleCode]


@get("/v1/vehicles/{vin:str}/trouble-codes", tags=["vehicles"], summary="Trouble-code events")
async def trouble_codes(
    request: Request[Any, Any, Any],
    vin: str,
    *,
    active: bool = False,
    limit: Annotated[int, Parameter(ge=1, le=10_000)] = 1000,
) -> TroubleCodeList:
    """Each time a code was active: first and last seen, cleared (null while active);
    ``active=true``: only those active now. Newest first."""
    _check_vin(vin)
    principal = await _principal(request)
    principal.require_read(vin)
    where = " AND cleared IS NULL" if active else ""
    async with _connection(_res(request)) as connection:
        rows = await connection.fetch(
            "SELECT code, first_seen, last_seen, cleared, detected_at FROM dtc_events "
            f"WHERE vin = $1{where} ORDER BY first_seen DESC, code LIMIT $2",
            vin, limit,
        )
    return TroubleCodeList(vin, [TroubleCode(**dict(r)) for r in rows])


# --- live (Server-Sent Events) ---


def _sse(event: str, data: bytes, event_id: str | None = None) -> bytes:
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return head.encode() + b"data: " + data + b"\n\n"


async def _live_events(
    resources: Resources, principal: Principal, vins: frozenset[str] | None
) -> AsyncIterator[bytes]:
    scopes = principal.scopes
    wants = (lambda vin: vin in vins) if vins is not None else scopes.may_read
    heartbeat = resources.settings.heartbeat_s
    with resources.hub.subscribe(STATE_CHANNEL, wants) as subscription:
        yield b"retry: 2000\n\n"
        pending: set[str] = set(vins or ())
        while True:
            if pending:
                async with _connection(resources) as connection:
                    found = await _statuses(connection, sorted(pending))
                for state in found:
                    event_id = f"{state.vin}:{to_us(state.last_seen)}"
                    yield _sse("state", msgspec.json.encode(state), event_id)
                pending = set()
            try:
                await asyncio.wait_for(subscription.wake.wait(), timeout=heartbeat)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            if subscription.closed:
                return
            changed, resync = subscription.take()
            pending = set(changed)
            if resync:
                if vins is not None:
                    pending |= vins
                else:
                    yield _sse("resync", b"{}")


def _sse_response(events: AsyncIterator[bytes]) -> Stream:
    return Stream(
        events,
        media_type=_SSE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@get(
    "/v1/vehicles/{vin:str}/live",
    tags=["live"],
    summary="Live status of one vehicle (Server-Sent Events)",
    media_type=_SSE,
)
async def live_vehicle(request: Request[Any, Any, Any], vin: str) -> Stream:
    """``event: state`` with the vehicle's status at once, then after every commit that
    changed it (``data``: the status JSON). A comment every ``heartbeat_s``."""
    _check_vin(vin)
    principal = await _principal(request)
    principal.require_read(vin)
    return _sse_response(_live_events(_res(request), principal, frozenset([vin])))


@get("/v1/live", tags=["live"], summary="Live status of many vehicles (Server-Sent Events)",
     media_type=_SSE)
async def live_fleet(request: Request[Any, Any, Any], vins: str | None = None) -> Stream:
    """``event: state`` for each vehicle (``vins``: comma-separated; default every vehicle this
    key may read) after every commit that changed it; ``event: resync`` when notifications may
    have been missed (re-read what you show)."""
    principal = await _principal(request)
    resources = _res(request)
    chosen = _chosen(principal, vins, resources.settings.max_bulk_vins)
    return _sse_response(_live_events(resources, principal, chosen))


class TroubleCodeAlert(msgspec.Struct):
    """What changed in a vehicle's trouble codes with one commit."""

    vin: str
    new: list[str]
    """Codes that appeared."""
    cleared: list[str]
    """Codes that went away."""
    active: list[str]
    """Every code active now."""


async def _alerts(
    resources: Resources, principal: Principal, vins: frozenset[str] | None
) -> AsyncIterator[bytes]:
    wants = (lambda vin: vin in vins) if vins is not None else principal.scopes.may_read
    heartbeat = resources.settings.heartbeat_s
    with resources.hub.subscribe(DTC_CHANNEL, wants) as subscription:
        yield b"retry: 2000\n\n"
        while True:
            try:
                await asyncio.wait_for(subscription.wake.wait(), timeout=heartbeat)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            if subscription.closed:
                return
            changed, resync = subscription.take()
            if resync:
                yield _sse("resync", b"{}")
            for vin, since in sorted(changed.items()):
                async with _connection(resources) as connection:
                    rows = await connection.fetch(
                        "SELECT code, first_seen, cleared FROM dtc_events WHERE vin = $1 "
                        "AND (cleared IS NULL OR cleared >= $2) ORDER BY code",
                        vin, from_us(since),
                    )
                since_at = from_us(since)
                alert = TroubleCodeAlert(
                    vin=vin,
                    new=[r["code"] for r in rows
                         if r["cleared"] is None and r["first_seen"] >= since_at],
                    cleared=[r["code"] for r in rows if r["cleared"] is not None],
                    active=[r["code"] for r in rows if r["cleared"] is None],
                )
                yield _sse("trouble_codes", msgspec.json.encode(alert), f"{vin}:{since}")


@get("/v1/alerts/live", tags=["live"], summary="Trouble-code alerts (Server-Sent Events)",
     media_type=_SSE)
async def live_alerts(request: Request[Any, Any, Any], vins: str | None = None) -> Stream:
    """``event: trouble_codes`` after every commit that changed a vehicle's trouble codes
    (``vins``: comma-separated; default every vehicle this key may read): the codes that
    appeared, those cleared, and all active now."""
    principal = await _principal(request)
    resources = _res(request)
    chosen = _chosen(principal, vins, resources.settings.max_bulk_vins)
    return _sse_response(_alerts(resources, principal, chosen))


def _chosen(
    principal: Principal, vins: str | None, most: int
) -> frozenset[str] | None:
    if vins:
        chosen = frozenset(v.strip() for v in vins.split(",") if v.strip())
        if len(chosen) > most:
            raise ApiError(400, "bad_query", f"vins: at most {most} vehicles")
        for vin in chosen:
            _check_vin(vin)
            principal.require_read(vin)
        return chosen
    if not principal.scopes.reads_anything:
        raise ApiError(403, "forbidden", f"key {principal.key_id} may not read any vehicle")
    return None


# --- ingest ---


@post(
    "/v1/vehicles/{vin:str}/batches",
    tags=["ingest"],
    summary="Post a batch (MQTT's telemetry/<vin> over HTTP); the answer is its ack",
    status_code=200,
    request_max_body_size=None,  # checked below, with the configured limit
)
async def post_batch(request: Request[Any, Any, Any], vin: str) -> Response[bytes]:
    """The body is a ``Batch`` exactly as on MQTT (MessagePack v1/v2 or JSON). 200 only after
    the commit, with the ``Ack`` naming the batch (MessagePack if the body was, else JSON); a
    resend is acked again and stores nothing twice. 4xx: the batch is at fault and kept in the
    dead-letter table; 503 + ``Retry-After``: the server is, nothing stored, send it again."""
    _check_vin(vin)
    principal = await _principal(request)
    principal.require_ingest(vin)
    resources = _res(request)
    limit = resources.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, "too_large", f"body over {limit} bytes; not read")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"body over {limit} bytes; not read further")
        chunks.append(chunk)
    payload = b"".join(chunks)
    try:
        outcome = await resources.ingest.post(vin, payload)
    except ApiError as exc:
        if resources.metrics is not None:
            resources.metrics.ingest_refused.labels(exc.error).inc()
        raise
    if resources.metrics is not None:
        resources.metrics.ingested_batches.inc()
        resources.metrics.ingested_samples.inc(outcome.samples)
        resources.metrics.ingested_new.inc(outcome.inserted)
    log.debug(
        "ingest: batch committed",
        extra=kv(vin=vin, samples=outcome.samples, new=outcome.inserted, key=principal.key_id),
    )
    msgpack = request.headers.get("content-type", "").split(";")[0].strip() in _MSGPACK_TYPES
    body = encode(outcome.ack) if msgpack else encode_json(outcome.ack)
    return Response(
        body, media_type=_MSGPACK_TYPES[0] if msgpack else "application/json", status_code=200
    )


# --- errors ---


def _error_response(error: ApiError) -> Response[ErrorBody]:
    return Response(error.body(), status_code=error.status, headers=error.headers)


def _on_api_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    assert isinstance(exc, ApiError)
    return _error_response(exc)


def _on_http_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    assert isinstance(exc, HTTPException)
    codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}
    detail = exc.detail
    extra = getattr(exc, "extra", None)
    if isinstance(extra, list) and extra:
        detail += ": " + "; ".join(
            f"{e.get('key', '')}: {e.get('message', '')}" for e in extra if isinstance(e, dict)
        )
    error = ApiError(exc.status_code, codes.get(exc.status_code, "error"), detail[:500])
    return _error_response(error)


def _on_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    resources = _res(request)
    if is_data_error(exc):
        # A value of the request the database cannot take (e.g. a NUL): the caller's fault.
        return _error_response(ApiError(400, "bad_query", describe(exc)[:300]))
    if isinstance(exc, (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)):
        # The database or the network: an outage, the client may retry.
        log.warning("request failed", extra=kv(path=request.url.path, error=describe(exc)))
        return _error_response(
            ApiError(
                503, "unavailable", "the database is not reachable now; retry later",
                headers={"Retry-After": str(resources.settings.retry_after_s)},
            )
        )
    # A bug: said loudly (the path, never the headers: they hold the key), answered 500.
    log.error("request failed: bug", exc_info=exc, extra=kv(path=request.url.path))
    return _error_response(ApiError(500, "internal", "the server failed; this is a bug"))


def create_app(resources: Resources) -> Litestar:
    """The application, serving ``resources``."""
    if resources.metrics is None:
        resources.metrics = ApiMetrics(
            lambda: resources.streams, lambda: resources.hub.subscribers
        )
    openapi = None
    if resources.settings.docs == "on":
        openapi = OpenAPIConfig(
            title="Revline API",
            version=__version__,
            description="Read telemetry of vehicles and post batches over HTTP. See docs/api.md.",
            path="/schema",
            render_plugins=[SwaggerRenderPlugin(path="/"), JsonRenderPlugin()],
            security=[{"apiKey": []}],
            components=Components(
                security_schemes={
                    "apiKey": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description="Authorization: Bearer rvl_<id>_<secret>",
                    )
                }
            ),
            use_handler_docstrings=True,
        )
    return Litestar(
        route_handlers=[
            health, metrics, vehicles, status, trips, odometer, trouble_codes, telemetry, bulk,
            live_vehicle, live_fleet, live_alerts, post_batch,
        ],
        state=State({"revline": resources}),
        exception_handlers={
            ApiError: _on_api_error,
            HTTPException: _on_http_error,
            Exception: _on_error,
        },
        openapi_config=openapi,
        before_send=[_count_response],
        logging_config=None,
        debug=False,
    )
