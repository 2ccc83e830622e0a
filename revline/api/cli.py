"""``revline api`` (the HTTP API) and ``revline api-key add|list|revoke``; the service and its
libraries (Litestar, uvicorn, asyncpg) are imported only when a command runs."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from revline.api.config import ENV_PREFIX, ApiSettings, load_settings
from revline.settings import add_flags, flag_values

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = ["register"]

_HELP: dict[str, str] = {
    "database_url": "PostgreSQL URL for reads, keys and the live feed (read-only is enough)",
    "ingest_database_url": "PostgreSQL URL HTTP ingest writes to (unset: database_url)",
    "host": "address to listen on (TLS belongs to the reverse proxy)",
}


def register(commands: Commands) -> None:
    """Add ``revline api`` and ``revline api-key ...``."""
    parser = commands.add(commands.top, "api", "serve the HTTP API (reads, live streams, ingest)",
                          _run)
    parser.add_argument("--config", type=Path, help="TOML file with settings")
    add_flags(parser, ApiSettings, env_prefix=ENV_PREFIX, help_text=_HELP)

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
    settings = load_settings(config=args.config, flags=flag_values(args, ApiSettings))
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
