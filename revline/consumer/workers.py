"""``revline consumer --workers N``: N consumer processes in one shared group, one command.

Why processes: the consumer's per-message work (reading MQTT, decoding, acks) runs
under one GIL, about one core; a second core only helps in a second process. The broker's
shared subscription (``$share/<group>/telemetry/+``) splits the messages between the workers, so
each worker is a complete consumer (its own session, transactions, PUBACKs and end-to-end acks,
"ack after commit" unchanged) and nothing is shared between them but the database.

The supervisor (this process):

* starts each worker as ``python -m revline.consumer.workers`` with its settings
  (:func:`~revline.consumer.config.worker_settings`: client id ``<id>-w<i>``) on stdin;
* serves ONE ``/metrics`` and ``/healthz`` for all (prometheus_client's multiprocess mode:
  :class:`~revline.consumer.metrics.WorkerMetrics`);
* restarts a worker that died (crash, kill -9, OOM) under the same client id, after a backoff:
  its persistent session is still on the broker, which redelivers every message the dead
  worker had not PUBACKed (it PUBACKs only after commit), and writes are idempotent;
* on SIGTERM/SIGINT passes SIGTERM to every worker, each of which commits and acks what it
  holds (its own ``shutdown_timeout_s``), and waits for them; exit 0 when all stopped cleanly;
* stops everything with exit code 1 when a worker exits with 1 (a database that waiting cannot
  fix: not migrated, login refused; restarting would not help either).

A worker notices its supervisor's death (``PR_SET_PDEATHSIG``) and stops as on SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from revline.consumer.config import ConsumerSettings, worker_settings
from revline.logs import kv

__all__ = ["Worker", "restart_delay", "supervise"]

log = logging.getLogger("revline.consumer.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_RESTART_MIN_S = 1.0
_RESTART_MAX_S = 30.0
_HEALTHY_AFTER_S = 60.0
"""A worker that ran this long before dying is restarted after the shortest delay again."""


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker that died ``failures`` times in a row (>= 1)."""
    return float(min(_RESTART_MAX_S, _RESTART_MIN_S * 2.0 ** max(0, failures - 1)))


@dataclass
class Worker:
    """One worker process and its restart books."""

    index: int
    settings: ConsumerSettings
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)


def _command(log_level: str, *, log_json: bool) -> list[str]:
    command = [sys.executable, "-m", "revline.consumer.workers", "--log-level", log_level]
    return [*command, "--log-json"] if log_json else command


