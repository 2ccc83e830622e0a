"""Applying the numbered SQL migrations in ``sql/``, in order, once, safely.

Files in the migrations directory:

- ``NNN_name.sql``: applied in both modes;
- ``NNN_name.timescaledb.sql`` / ``NNN_name.postgres.sql``: applied only in that mode;
- ``R_name[.mode].sql``: *repeatable*, rendered with the settings (``{{chunk_interval}}`` becomes
  a SQL literal) and re-applied whenever the rendered text changes, e.g. a new retention period.

The mode is ``timescaledb`` when the extension is available, ``postgres`` otherwise (or as told),
and is recorded: a database never changes mode. Each migration runs in its own transaction with
its bookkeeping row, so a failing one leaves the database as it was; a session advisory lock
around the whole run makes two concurrent migrators safe; a second run applies nothing.

The runner talks to the database through :class:`Session` (two methods), so the very same code
also drives TimescaleDB compiled to WASM in the tests (``revline/tools/pglite/``).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol

import msgspec

from revline.settings import ConfigError, check_fields, load

__all__ = [
    "MODES",
    "AppliedMigrations",
    "AsyncpgSession",
    "MigrateReport",
    "MigrateSettings",
    "Migration",
    "MigrationError",
    "Session",
    "applied_migrations",
    "default_sql_dir",
    "detect_mode",
    "discover",
    "load_settings",
    "migrate",
    "migrate_dsn",
    "plan",
    "render",
    "template_values",
]

MODES: Final = ("timescaledb", "postgres")
LOCK_KEY: Final = 0x7265766C696E65  # "revline": one advisory lock id for every migrator
TABLE: Final = "revline_migrations"

_UNITS = r"(microseconds?|milliseconds?|seconds?|minutes?|hours?|days?|weeks?|months?|years?)"
_INTERVAL = rf"^\d+ ?{_UNITS}( \d+ ?{_UNITS})*$"
_LIKE = "an interval like '7 days' or '12 months'"
Interval = Annotated[str, msgspec.Meta(pattern=_INTERVAL, description=_LIKE)]
Retention = Annotated[
    str, msgspec.Meta(pattern=rf"^forever$|{_INTERVAL}", description=f"{_LIKE} or 'forever'")
]


class MigrateSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What ``revline migrate`` can be told; intervals are PostgreSQL intervals like ``7 days``."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    mode: Literal["auto", "timescaledb", "postgres"] = "auto"
    chunk_interval: Interval = "1 day"
    compress_after: Interval = "7 days"
    raw_retention: Retention = "12 months"
    rollup_1m_retention: Retention = "2 years"
    rollup_1h_retention: Retention = "forever"
    rollup_refresh_window: Interval = "7 days"
    """How far back rollups pick up late (backfilled) samples."""
    partitions_ahead: Annotated[int, msgspec.Meta(ge=1, le=366)] = 7
    """Plain mode: daily partitions created ahead of today."""

    def __post_init__(self) -> None:
        # Built directly or loaded, the same checks (see revline.settings).
        check_fields(self)
        if not self.database_url.startswith(("postgres://", "postgresql://")):
            raise ConfigError(
                "database_url", "", f"expected postgresql://..., got {self.database_url!r}"
            )


def load_settings(
    *,
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> MigrateSettings:
    """Defaults < ``DATABASE_URL`` < ``REVLINE_*`` < flags, checked by :class:`MigrateSettings`."""
    return load(MigrateSettings, environ=environ, flags=flags)


class MigrationError(Exception):
    """A migration could not be applied (the database is as it was before it), or the recorded
    history does not match the files."""


@dataclass(frozen=True)
class Migration:
    """One SQL file, as found on disk."""

    key: str
    """``002_samples`` or ``R_policies``: the identity recorded in the migrations table."""
    version: int | None
    """Order of a numbered migration; None for a repeatable one."""
    mode: str | None
    """The only mode it applies to, or None for both."""
    path: Path
    text: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file as written (a numbered migration must never change once applied)."""
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class MigrateReport:
    """What a run did."""

    mode: str
    applied: list[str] = field(default_factory=list)
    """Keys of the migrations applied by this run, in order."""
    already: int = 0
    """Migrations found already applied."""


