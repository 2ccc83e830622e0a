"""The read-only database roles of sql/011_roles.sql: Grafana and the API read every table and
view, write none, and log in only with the password ``revline roles`` set from the environment."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from revline.cli import main
from revline.tools.init import ROLE_PASSWORD_VARIABLES

GRAFANA_PASSWORD = "grafana-test-password"
API_PASSWORD = "api-test-password"


def _as(dsn: str, user: str) -> str:
    """``dsn`` with another user name (the test cluster trusts local logins: no password)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def _roles(dsn: str, monkeypatch: pytest.MonkeyPatch, **passwords: str) -> str:
    """Run ``revline roles`` with these variables set (the others unset); its output."""
    monkeypatch.setenv("DATABASE_URL", dsn)
    for variable in ROLE_PASSWORD_VARIABLES.values():
        monkeypatch.delenv(variable, raising=False)
    for variable, value in passwords.items():
        monkeypatch.setenv(variable, value)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["roles"]) == 0
    return out.getvalue()


def _scram_matches(verifier: str, password: str) -> bool:
    """Whether a PostgreSQL ``SCRAM-SHA-256$iter:salt$stored:server`` verifier is ``password``'s."""
    method, rest = verifier.split("$", 1)
    assert method == "SCRAM-SHA-256"
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored, server = keys.split(":")
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return (
        hashlib.sha256(client_key).digest() == base64.b64decode(stored)
        and server_key == base64.b64decode(server)
    )


def test_the_reader_roles_read_every_table_and_view_and_write_nothing(
    migrated_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As revline_grafana and revline_api: SELECT works on each relation; writes are refused."""
    _roles(
        migrated_db,
        monkeypatch,
        REVLINE_GRAFANA_DB_PASSWORD=GRAFANA_PASSWORD,
        REVLINE_API_DB_PASSWORD=API_PASSWORD,
    )

    async def check(user: str) -> list[str]:
        owner = await asyncpg.connect(migrated_db)
        try:
            relations = [
                r["table_name"]
                for r in await owner.fetch(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = 'public' ORDER BY table_name"
                )
            ]
        finally:
            await owner.close()
        reader = await asyncpg.connect(_as(migrated_db, user))
        try:
            for relation in relations:
                await reader.fetch(f'SELECT * FROM "{relation}" LIMIT 1')
            refused = (asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError)
            for statement in (
                "INSERT INTO vehicles (vin, name) VALUES ('1HGCM82633A004352', 'x')",
                "DELETE FROM rejected",
                "UPDATE vehicle_state SET flags = 0",
                "CREATE TABLE intruder (x int)",
            ):
                with pytest.raises(refused):
                    await reader.execute(statement)
        finally:
            await reader.close()
        return relations

    for user in ("revline_grafana", "revline_api"):
        relations = asyncio.run(check(user))
        assert {"samples", "samples_decoded", "vehicle_state", "vehicles", "rejected"} <= set(
            relations
        )


def test_role_passwords_come_from_the_environment_and_none_means_no_login(
    migrated_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored verifier is the given password's; a role whose variable is unset cannot log in."""
    out = _roles(migrated_db, monkeypatch, REVLINE_GRAFANA_DB_PASSWORD=GRAFANA_PASSWORD)
    assert "revline_grafana: may log in" in out
    assert "revline_api: cannot log in (REVLINE_API_DB_PASSWORD is not set)" in out

    async def state() -> dict[str, tuple[bool, str | None]]:
        connection = await asyncpg.connect(migrated_db)
        try:
            rows = await connection.fetch(
                "SELECT rolname, rolcanlogin, rolpassword FROM pg_authid "
                "WHERE rolname IN ('revline_grafana', 'revline_api', 'revline_reader')"
            )
            return {r["rolname"]: (r["rolcanlogin"], r["rolpassword"]) for r in rows}
        finally:
            await connection.close()

    roles = asyncio.run(state())
    can_login, verifier = roles["revline_grafana"]
    assert can_login
    assert verifier is not None
    assert _scram_matches(verifier, GRAFANA_PASSWORD)
    assert not _scram_matches(verifier, "another password")
    assert roles["revline_api"] == (False, None)
    assert roles["revline_reader"] == (False, None)

    async def login(user: str) -> None:
        await (await asyncpg.connect(_as(migrated_db, user))).close()

    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="not permitted"):
        asyncio.run(login("revline_api"))


def test_roles_says_in_one_line_when_the_database_is_unreachable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused connection is one line on stderr and exit 1, not a traceback."""
    monkeypatch.setenv("REVLINE_GRAFANA_DB_PASSWORD", GRAFANA_PASSWORD)
    assert main(["roles", "--database-url", "postgresql://nobody@127.0.0.1:1/revline"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("revline roles: cannot set role passwords:")
