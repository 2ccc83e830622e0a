"""Real Mosquitto and PostgreSQL for the tests and the demo: found, started, killed, restarted.

Each service is resolved in this order (a project rule, do not reorder):

1. an explicit URL (``MQTT_URL``, ``DATABASE_URL``): used as-is; the tests may connect to it but
   never stop, kill or restart it (``controllable`` is false);
2. a container from testcontainers (``eclipse-mosquitto:2``, ``timescale/timescaledb``) when a
   Docker engine answers;
3. local binaries (``mosquitto``; PostgreSQL's ``initdb``/``pg_ctl``) in a temporary directory on a
   free port.

A restarted service comes back on the same host, port and data directory, so clients reconnect
to the same URL and whatever the server persisted is still there. ``kill()`` is SIGKILL with no
cleanup: the fault-injection tests rely on losing exactly what a real crash loses.

The methods block. From inside a running event loop call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from secrets import token_hex
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar
from urllib.parse import urlsplit

import asyncpg
from paho.mqtt.client import Client, MQTTv311
from paho.mqtt.enums import CallbackAPIVersion

from revline import mqtt

if TYPE_CHECKING:
    from types import TracebackType

    from testcontainers.core.container import DockerContainer

__all__ = [
    "MOSQUITTO_IMAGE",
    "TIMESCALEDB_IMAGE",
    "MosquittoFactory",
    "MosquittoService",
    "NotControllableError",
    "PostgresService",
    "ServiceError",
    "docker_available",
    "free_port",
    "mosquitto_config_lines",
    "mqtt_answers",
    "parse_mqtt_url",
    "postgres_answers",
    "wait_until",
]

MOSQUITTO_IMAGE = "eclipse-mosquitto:2"
TIMESCALEDB_IMAGE = "timescale/timescaledb:latest-pg16"

START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
EXTERNAL_TIMEOUT = 20.0

_T = TypeVar("_T")


class ServiceError(RuntimeError):
    """A test service could not be found, started, reached or controlled."""


class NotControllableError(ServiceError):
    """The service came from an explicit URL: tests may use it, but not stop, kill or restart it."""


# --------------------------------------------------------------------------------------------
# Small helpers


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """Host and port of ``mqtt://host:port`` (1883 when absent, 8883 for ``mqtts``)."""
    address = mqtt.parse_mqtt_url(url, key="MQTT_URL")
    return address.host, address.port


def _postgres_host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise ValueError(f"not a PostgreSQL URL (postgresql://user@host:port/db): {url!r}")
    return parts.hostname or "localhost", parts.port or 5432


def _run_async(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine in a fresh thread, so this works whether or not the caller has a loop."""

    def run() -> _T:
        return asyncio.run(factory())

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="revline-services") as pool:
        return pool.submit(run).result()


def wait_until(
    condition: Callable[[], bool], *, what: str, timeout: float = 120.0, every: float = 0.1
) -> None:
    """Poll ``condition`` every ``every`` seconds until it holds; after ``timeout`` seconds raise
    :class:`TimeoutError` naming ``what``. An exception from ``condition`` ends the wait at once
    (a condition can fail fast, e.g. when the process it waits for has exited)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def _wait_for_service(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    diagnostics: Callable[[], str] = lambda: "",
) -> None:
    """:func:`wait_until` ``ready``, as a :class:`ServiceError` with the service's own log."""

    def up() -> bool:
        if ready():
            return True
        if not alive():
            raise ServiceError(f"{what} exited while starting\n{diagnostics()}")
        return False

    try:
        wait_until(up, what=what, timeout=timeout)
    except TimeoutError as exc:
        raise ServiceError(f"{what} was not ready after {timeout:.0f}s\n{diagnostics()}") from exc


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return f"--- {path} ---\n" + "\n".join(text.splitlines()[-lines:])


def _find_binary(name: str, *, install_hint: str) -> str:
    # Debian installs mosquitto in /usr/sbin, which a non-root PATH often lacks.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    found = shutil.which(name, path=path)
    if found is None:
        raise ServiceError(f"`{name}` not found: install it with `{install_hint}`")
    return found


def mqtt_answers(host: str, port: int, *, timeout: float = 2.0) -> bool:
    """Whether an MQTT broker at host:port completes a CONNECT handshake within ``timeout``."""
    # A TCP accept is not enough: docker-proxy accepts before the container listens.
    client = Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"revline-probe-{token_hex(4)}",
        protocol=MQTTv311,  # a clean 3.1.1 session leaves nothing in the broker's persistence
    )
    answered = False

    def on_connect(*_: object) -> None:
        # Any CONNACK counts, a refusal too: a broker with allow_anonymous false is up and says
        # "not authorised" to this anonymous probe.
        nonlocal answered
        answered = True

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
    except OSError:
        return False
    try:
        deadline = time.monotonic() + timeout
        while not answered and time.monotonic() < deadline:
            client.loop(timeout=0.05)
    except OSError:
        return False
    finally:
        client.disconnect()
    return answered