class _Supervisor:
    def __init__(
        self, settings: ConsumerSettings, directory: str, log_level: str, *, log_json: bool
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.command = _command(log_level, log_json=log_json)
        self.workers = [
            Worker(i, worker_settings(settings, i)) for i in range(1, settings.workers + 1)
        ]
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def running(self) -> set[int]:
        """Pids of the workers now running (for /healthz)."""
        with self.lock:
            return {
                w.process.pid
                for w in self.workers
                if w.process is not None and w.process.poll() is None
            }

    def start(self, worker: Worker) -> None:
        env = {**os.environ, MULTIPROC_ENV: self.directory}
        process = subprocess.Popen(self.command, stdin=subprocess.PIPE, env=env)
        assert process.stdin is not None
        # Settings through a pipe, not argv or the environment: the broker password stays out
        # of `ps` and /proc/<pid>/environ.
        with contextlib.suppress(BrokenPipeError):
            process.stdin.write(msgspec.json.encode(worker.settings))
            process.stdin.close()
        with self.lock:
            worker.process = process
            worker.started = time.monotonic()
            worker.restart_at = None
        log.info(
            "worker started",
            extra=kv(
                worker=worker.index,
                pid=process.pid,
                client_id=worker.settings.effective_client_id,
                restarts=worker.restarts,
            ),
        )

    def reap(self, worker: Worker, now: float) -> int | None:
        """Note a worker that has exited; its exit code (None while it runs)."""
        process = worker.process
        if process is None or (code := process.poll()) is None:
            return None
        _mark_dead(self.directory, process.pid)
        with self.lock:
            worker.process = None
        worker.exit_codes.append(code)
        if self.stopping.is_set():
            return code
        ran = now - worker.started
        worker.failures = 1 if ran >= _HEALTHY_AFTER_S else worker.failures + 1
        delay = restart_delay(worker.failures)
        worker.restart_at = now + delay
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        log.error(
            "worker died; restarting it under the same client id (the broker redelivers what "
            "it had not acked)",
            extra=kv(worker=worker.index, pid=process.pid, exited=how, restart_in_s=delay),
        )
        return code

    def run(self) -> int:
        for worker in self.workers:
            self.start(worker)
        while not self.stopping.wait(0.2):
            now = time.monotonic()
            for worker in self.workers:
                code = self.reap(worker, now)
                if code == 1:
                    log.error(
                        "worker stopped for good (see its last line); stopping all",
                        extra=kv(worker=worker.index),
                    )
                    self.stopping.set()
                    self.stop_all()
                    return 1
                if worker.restart_at is not None and now >= worker.restart_at:
                    worker.restarts += 1
                    self.start(worker)
        return self.stop_all()

    def stop_all(self) -> int:
        """SIGTERM every worker, wait for each to commit and ack what it holds; the exit code."""
        self.stopping.set()
        with self.lock:
            processes = [w.process for w in self.workers if w.process is not None]
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s + 20
        clean = True
        for process in processes:
            try:
                code = process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error(  # noqa: TRY400 - one line; the timeout's traceback says nothing
                    "worker did not stop in time; killing it", extra=kv(pid=process.pid)
                )
                process.kill()
                code = process.wait()
            clean = clean and code == 0
        log.info("all workers stopped", extra=kv(workers=len(self.workers), clean=clean))
        return 0 if clean else 1


def _mark_dead(directory: str, pid: int) -> None:
    from prometheus_client import multiprocess  # noqa: PLC0415

    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def supervise(
    settings: ConsumerSettings, *, log_level: str = "info", log_json: bool = False
) -> int:
    """Run ``settings.workers`` consumers in ``settings.group`` until SIGTERM/SIGINT; the exit
    code (0: every worker stopped cleanly)."""
    import asyncio  # noqa: PLC0415

    from revline.consumer.metrics import MetricsServer, WorkerMetrics  # noqa: PLC0415

    directory = tempfile.mkdtemp(prefix="revline-consumer-metrics-")
    supervisor = _Supervisor(settings, directory, log_level, log_json=log_json)
    try:

        async def main() -> int:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, supervisor.stopping.set)
            async with contextlib.AsyncExitStack() as stack:
                if settings.metrics_port:
                    exposed = WorkerMetrics(directory, settings.workers, supervisor.running)
                    server = MetricsServer(
                        exposed, host=settings.metrics_host, port=settings.metrics_port
                    )
                    await stack.enter_async_context(server)
                log.info(
                    "consumer workers starting",
                    extra=kv(workers=settings.workers, group=settings.group),
                )
                return await asyncio.to_thread(supervisor.run)

        return asyncio.run(main())
    finally:
        supervisor.stopping.set()
        shutil.rmtree(directory, ignore_errors=True)


def _die_with_parent() -> None:
    """Ask Linux to send us SIGTERM when the supervisor dies (a worker must not outlive it)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _worker_main(argv: list[str]) -> int:
    """A worker: settings JSON on stdin, then the ordinary consumer service."""
    import argparse  # noqa: PLC0415

    from revline.consumer.service import serve  # noqa: PLC0415
    from revline.logs import setup_logging  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="revline consumer worker")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-json", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, json=args.log_json)
    _die_with_parent()
    if os.getppid() == 1:  # the supervisor died before we asked
        return 0
    settings = msgspec.json.decode(Path("/dev/stdin").read_bytes(), type=ConsumerSettings)
    return serve(settings)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