class Session(Protocol):
    """The two things the runner needs from a database connection."""

    async def execute(self, sql: str, *args: object) -> None:
        """Run a statement (or, without args, a script of several)."""

    async def fetch(self, sql: str, *args: object) -> list[dict[str, Any]]:
        """Run a query and return its rows."""


_FILE_RE = re.compile(r"^(?:(?P<version>\d+)|R)_(?P<name>[a-z0-9_]+)(?:\.(?P<mode>[a-z]+))?\.sql$")
_PLACEHOLDER_RE = re.compile(r"\{\{\s*([a-z0-9_]+)\s*\}\}")


def default_sql_dir() -> Path:
    """``revline/storage/sql`` inside the wheel, else ``sql/`` at the root of a checkout."""
    packaged = Path(str(importlib.resources.files("revline.storage") / "sql"))
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "sql"


def discover(directory: Path, mode: str) -> list[Migration]:
    """The migrations of ``directory`` that apply to ``mode``: numbered ones in order, then the
    repeatable ones by name. A file that does not follow the naming rule is an error."""
    found: list[Migration] = []
    versions: dict[int, str] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: expected NNN_name[.mode].sql or R_name[.mode].sql")
        file_mode = match["mode"]
        if file_mode is not None and file_mode not in MODES:
            raise MigrationError(f"{path}: unknown mode {file_mode!r}, expected one of {MODES}")
        if file_mode not in (None, mode):
            continue
        version = int(match["version"]) if match["version"] is not None else None
        key = f"{match['version']}_{match['name']}" if version is not None else f"R_{match['name']}"
        if version is not None:
            if version in versions:
                raise MigrationError(f"{path}: version {version} also used by {versions[version]}")
            versions[version] = path.name
        found.append(Migration(key, version, file_mode, path, path.read_text(encoding="utf-8")))
    found.sort(key=lambda m: (m.version is None, m.version or 0, m.key))
    return found


def _literal(value: str | int | None) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return f"'{value}'"
    return "'" + value.replace("'", "''") + "'"


def template_values(settings: MigrateSettings) -> dict[str, str]:
    """The ``{{name}}`` substitutions: each setting as a SQL literal, ``forever`` as NULL."""
    values: dict[str, str] = {}
    for name in MigrateSettings.__struct_fields__:
        if name in {"database_url", "mode"}:
            continue
        value = getattr(settings, name)
        values[name] = _literal(None if value == "forever" else value)
    return values


def render(text: str, values: Mapping[str, str]) -> str:
    """``text`` with every ``{{name}}`` replaced; an unknown name is an error, not a blank."""

    def one(match: re.Match[str]) -> str:
        name = match[1]
        if name not in values:
            raise MigrationError(f"unknown placeholder {{{{{name}}}}}; known: {sorted(values)}")
        return values[name]

    return _PLACEHOLDER_RE.sub(one, text)


def plan(
    available: Sequence[Migration],
    applied: Mapping[str, str],
    values: Mapping[str, str],
) -> list[tuple[Migration, str, str]]:
    """What to apply, as ``(migration, rendered sql, checksum to record)``, given the recorded
    ``{key: checksum}``. Pure: the same answer for asyncpg and for the WASM test database."""
    todo: list[tuple[Migration, str, str]] = []
    known = {m.key for m in available}
    for key in applied:
        if not key.startswith("R_") and key not in known:
            raise MigrationError(f"migration {key} is recorded as applied but has no file")
    for migration in available:
        sql = render(migration.text, values)
        if migration.version is None:
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if applied.get(migration.key) != checksum:
                todo.append((migration, sql, checksum))
            continue
        recorded = applied.get(migration.key)
        if recorded is None:
            todo.append((migration, sql, migration.checksum))
        elif recorded != migration.checksum:
            raise MigrationError(
                f"{migration.path.name} changed after it was applied (checksum {recorded[:12]} "
                f"recorded, file is {migration.checksum[:12]}); add a new migration instead"
            )
    return todo


_CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    key text PRIMARY KEY,
    version integer,
    mode text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class AppliedMigrations:
    """What the migrations table records (:func:`applied_migrations` reads it)."""

    mode: str | None
    """The storage mode the database was migrated in; None if it never was."""
    checksums: dict[str, str] = field(default_factory=dict)
    """``{key: checksum}`` of every applied migration, in the order they were applied."""


async def applied_migrations(session: Session) -> AppliedMigrations:
    """The migrations recorded in the database: the one reader of the migrations table. A
    database without the table (never migrated) has none and no mode."""
    (present,) = await session.fetch(f"SELECT to_regclass('{TABLE}') IS NOT NULL AS present")
    if not present["present"]:
        return AppliedMigrations(mode=None)
    rows = await session.fetch(f"SELECT key, mode, checksum FROM {TABLE} ORDER BY applied_at, key")
    return AppliedMigrations(
        mode=str(rows[0]["mode"]) if rows else None,
        checksums={str(r["key"]): str(r["checksum"]) for r in rows},
    )


async def detect_mode(session: Session, wanted: str = "auto") -> str:
    """The recorded mode if any (it never changes), else ``wanted``, else what is available."""
    recorded = (await applied_migrations(session)).mode
    if recorded is not None:
        if wanted not in ("auto", recorded):
            raise MigrationError(f"database was migrated in {recorded} mode, not {wanted}")
        return recorded
    available = await session.fetch(
        "SELECT 1 AS yes FROM pg_available_extensions WHERE name = 'timescaledb'"
    )
    if wanted == "timescaledb" and not available:
        raise MigrationError("mode timescaledb asked for, but the extension is not available")
    if wanted != "auto":
        return wanted
    return "timescaledb" if available else "postgres"


async def migrate(
    session: Session,
    settings: MigrateSettings,
    directory: Path | None = None,
) -> MigrateReport:
    """Apply what is missing, under the advisory lock; raise MigrationError on the first failure."""
    directory = directory or default_sql_dir()
    await session.execute(f"SELECT pg_advisory_lock({LOCK_KEY})")
    try:
        await session.execute(_CREATE_TABLE)
        mode = await detect_mode(session, settings.mode)
        available = discover(directory, mode)
        applied = (await applied_migrations(session)).checksums
        todo = plan(available, applied, template_values(settings))
        report = MigrateReport(mode=mode, already=len(available) - len(todo))
        for migration, sql, checksum in todo:
            await _apply_one(session, migration, sql, checksum, mode)
            report.applied.append(migration.key)
        return report
    finally:
        await session.execute(f"SELECT pg_advisory_unlock({LOCK_KEY})")


async def _apply_one(
    session: Session, migration: Migration, sql: str, checksum: str, mode: str
) -> None:
    await session.execute("BEGIN")
    try:
        await session.execute(sql)
        await session.execute(
            f"INSERT INTO {TABLE} (key, version, mode, checksum) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (key) DO UPDATE SET checksum = excluded.checksum, applied_at = now()",
            migration.key,
            migration.version,
            mode,
            checksum,
        )
        await session.execute("COMMIT")
    except Exception as exc:
        await session.execute("ROLLBACK")
        raise MigrationError(f"{migration.path.name} failed, nothing of it applied: {exc}") from exc


class AsyncpgSession:
    """:class:`Session` over one asyncpg connection (or a pool, for :func:`applied_migrations`)."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    async def execute(self, sql: str, *args: object) -> None:
        await self._connection.execute(sql, *args)

    async def fetch(self, sql: str, *args: object) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._connection.fetch(sql, *args)]


async def migrate_dsn(
    dsn: str, settings: MigrateSettings, directory: Path | None = None
) -> MigrateReport:
    """Connect to ``dsn``, run :func:`migrate`, close."""
    import asyncpg  # noqa: PLC0415 - the CLI registry must import without asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        return await migrate(AsyncpgSession(connection), settings, directory)
    finally:
        await connection.close()