async def _postgres_probe(url: str, connect_timeout: float) -> bool:
    try:
        connection = await asyncpg.connect(url, timeout=connect_timeout)
    except (
        OSError,
        TimeoutError,
        asyncpg.PostgresError,  # e.g. "the database system is starting up"
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
    ):
        return False
    try:
        return bool(await connection.fetchval("select 1") == 1)
    finally:
        await connection.close()


def postgres_answers(url: str, *, timeout: float = 2.0) -> bool:
    """Whether PostgreSQL at ``url`` accepts a connection and answers ``select 1``."""
    return _run_async(lambda: _postgres_probe(url, timeout))


async def _execute(url: str, sql: str) -> None:
    connection = await asyncpg.connect(url, timeout=10)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@functools.cache
def docker_available(timeout: float = 2.0) -> bool:
    """Whether a Docker engine answers a ping (checked once per process)."""
    answered = False
    with warnings.catch_warnings():
        # docker-py leaks its socket when no engine answers; under filterwarnings=error that
        # ResourceWarning would surface later as an error in some unrelated test.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            import docker  # noqa: PLC0415 - only needed, and only importable cheaply, here

            client = docker.from_env(timeout=timeout)
            try:
                answered = bool(client.ping())
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - any failure at all means "no usable Docker"
            answered = False
        gc.collect()
    return answered


# --------------------------------------------------------------------------------------------
# Backends: how one server process is started, stopped and killed


