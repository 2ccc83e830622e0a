"""``revline api`` (the HTTP API) and ``revline api-key add|list|revoke``; the service and its
libraries (Litestar, uvicorn, asyncpg) are imported only when a command runs."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = ["register"]

_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("database_url", str, "PostgreSQL URL for reads (env DATABASE_URL); read-only is enough"),
    ("ingest_database_url", str, "PostgreSQL URL HTTP ingest writes to (default: database_url)"),
    ("host", str, "address to listen on (127.0.0.1; TLS belongs to the reverse proxy)"),
    ("port", int, "port to listen on (8000)"),
    ("pool_size", int, "database connections for reads (10)"),
    ("ingest_pool_size", int, "database connections for HTTP ingest (4)"),
    ("statement_timeout_s", float, "database statement timeout (30)"),
    ("rate_per_s", float, "requests a second per key, unless the key says otherwise (20)"),
    ("burst", int, "requests a key may make at once, unless the key says otherwise (40)"),
    ("key_cache_s", float, "believe a checked key this long (30; revocations are pushed)"),
    ("max_body_bytes", int, "largest ingest body (2 MiB)"),
    ("page_rows", int, "telemetry rows of a page when no limit is given (100000)"),
    ("max_page_rows", int, "largest limit a caller may ask for (1000000)"),
    ("max_bulk_vins", int, "vehicles of one bulk query, at most (1000)"),
    ("max_future_s", float, "ingest: refuse samples further ahead of our clock (300)"),
    ("max_age_s", float, "ingest: refuse samples older than this (358 d)"),
    ("retry_after_s", int, "Retry-After of a 503 (5)"),
    ("heartbeat_s", float, "live streams: a comment this often (15)"),
)


def register(commands: Commands) -> None:
    """Add ``revline api`` and ``revline api-key ...``."""
    parser = commands.add(commands.top, "api", "serve the HTTP API (reads, live streams, ingest)",
                          _run)
    parser.add_argument("--config", type=Path, help="TOML file with settings")
    for key, kind, help_text in _FLAGS:
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind, help=help_text)
    parser.add_argument("--no-docs", dest="docs", action="store_const", const=False,
                        help="do not serve the OpenAPI document and its page")

    keys = commands.group("api-key", "manage API keys (stored hashed; shown once when made)")
    add = commands.add(keys, "add", "make a key; prints it once", _add)
    add.add_argument("name", help="who or what uses it, e.g. 'fleet-nightly'")
    add.add_argument(
        "--scope", dest="scopes", action="append", required=True, metavar="SCOPE",
        help="read:* | read:<VIN> | ingest:<VIN>; repeat for several",
    )
    add.add_argument("--rate-per-s", type=float, help="this key's requests/s (server default)")
    add.add_argument("--burst", type=int, help="this key's burst (server default)")
    add.add_argument("--database-url", help="postgresql://... (env DATABASE_URL)")
    listing = commands.add(keys, "list", "list keys (ids, names, scopes; never the keys)", _list)
    listing.add_argument("--database-url", help="postgresql://... (env DATABASE_URL)")
    revoke = commands.add(keys, "revoke", "revoke a key by its id (running servers at once)",
                          _revoke)
    revoke.add_argument("id", help="the key's id (rvl_<id>_...)")
    revoke.add_argument("--database-url", help="postgresql://... (env DATABASE_URL)")


def _run(args: argparse.Namespace) -> int:
    from revline.api.config import load_settings  # noqa: PLC0415

    flags: dict[str, object] = {key: getattr(args, key) for key, _, _ in _FLAGS}
    flags["docs"] = args.docs
    settings = load_settings(config=args.config, flags=flags)
    from revline.api.service import serve  # noqa: PLC0415 - Litestar, uvicorn: not for --help

    return serve(settings)


def _database_url(args: argparse.Namespace) -> str:
    url: str = args.database_url or os.environ.get("DATABASE_URL") or ""
    if not url:
        print("revline api-key: set --database-url or DATABASE_URL", file=sys.stderr)
        raise SystemExit(2)
    return url


async def _with_connection(url: str, work: Any) -> Any:
    import asyncpg  # noqa: PLC0415

    from revline.storage.errors import describe  # noqa: PLC0415

    try:
        connection = await asyncpg.connect(url, timeout=10)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        print(f"revline api-key: cannot connect: {describe(exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        return await work(connection)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "sqlstate", None) == "42P01":
            print("revline api-key: database not migrated: run `revline migrate`", file=sys.stderr)
        else:
            print(f"revline api-key: {describe(exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        await connection.close()


def _add(args: argparse.Namespace) -> int:
    from revline.api.keys import ScopeError, add_key, parse_scopes  # noqa: PLC0415

    try:
        parse_scopes(args.scopes)
    except ScopeError as exc:
        print(f"revline api-key add: {exc}", file=sys.stderr)
        return 2

    async def work(connection: Any) -> tuple[str, str]:
        return await add_key(
            connection, args.name, args.scopes, rate_per_s=args.rate_per_s, burst=args.burst
        )

    key_id, key = asyncio.run(_with_connection(_database_url(args), work))
    print(f"# key {key_id} ({args.name}): shown once, store it now", file=sys.stderr)
    print(key)
    return 0


def _list(args: argparse.Namespace) -> int:
    from revline.api.keys import list_keys  # noqa: PLC0415

    records = asyncio.run(_with_connection(_database_url(args), list_keys))
    print(f"{'id':12}  {'created':20}  {'state':8}  {'name':20}  scopes")
    for r in records:
        state = "revoked" if r.revoked_at else "active"
        print(
            f"{r.id:12}  {r.created_at:%Y-%m-%d %H:%M:%S}   {state:8}  {r.name[:20]:20}  "
            + " ".join(r.scopes.as_list())
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from revline.api.keys import revoke_key  # noqa: PLC0415

    async def work(connection: Any) -> bool:
        return await revoke_key(connection, args.id)

    if not asyncio.run(_with_connection(_database_url(args), work)):
        print(f"revline api-key revoke: no active key {args.id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.id}")
    return 0