class _Backend(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def controllable(self) -> bool: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def is_running(self) -> bool: ...
    def logs(self) -> str: ...
    def close(self) -> None: ...


class _External:
    """A server somebody else runs, given by URL."""

    controllable = False

    def __init__(self, *, host: str, port: int, ready: Callable[[], bool], what: str) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._what = what

    def start(self) -> None:
        _wait_for_service(self._ready, what=self._what, timeout=EXTERNAL_TIMEOUT)

    def _refuse(self) -> None:
        raise NotControllableError(
            f"{self._what} is an external service: the tests may not stop, kill or restart it"
        )

    def stop(self) -> None:
        self._refuse()

    def kill(self) -> None:
        self._refuse()

    def is_running(self) -> bool:
        return True

    def logs(self) -> str:
        return ""

    def close(self) -> None:
        pass


class _Container:
    """A server in a Docker container whose host port stays bound across kill and restart."""

    controllable = True

    def __init__(
        self,
        *,
        image: str,
        container_port: int,
        ready: Callable[[str, int], bool],
        what: str,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        self._image = image
        self._container_port = container_port
        self._ready = ready
        self._what = what
        self._env = dict(env or {})
        self._command = list(command) if command is not None else None
        self._files = dict(files or {})
        # A fixed host port, not a random one per start: a restarted container must come back
        # where the clients under test will reconnect.
        self._host_port = free_port()
        self._container: DockerContainer | None = None
        self.host = "127.0.0.1"
        self.port = self._host_port

    def start(self) -> None:
        if self._container is None:
            from testcontainers.core.container import DockerContainer  # noqa: PLC0415

            container = DockerContainer(self._image).with_bind_ports(
                self._container_port, self._host_port
            )
            for key, value in self._env.items():
                container = container.with_env(key, value)
            if self._command is not None:
                container = container.with_command(self._command)
            for destination, content in self._files.items():
                container = container.with_copy_into_container(content, destination)
            self._container = container
            container.start()
            self.host = container.get_container_host_ip()
            self.port = int(container.get_exposed_port(self._container_port))
        elif not self.is_running():
            # Same container: same filesystem (so same data), same port binding.
            self._container.get_wrapped_container().start()
        _wait_for_service(
            lambda: self._ready(self.host, self.port),
            what=self._what,
            timeout=START_TIMEOUT,
            alive=self.is_running,
            diagnostics=self.logs,
        )

    def stop(self) -> None:
        if self._container is not None and self.is_running():
            self._container.get_wrapped_container().stop(timeout=int(STOP_TIMEOUT))

    def kill(self) -> None:
        if self._container is not None and self.is_running():
            wrapped = self._container.get_wrapped_container()
            wrapped.kill()  # SIGKILL
            wrapped.wait(timeout=int(STOP_TIMEOUT))

    def is_running(self) -> bool:
        if self._container is None:
            return False
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        return bool(wrapped.status == "running")

    def logs(self) -> str:
        if self._container is None:
            return ""
        raw: bytes = self._container.get_wrapped_container().logs(tail=60)
        return f"--- {self._what} container log ---\n" + raw.decode(errors="replace")

    def close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            container.stop()  # removes the container and its anonymous volumes


def _mosquitto_config(
    *, listener: str, persistence_dir: str, log_dest: str, extra: Iterable[str]
) -> str:
    """The broker configuration: our defaults, where a line in ``extra`` replaces its option."""
    defaults = [
        f"listener {listener}",
        "allow_anonymous true",
        "persistence true",
        f"persistence_location {persistence_dir}",
        # Default-ish on purpose: a crash loses whatever arrived since the last save, as in
        # production, and the fault tests rely on that.
        "autosave_interval 1800",
        # Beyond max_queued_messages (default 1000) Mosquitto drops QoS 1 messages silently.
        "max_queued_messages 100000",
        "max_inflight_messages 100",
        f"log_dest {log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    extra = [line.strip() for line in extra if line.strip()]
    repeatable = {"listener", "log_type", "log_dest", "include_dir"}
    replaced = {line.split()[0] for line in extra} - repeatable
    kept = [line for line in defaults if line.split()[0] not in replaced]
    return "\n".join([*kept, *extra]) + "\n"


_STARTED_BROKER_SETS = frozenset({"listener", "persistence_location", "log_dest"})


def mosquitto_config_lines(path: Path, *, replace: Mapping[str, str] | None = None) -> list[str]:
    """The options of a mosquitto.conf (e.g. the shipped ``broker/mosquitto.conf``), to pass as
    ``extra_config`` to a broker started here: the tests check what we ship, not a look-alike.

    Comments and blank lines go, and so do the options a started broker sets itself (its own
    listener, persistence directory and log); the file's listener options then apply to that one
    listener. An option named in ``replace`` gets the given value, e.g. the ``password_file`` and
    ``acl_file`` of a test's own logins.
    """
    replace = dict(replace or {})
    lines: list[str] = []
    listeners = 0
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        option = line.split()[0]
        listeners += option == "listener"
        if option in _STARTED_BROKER_SETS:
            continue
        lines.append(f"{option} {replace.pop(option)}" if option in replace else line)
    if listeners > 1:
        # Options of a second listener would silently apply to the only one started here.
        raise ValueError(f"{path}: more than one listener; only files with one are supported")
    if replace:
        raise ValueError(f"{path} does not set {', '.join(sorted(replace))}")
    return lines


class _LocalMosquitto:
    """``mosquitto`` from this machine, in a temporary directory, on a free port."""

    controllable = True

    def __init__(self, *, extra_config: Sequence[str], ready: Callable[[str, int], bool]) -> None:
        self._binary = _find_binary("mosquitto", install_hint="apt-get install -y mosquitto")
        self._ready = ready
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self._dir = Path(tempfile.mkdtemp(prefix="revline-mosquitto-"))
        self._config = self._dir / "mosquitto.conf"
        self._log = self._dir / "mosquitto.log"
        self._output = self._dir / "mosquitto.out"
        lines = list(extra_config)
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to the "mosquitto" user (or "nobody"), which
            # then could not write its persistence file into our root-owned directory.
            try:
                account = pwd.getpwnam("mosquitto")
            except KeyError:
                lines.insert(0, "user root")
            else:
                os.chown(self._dir, account.pw_uid, account.pw_gid)
        self._config.write_text(
            _mosquitto_config(
                listener=f"{self.port} {self.host}",
                persistence_dir=f"{self._dir}/",
                log_dest=f"file {self._log}",
                extra=lines,
            )
        )
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.is_running():
            return
        with self._output.open("ab") as output:
            self._process = subprocess.Popen(
                [self._binary, "-c", str(self._config)],
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in pytest must not reach the broker first
            )
        _wait_for_service(
            lambda: self._ready(self.host, self.port),
            what=f"mosquitto on {self.host}:{self.port}",
            timeout=START_TIMEOUT,
            alive=self.is_running,
            diagnostics=self.logs,
        )

    def stop(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()  # SIGTERM: mosquitto writes its persistence file, then exits
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def logs(self) -> str:
        return "\n".join(filter(None, [_tail(self._output), _tail(self._log)]))

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


def _postgres_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres: PATH first, else the newest Debian one."""
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path is not None:
        candidates.append(Path(on_path).parent)

    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for bindir in candidates:
        if all((bindir / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise ServiceError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in "
        "/usr/lib/postgresql/*/bin: install them with `apt-get install -y postgresql`"
    )


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie has released everything it held)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


class _LocalPostgres:
    """A PostgreSQL cluster made by this machine's ``initdb``, in a temporary directory."""

    controllable = True

    def __init__(self, *, ready: Callable[[str, int], bool]) -> None:
        self._bindir = _postgres_bindir()
        self._ready = ready
        self._as_user: list[str] = []
        account: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            # initdb and pg_ctl refuse to run as root (as CI does): run them as "postgres", in
            # directories that user owns.
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise ServiceError(
                    "running as root, PostgreSQL needs a `postgres` user to run as: "
                    "`apt-get install -y postgresql` creates it"
                ) from None
            runuser = _find_binary("runuser", install_hint="apt-get install -y util-linux")
            self._as_user = [runuser, "-u", "postgres", "--"]
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self._dir = Path(tempfile.mkdtemp(prefix="revline-postgres-"))
        self._data = self._dir / "data"
        self._sockets = self._dir / "sockets"
        self._log = self._dir / "postgres.log"
        self._sockets.mkdir()
        if account is not None:
            for path in (self._dir, self._sockets):
                os.chown(path, account.pw_uid, account.pw_gid)
        self._initialized = False

    def _run(self, *args: str) -> None:
        command = [*self._as_user, str(self._bindir / args[0]), *args[1:]]
        result = subprocess.run(
            command,
            cwd=self._dir,  # the postgres user may not be allowed into the caller's cwd
            capture_output=True,
            text=True,
            check=False,
            timeout=START_TIMEOUT + 30,
        )
        if result.returncode != 0:
            raise ServiceError(
                f"{shlex.join(command)} failed with exit code {result.returncode}\n"
                f"{result.stdout}{result.stderr}{_tail(self._log)}"
            )

    def start(self) -> None:
        if not self._initialized:
            self._run(
                "initdb",
                "-D",
                str(self._data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
            self._initialized = True
        if self.is_running():
            return
        options = [
            f"-p {self.port}",
            f"-k {shlex.quote(str(self._sockets))}",
            f"-c listen_addresses={self.host}",
            # Speed without changing what a crash loses: fsync only matters when the OS dies.
            # synchronous_commit stays on so a COMMIT survives a SIGKILL of the server, which
            # the fault tests count on (off would lose the last ~600 ms of commits).
            "-c fsync=off",
            "-c full_page_writes=off",
            "-c max_connections=200",
            "-c shared_buffers=256MB",
        ]
        self._run(
            "pg_ctl",
            "-D",
            str(self._data),
            "-o",
            " ".join(options),
            "-l",
            str(self._log),
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "start",
        )
        _wait_for_service(
            lambda: self._ready(self.host, self.port),
            what=f"PostgreSQL on {self.host}:{self.port}",
            timeout=START_TIMEOUT,
            alive=self.is_running,
            diagnostics=self.logs,
        )

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self._data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.is_running():
            self._run("pg_ctl", "-D", str(self._data), "-m", "fast", "-w", "stop")

    def kill(self) -> None:
        pid = self._postmaster_pid()
        if pid is None or not _pid_alive(pid):
            return
        # Children first noted, then everything SIGKILLed at once: no backend may flush,
        # checkpoint or answer after the crash. pg_ctl makes the postmaster a group leader.
        victims = [pid, *_children(pid)]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        _wait_for_service(
            lambda: not any(_pid_alive(victim) for victim in victims),
            what=f"killed PostgreSQL on port {self.port}",
            timeout=STOP_TIMEOUT,
        )
        # Stale lock files make the restart fail where an unreaped zombie keeps the old pid
        # "alive" (a container whose init does not reap). Crash recovery needs neither.
        for lock in (self._data / "postmaster.pid", self._sockets / f".s.PGSQL.{self.port}.lock"):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    def is_running(self) -> bool:
        pid = self._postmaster_pid()
        return pid is not None and _pid_alive(pid)

    def logs(self) -> str:
        return _tail(self._log)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Services


class _Service:
    """One server the tests use; which backend runs it is decided by the subclass's resolution."""

    def __init__(self, backend: _Backend, *, url: str | None, what: str) -> None:
        self._backend = backend
        self._url = url
        self._what = what
        self._closed = False

    def _make_url(self, host: str, port: int) -> str:
        raise NotImplementedError

    @property
    def url(self) -> str:
        """Where clients connect; unchanged by kill and restart."""
        return self._url if self._url is not None else self._make_url(self.host, self.port)

    @property
    def host(self) -> str:
        """The server's host name or address."""
        return self._backend.host

    @property
    def port(self) -> int:
        """The server's TCP port."""
        return self._backend.port

    @property
    def controllable(self) -> bool:
        """Whether the tests started this server, so may stop, kill and restart it."""
        return self._backend.controllable

    def start(self) -> None:
        """Start the server (no-op when running) and wait until it answers clients."""
        if self._closed:
            raise ServiceError(f"{self._what} was closed")
        self._backend.start()

    def stop(self) -> None:
        """Stop gracefully: the server saves its state, as on a normal shutdown."""
        self._backend.stop()

    def kill(self) -> None:
        """SIGKILL the server, no cleanup: it loses whatever a real crash loses."""
        self._backend.kill()

    def restart(self) -> None:
        """Stop gracefully if running, then start again on the same port and data."""
        self.stop()  # raises NotControllableError for an external service
        self.start()

    def is_running(self) -> bool:
        """Whether the server process is alive (always true for an external service)."""
        return self._backend.is_running()

    def logs(self) -> str:
        """The tail of the server's log, for failure messages (empty for an external service)."""
        return self._backend.logs()

    def close(self) -> None:
        """Tear everything down: process or container, and its data. Idempotent."""
        if not self._closed:
            self._closed = True
            self._backend.close()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} controllable={self.controllable}>"


class MosquittoService(_Service):
    """An MQTT broker: ``MQTT_URL`` if given, else a container, else the local ``mosquitto``."""

    def __init__(
        self,
        *,
        url: str | None = None,
        extra_config: Sequence[str] = (),
        use_docker: bool | None = None,
    ) -> None:
        """Resolve the broker. Nothing starts until ``start()`` (or ``with``).

        ``url``: an external broker to use as-is. ``extra_config``: mosquitto.conf lines for a
        broker the tests start; one naming an option we set replaces ours.
        ``use_docker``: force or forbid the container; by default, whether Docker answers.
        """
        backend: _Backend
        if url is not None:
            if extra_config:
                raise ValueError("extra_config applies only to a broker the tests start")
            host, port = parse_mqtt_url(url)
            backend = _External(
                host=host,
                port=port,
                ready=lambda: mqtt_answers(host, port),
                what=f"MQTT broker {url} (MQTT_URL)",
            )
        elif use_docker if use_docker is not None else docker_available():
            config = _mosquitto_config(
                listener="1883",
                persistence_dir="/mosquitto/data/",
                log_dest="stdout",
                extra=extra_config,
            )
            backend = _Container(
                image=MOSQUITTO_IMAGE,
                container_port=1883,
                ready=mqtt_answers,
                what=f"mosquitto container ({MOSQUITTO_IMAGE})",
                files={"/mosquitto/config/mosquitto.conf": config.encode()},
            )
        else:
            backend = _LocalMosquitto(extra_config=extra_config, ready=mqtt_answers)
        super().__init__(backend, url=url, what="MQTT broker")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], *, extra_config: Sequence[str] = ()
    ) -> MosquittoService:
        """The broker named by ``MQTT_URL`` in ``environ``, else one the tests start."""
        return cls(url=environ.get("MQTT_URL") or None, extra_config=extra_config)

    def _make_url(self, host: str, port: int) -> str:
        return f"mqtt://{host}:{port}"


class MosquittoFactory(Protocol):
    """Makes a started broker with extra config lines (the ``make_mosquitto`` fixture)."""

    def __call__(self, *, extra_config: Sequence[str] = ()) -> MosquittoService: ...


class PostgresService(_Service):
    """PostgreSQL: ``DATABASE_URL`` if given, else TimescaleDB in a container, else local initdb.

    Only the container has the TimescaleDB extension; the local cluster is plain PostgreSQL.
    """

    def __init__(self, *, url: str | None = None, use_docker: bool | None = None) -> None:
        """Resolve the server. Nothing starts until ``start()`` (or ``with``)."""
        backend: _Backend
        if url is not None:
            host, port = _postgres_host_port(url)
            backend = _External(
                host=host,
                port=port,
                ready=lambda: postgres_answers(url),
                what=f"PostgreSQL {url} (DATABASE_URL)",
            )
        elif use_docker if use_docker is not None else docker_available():
            backend = _Container(
                image=TIMESCALEDB_IMAGE,
                container_port=5432,
                ready=lambda host, port: postgres_answers(self._make_url(host, port)),
                what=f"PostgreSQL container ({TIMESCALEDB_IMAGE})",
                env={"POSTGRES_HOST_AUTH_METHOD": "trust"},
                # Same trade-offs as the local cluster, see _LocalPostgres.start.
                command=[
                    "postgres",
                    *("-c", "fsync=off"),
                    *("-c", "full_page_writes=off"),
                    *("-c", "max_connections=200"),
                    *("-c", "shared_buffers=256MB"),
                ],
            )
        else:
            backend = _LocalPostgres(
                ready=lambda host, port: postgres_answers(self._make_url(host, port))
            )
        super().__init__(backend, url=url, what="PostgreSQL")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> PostgresService:
        """The server named by ``DATABASE_URL`` in ``environ``, else one the tests start."""
        return cls(url=environ.get("DATABASE_URL") or None)

    def _make_url(self, host: str, port: int) -> str:
        return f"postgresql://postgres@{host}:{port}/postgres"

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` on this server (same credentials and options)."""
        _check_database_name(name)
        return urlsplit(self.url)._replace(path=f"/{name}").geturl()

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its URL."""
        _check_database_name(name)
        _run_async(lambda: _execute(self.url, f'CREATE DATABASE "{name}"'))
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting whoever still uses it."""
        _check_database_name(name)
        _run_async(lambda: _execute(self.url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _check_database_name(name: str) -> None:
    # The name is spliced into SQL and a URL: keep it to plain lower-case identifiers.
    if not _DATABASE_NAME.fullmatch(name):
        raise ValueError(f"database name must match {_DATABASE_NAME.pattern}: {name!r}")
