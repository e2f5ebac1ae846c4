"""The daemon: root nursery, listeners, signals, reload, drain and readiness.

Theory of operation
-------------------
``serve()`` starts the metrics endpoint and control socket (:mod:`egressd.observe`), binds
every configured listener, starts the watchdog pings, then tells systemd READY=1; a socket
that cannot be bound ends startup with exit status 1. Accepted connections run in one
daemon-wide nursery, apart from the listeners' accept loops, so a listener can be removed
on reload, or all of them closed at the start of a drain, without disturbing connections in
flight.

Reload (SIGHUP, or a change of the main file or a sources file that two polls in a row saw
the same, polled at half the sources' shortest ``ttl``) is all or nothing, between
RELOADING=1 and READY=1: the new configuration is loaded and validated off to the side and
its new listeners are bound. Invalid, or a listener that cannot be bound: every error is
logged, the daemon keeps running on the old configuration, and
``egressd_reload_failures_total`` counts it. Valid: it is swapped in with one assignment
(:meth:`Runtime.swap_config`), listeners that disappeared are closed (before READY=1), and
the others keep their socket - also when their address moved to another door - so a changed
default pool applies to the next connection they accept. Reloads and the drain are
serialized by one lock; a reload during the drain is ignored.

SIGTERM or SIGINT: stop accepting (the listening sockets are closed before STOPPING=1 goes
out), give sessions ``[limits] shutdown_grace`` to finish (SMTP sessions are told 421 at
their next command boundary), then cancel what is left and exit 0. The metrics endpoint and
control socket keep answering during the drain.
"""

from __future__ import annotations

import gc
import os
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import trio

from egressd import observe
from egressd.access import client_refusal
from egressd.buildinfo import build
from egressd.checks import config_errors
from egressd.config import Config, ConfigError, Endpoint, Listener, load_config
from egressd.fleet.budgets import FleetBudgets
from egressd.fleet.node import Fleet, config_generation, open_fleet
from egressd.fleet.quotas import SharedQuotas
from egressd.log import (
    PROCESS_FIELDS,
    get_logger,
    held_interval,
    hold_lines,
    setup_logging,
    write_held_lines,
)
from egressd.metrics import Metrics
from egressd.net import activation, mtasts, sdnotify
from egressd.net.channel import ChannelClosed
from egressd.net.connection import Connection
from egressd.net.listen import (
    Balance,
    accept_loop,
    bound_port,
    close_listener,
    open_listener,
    peer_of,
)
from egressd.net.shaping import load_policy_in_thread
from egressd.observe import Extras
from egressd.runtime import Overloaded, Runtime, SessionRecord
from egressd.shaping import ShapingPolicy
from egressd.shaping.ledger import SharedLedger
from egressd.state import StateError, StateUnavailable
from egressd.warming import Warming, open_warming, state_wanted
from egressd.workerlink import SupervisorBudgets, WorkerLink

log = get_logger("daemon")

Fingerprint = list[tuple[int, int, int] | None]
"""(inode, size, mtime) of each watched file, None for a file that cannot be read."""


class Door(Protocol):
    """A front door: speaks one protocol to clients, dials out through the runtime."""

    name: str

    async def handle(
        self,
        stream: Connection,
        runtime: Runtime,
        listener: Listener,
        record: SessionRecord,
    ) -> None: ...

    async def refuse(
        self, stream: Connection, runtime: Runtime, listener: Listener, reason: str
    ) -> None:
        """Answer a connection that cannot be served (overload) protocol-correctly, as a
        client of ``listener`` expects to be answered (inside TLS on a TLS listener)."""


def load_doors() -> dict[str, Door]:
    from egressd.doors.proxy import ProxyDoor
    from egressd.doors.smtp import SmtpDoor
    from egressd.doors.socks5 import Socks5Door

    return {"socks5": Socks5Door(), "proxy": ProxyDoor(), "smtp": SmtpDoor()}


def configured_listeners(config: Config) -> dict[tuple[str, Endpoint], Listener]:
    listeners: dict[tuple[str, Endpoint], Listener] = {}
    for door, items in (
        ("socks5", config.socks5_listeners),
        ("proxy", config.proxy_listeners),
        ("smtp", config.smtp.listeners),
    ):
        for listener in items:
            listeners[(door, listener.address)] = listener
    return listeners


@dataclass
class _Running:
    """One bound listener: which door it feeds, its accept loop's scope, its real port."""

    door: str
    listener: Listener
    scope: trio.CancelScope
    port: int
    closed: trio.Event = field(default_factory=trio.Event)


REFUSALS_AT_ONCE = 256
"""Refusals spoken at once (see :meth:`Daemon._refuse`); beyond, a plain close."""
REFUSAL_TIMEOUT = 5.0


@dataclass
class PreparedReload:
    """A loaded and validated configuration, its shaping policy and its new listeners."""

    config: Config
    shaping: ShapingPolicy | None
    opened: dict[tuple[str, Endpoint], socket.socket]
    files: Fingerprint
    """The watched files' fingerprints as loaded (a supervisor compares its workers')."""
    warming: Warming | None = None
    """The state store and warm-up engine the new configuration first needs, opened."""


class ReloadRefused(Exception):
    """A reload that cannot take effect; each item of ``errors`` is one log line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass
class Daemon:
    """One running egressd: its runtime, listeners and connection nursery."""

    runtime: Runtime
    doors: dict[str, Door]
    connections: trio.Nursery
    listeners: dict[tuple[str, Endpoint], _Running] = field(default_factory=dict)
    on_reload: list[Callable[[bool], None]] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    json_logs: bool = False
    """``egressd run --json-logs``: JSON lines whatever ``[log] format`` says, reloads included."""
    started_at: float = field(default_factory=time.time)
    reloads: int = 0
    """Reloads that took effect; the configuration's generation is ``reloads + 1``."""
    reload_failures: int = 0
    files_seen: Fingerprint = field(default_factory=list)
    """Fingerprints of the watched files as of the last (attempted) load."""
    warming: Warming | None = None
    """Warm-up state and its flusher (:mod:`egressd.warming`), when a source warms up."""
    fleet: Fleet | None = None
    """The Redis client and heartbeats (:mod:`egressd.fleet.node`), with backend redis."""
    extras: Extras | None = None
    refusing: int = 0
    """Connections being refused right now (the door's refusal takes a few round trips)."""
    open_socket: Callable[[tuple[str, Endpoint]], socket.socket] = field(
        default=lambda key: open_listener(key[1])
    )
    """Binds a listener's socket; a worker takes the one its supervisor passed instead."""
    worker: int | None = None
    """This process's worker number under a supervisor (:mod:`egressd.supervisor`)."""
    balance: Balance | None = None
    """A worker's count of its connections, and its wait before an accept while it is
    busier than another worker (:mod:`egressd.net.balance`); None for a single process."""
    _lock: trio.Lock = field(default_factory=trio.Lock)

    def config_generation(self) -> str:
        """A hash of the files of the running configuration (the fleet view compares it)."""
        return config_generation(watched_files(self.runtime.config))

    def connections_by_source(self) -> dict[str, int]:
        """Active connections per source, for the heartbeat record."""
        return {s.name: s.active_connections for s in self.runtime.health.snapshot()}

    def bound_ports(self) -> dict[tuple[str, Endpoint], int]:
        """Each listener's real port (port 0 in the configuration picks a free one)."""
        return {key: running.port for key, running in self.listeners.items()}

    async def start_listener(self, key: tuple[str, Endpoint], listener: Listener) -> None:
        self._run_listener(key, listener, open_listener(key[1]))

    def _run_listener(
        self, key: tuple[str, Endpoint], listener: Listener, socket_listener: socket.socket
    ) -> None:
        door_name, address = key
        running = _Running(door_name, listener, trio.CancelScope(), bound_port(socket_listener))
        self.listeners[key] = running

        def handler(connection: Connection) -> Awaitable[None]:
            # The coroutine itself, not one awaiting it: a frame less for a session's life.
            return self.handle_connection(self.doors[running.door], running, connection)

        async def loop() -> None:
            try:
                with running.scope:
                    await accept_loop(socket_listener, handler, self.connections, self.balance)
            finally:
                running.closed.set()

        self.connections.start_soon(loop)
        log.info(
            "listening",
            extra={"fields": {"door": door_name, "address": str(address), "port": running.port}},
        )

    def stop_listener(self, key: tuple[str, Endpoint]) -> None:
        """Close a listener (its socket closes as soon as its accept loop runs)."""
        running = self.listeners.pop(key)
        running.scope.cancel()
        log.info("listener closed", extra={"fields": {"door": key[0], "address": str(key[1])}})

    async def close_listeners(self) -> None:
        """Close every listener and wait until their sockets are closed."""
        closing = [self.listeners[key] for key in list(self.listeners)]
        for key in list(self.listeners):
            self.stop_listener(key)
        for running in closing:
            await running.closed.wait()

    async def reconcile_listeners(self, config: Config) -> None:
        """Bind what ``config`` adds, close what it drops, keep the rest (raises OSError).

        Returns once the dropped listeners' sockets are closed.
        """
        stopped = self._adopt_listeners(config, await self._open_new_listeners(config))
        for running in stopped:
            await running.closed.wait()

    async def _open_new_listeners(
        self, config: Config
    ) -> dict[tuple[str, Endpoint], socket.socket]:
        """Bind every listener ``config`` adds; on a failure close them all and raise OSError.

        An address that stays but moves to another door keeps its socket (see
        :meth:`_adopt_listeners`), so nothing here binds an address that is already bound.
        A listener on port 0 (any free port) is the same listener only for the same door.
        """
        running_addresses = {address for _, address in self.listeners if address.port}
        opened: dict[tuple[str, Endpoint], socket.socket] = {}
        try:
            for key in configured_listeners(config):
                if key not in self.listeners and key[1] not in running_addresses:
                    opened[key] = self.open_socket(key)
        except OSError as exc:
            for socket_listener in opened.values():
                close_listener(socket_listener)
            raise OSError(
                exc.errno, f"cannot listen on {key[1]} ({key[0]}): {exc.strerror}"
            ) from exc
        return opened

    def _adopt_listeners(
        self,
        config: Config,
        opened: dict[tuple[str, Endpoint], socket.socket],
    ) -> list[_Running]:
        """Start ``opened``, re-tag kept listeners, stop dropped ones; return the stopped."""
        wanted = configured_listeners(config)
        stopped: list[_Running] = []
        for key in [k for k in self.listeners if not k[1].port and k not in wanted]:
            stopped.append(self.listeners[key])
            self.stop_listener(key)
        by_address = {k[1]: k for k in self.listeners if k[1].port}
        for address, key in by_address.items():
            new_key = next((k for k in wanted if k[1] == address), None)
            if new_key is None:
                stopped.append(self.listeners[key])
                self.stop_listener(key)
            elif new_key != key:
                running = self.listeners.pop(key)
                running.door = new_key[0]
                self.listeners[new_key] = running
                log.info(
                    "listener moved to another door",
                    extra={"fields": {"address": str(address), "door": new_key[0]}},
                )
        for key, listener in wanted.items():
            if key in opened:
                self._run_listener(key, listener, opened[key])
            else:
                self.listeners[key].listener = listener
        return stopped

    async def handle_connection(
        self, door: Door, running: _Running, connection: Connection
    ) -> None:
        host, port = peer_of(connection)
        client = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        refusal = client_refusal(self.runtime.config.access, host)
        if refusal is not None:
            log.warning("client refused", extra={"fields": {"door": door.name, "reason": refusal}})
            return
        try:
            listener = str(running.listener.address)
            async with self.runtime.session(door.name, client, listener, host=host) as record:
                record.pool = running.listener.pool
                await door.handle(connection, self.runtime, running.listener, record)
        except Overloaded as exc:
            log.warning(
                "connection refused", extra={"fields": {"client": client, "reason": str(exc)}}
            )
            self.metrics.connections.labels(door.name, "", "", "overloaded").inc()
            await self._refuse(door, connection, running.listener, str(exc))

    async def _refuse(
        self, door: Door, connection: Connection, listener: Listener, reason: str
    ) -> None:
        """The door's protocol-correct refusal, within a few seconds, for a bounded number.

        A refused connection is outside every session cap, so the refusals in progress have
        a cap of their own (:data:`REFUSALS_AT_ONCE`): beyond it a connection is closed
        without a word, and a flood of connections cannot hold descriptors by being refused.
        """
        if self.refusing >= REFUSALS_AT_ONCE:
            return
        self.refusing += 1
        try:
            with trio.move_on_after(REFUSAL_TIMEOUT):
                await door.refuse(connection, self.runtime, listener, reason)
        finally:
            self.refusing -= 1

    async def reload(self, reason: str) -> bool:
        """Load, validate and swap in the configuration; True when it was swapped.

        Refused (every error logged, the old configuration stays): an invalid file, or a new
        listener that cannot be bound. A reload during the drain is ignored.
        """
        async with self._lock:
            if self.runtime.draining:
                log.info("reload ignored while draining", extra={"fields": {"trigger": reason}})
                return False
            sdnotify.reloading(f"reloading ({reason})")
            try:
                await self.commit_reload(await self.prepare_reload())
            except ReloadRefused as exc:
                self.reload_refused(reason, exc)
                sdnotify.ready(self.status_line())
                return False
            self.reloaded(reason, self.reloads + 2)
            sdnotify.ready(self.status_line())
            return True

    def reload_refused(self, reason: str, exc: ReloadRefused) -> None:
        """Log why a reload was refused and count it."""
        for error in exc.errors:
            log.error("reload refused: %s", error)
        log.error(
            "reload failed, still running on the previous configuration",
            extra={"fields": {"trigger": reason, "errors": len(exc.errors)}},
        )
        self.reload_failures += 1
        self._reloaded(False)

    def reloaded(self, reason: str, generation: int) -> None:
        """A reload took effect: the configuration's generation is now ``generation``."""
        self.reloads = generation - 1
        log.info(
            "configuration reloaded",
            extra={"fields": {"trigger": reason, "generation": generation}},
        )
        self._reloaded(True)

    async def prepare_reload(self) -> PreparedReload:
        """Load and validate the files, bind the new listeners; nothing changes yet.

        Raises :class:`ReloadRefused`. Follow with :meth:`commit_reload` or
        :meth:`abort_reload` (a supervisor prepares every worker before it commits any).
        """
        path = self.runtime.config.path
        self.files_seen = file_fingerprint(watched_files(self.runtime.config))
        try:
            config = load_config(path)
            shaping = await load_policy_in_thread(config)
        except ConfigError as exc:
            raise ReloadRefused(exc.errors) from exc
        errors = config_errors(config)  # a certificate that check refuses (the old one stays)
        if errors:
            raise ReloadRefused(errors)
        files = self.files_seen = file_fingerprint(watched_files(config))
        warming = await self._warming_wanted_by(config)
        try:
            opened = await self._open_new_listeners(config)
        except OSError as exc:
            if warming is not None:
                await warming.store.close()
            raise ReloadRefused([str(exc.strerror or exc)]) from exc
        return PreparedReload(config, shaping, opened, files, warming)

    def abort_reload(self, prepared: PreparedReload) -> None:
        """Drop a prepared reload: close the listeners it bound."""
        for socket_listener in prepared.opened.values():
            close_listener(socket_listener)
        prepared.opened.clear()
        if prepared.warming is not None:
            self.connections.start_soon(prepared.warming.store.close)
            prepared.warming = None

    async def _warming_wanted_by(self, config: Config) -> Warming | None:
        """The state store and warm-up engine a reload needs first (a source now warms up,
        or shaping files with a named state place); ReloadRefused when it is unusable."""
        if self.warming is not None or not state_wanted(config, os.environ):
            return None
        client = self.fleet.client if self.fleet is not None else None
        try:
            return await open_warming(config, client=client)
        except StateError as exc:
            raise ReloadRefused([str(exc)]) from exc

    def adopt_warming(self, warming: Warming) -> None:
        """Selection asks ``warming``'s engine from now on; its flusher runs."""
        attach_warming(self.runtime, warming)
        self.warming = warming
        self.connections.start_soon(warming.run_flusher)

    async def commit_reload(self, prepared: PreparedReload) -> Config:
        """Swap in a prepared configuration (one assignment), adopt its listeners."""
        config = prepared.config
        if self.worker is None and config.daemon.workers != self.runtime.config.daemon.workers:
            log.warning(
                "[daemon] workers changed: a single process starts workers at its next start",
                extra={"fields": {"workers": config.daemon.workers}},
            )
        if config.state != self.runtime.config.state:
            log.warning(
                "[state] changed: the state backend keeps its settings until a restart",
                extra={"fields": {"backend": self.runtime.config.state.backend}},
            )
        self.runtime.swap_config(config, prepared.shaping)
        if prepared.warming is not None:
            self.adopt_warming(prepared.warming)
            prepared.warming = None
        for running in self._adopt_listeners(config, prepared.opened):
            await running.closed.wait()
        setup_logging(
            "json" if self.json_logs else config.log.format,
            config.log.level,
            config.log.flush_interval,
        )
        if self.extras is not None:
            await self.extras.apply(config)
        return config

    def _reloaded(self, ok: bool) -> None:
        for hook in self.on_reload:
            hook(ok)

    def status_line(self) -> str:
        """One line for ``systemctl status``."""
        pools = len(self.runtime.config.pools)
        return (
            f"generation {self.reloads + 1}, {len(self.listeners)} listeners, {pools} pools, "
            f"{self.runtime.active_sessions} sessions"
        )

    async def drain(self) -> None:
        """Stop accepting, let sessions finish within the grace period.

        The listening sockets are closed before STOPPING=1 goes out, so from then on a new
        connection is refused by the kernel.
        """
        async with self._lock:
            self.runtime.begin_drain()
            await self.close_listeners()
        grace = self.runtime.config.limits.shutdown_grace
        sdnotify.stopping(f"draining {self.runtime.active_sessions} sessions")
        log.info(
            "draining",
            extra={"fields": {"sessions": self.runtime.active_sessions, "grace_seconds": grace}},
        )
        with trio.move_on_after(grace):
            await self.runtime.wait_idle()
        if self.runtime.active_sessions:
            log.warning(
                "grace period over, closing remaining sessions",
                extra={"fields": {"sessions": self.runtime.active_sessions}},
            )


def file_fingerprint(paths: list[Path]) -> Fingerprint:
    prints: Fingerprint = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            prints.append(None)
            continue
        prints.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return prints


def watched_files(config: Config) -> list[Path]:
    return [config.path, *config.source_files, *config.shaping_files, *config.key_files]


class SettledChange:
    """Tells when a change of the watched files has settled: the same at two polls in a row.

    A file rewritten in place passes through states that may parse (a valid prefix that
    lacks a listener, say); one poll could land on such a state. Two polls that see the
    same new fingerprint (inode, size, mtime) make that unlikely; writing the file
    atomically (write a temporary file, then rename it over) makes it impossible.
    """

    def __init__(self) -> None:
        self.candidate: Fingerprint | None = None

    def poll(self, applied: Fingerprint, current: Fingerprint) -> bool:
        """True when ``current`` differs from ``applied`` and was already seen last poll."""
        if current == applied:
            self.candidate = None
            return False
        if current == self.candidate:
            self.candidate = None
            return True
        self.candidate = current
        return False


def watch_period(config: Config) -> float:
    """Half the shortest ttl (at least 0.2 s): two polls in a row fit within the ttl."""
    return max(0.2, config.min_ttl / 2)


async def watch_config_files(daemon: Daemon) -> None:
    """Reload when the main file or a sources file changed and settled (:class:`SettledChange`).

    Polled every half of the shortest ttl, so a change applies within the ttl. Compared
    against :attr:`Daemon.files_seen`, which every reload (SIGHUP included) refreshes, so a
    change already picked up by a SIGHUP does not reload twice.
    """
    settled = SettledChange()
    while True:
        await trio.sleep(watch_period(daemon.runtime.config))
        if daemon.runtime.draining:
            return
        current = file_fingerprint(watched_files(daemon.runtime.config))
        if settled.poll(daemon.files_seen, current):
            await daemon.reload("file change")


HEALTH_CHECK_PERIOD = 1.0


async def announce_recoveries(daemon: Daemon) -> None:
    """Log "source back in service" once a suspension has run out (checked every second)."""
    while True:
        await trio.sleep(HEALTH_CHECK_PERIOD)
        for name in daemon.runtime.health.expire_suspensions():
            log.info("source back in service", extra={"fields": {"source": name}})


async def serve(
    config: Config,
    *,
    doors: dict[str, Door] | None = None,
    json_logs: bool = False,
    link: WorkerLink | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM/SIGINT (and their drain) or cancellation.

    Startup order: the fleet's Redis client (``[state] backend = "redis"``), metrics
    endpoint and control socket, then every front-door listener, then READY=1; a listener
    that cannot be bound ends ``serve`` with OSError before it. A worker (``link``: its
    supervisor's channel) takes its listening sockets from the supervisor, which also owns
    the metrics endpoint, the control socket, the file watch, reloads and systemd's
    notifications (:mod:`egressd.workerlink`); it beats its own heartbeat as NODE/WORKER.
    """
    async with open_fleet(config) as fleet:
        await _serve(config, fleet, doors, json_logs, link, task_status)


async def _serve(
    config: Config,
    fleet: Fleet | None,
    doors: dict[str, Door] | None,
    json_logs: bool,
    link: WorkerLink | None,
    task_status: trio.TaskStatus[Daemon],
) -> None:
    metrics = Metrics()
    shaping = await load_policy_in_thread(config)
    runtime = Runtime(config, observe.egress_observer(metrics), shaping)
    client = fleet.client if fleet is not None else None
    warming = await open_warming(config, client=client)  # StateError: no start
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as connections:
            daemon = Daemon(
                runtime,
                doors if doors is not None else load_doors(),
                connections,
                metrics=metrics,
                json_logs=json_logs,
                files_seen=file_fingerprint(watched_files(config)),
                warming=warming,
                fleet=fleet,
            )
            observe.count_into_metrics(daemon)
            stop = _Stop()
            if config.state.backend == "redis":
                await share_budgets(runtime, metrics, config, connections)
            if link is None:
                daemon.extras = observe.Extras(daemon, connections)
                await daemon.extras.apply(config, at_startup=True)
            else:
                await link.hello()
                daemon.worker, daemon.reloads, daemon.open_socket = (
                    link.worker,
                    link.generation - 1,
                    link.take,
                )
                daemon.balance = link.balance()
                await connections.start(link.run, daemon, stop.set)
                if config.state.backend == "sqlite":
                    await share_host_budgets(runtime, config, link, connections)
            if warming is not None:  # after share_*budgets, which rebuild the shaper: the
                daemon.adopt_warming(warming)  # suspensions restored go in the new one
            await daemon.reconcile_listeners(config)
            connections.start_soon(write_log_lines)
            connections.start_soon(announce_recoveries, daemon)
            connections.start_soon(_handle_signals, daemon, signals, stop, link is None)
            connections.start_soon(mtasts.run_refresher, lambda: runtime.config)
            if fleet is not None:
                worker = None if link is None else str(link.worker)
                fleet.start(
                    connections, daemon.config_generation, daemon.connections_by_source, worker
                )
            if link is None:
                connections.start_soon(watch_config_files, daemon)
                await connections.start(sdnotify.watchdog_loop)
                sdnotify.ready(daemon.status_line())
            else:
                await link.ready()
            log.info("egressd ready", extra={"fields": {"listeners": len(daemon.listeners)}})
            task_status.started(daemon)
            await stop.event.wait()
            log.info("shutting down", extra={"fields": {"signal": stop.reason}})
            await daemon.drain()
            connections.cancel_scope.cancel()
    if daemon.warming is not None:
        await daemon.warming.close()
    if fleet is not None:
        await fleet.leave()


async def write_log_lines() -> None:
    """Write the held log lines ``[log] flush_interval`` after the first (see
    :mod:`egressd.log`), and all of them when cancelled (shutdown, a crash)."""
    try:
        while True:
            wake = trio.Event()
            hold_lines(wake.set)
            await wake.wait()
            await trio.sleep(held_interval())
            write_held_lines()
    finally:
        hold_lines(None)


class _Stop:
    """Set once: the drain starts (a signal, or the supervisor asked)."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()


async def _handle_signals(
    daemon: Daemon, signals: AsyncIterator[int], stop: _Stop, reloads: bool
) -> None:
    """SIGHUP reloads (a worker leaves reloads to its supervisor); SIGTERM/SIGINT drain."""
    async for signum in signals:
        if signum != signal.SIGHUP:
            stop.set(signal.Signals(signum).name)
        elif reloads:
            await daemon.reload("SIGHUP")
        else:
            log.info("SIGHUP ignored: the supervisor reloads every worker")


async def share_budgets(
    runtime: Runtime, metrics: Metrics, config: Config, nursery: trio.Nursery
) -> None:
    """Count the shaping budgets in Redis, shared by the fleet (before any listener)."""
    from egressd.fleet.budgets import serve_fleet_budgets  # glide: only with redis

    metrics.budgets_shared_changed(True)
    shared = await nursery.start(
        partial(serve_fleet_budgets, config.state, changed=metrics.budgets_shared_changed)
    )
    runtime.share_budgets(shared)


async def share_host_budgets(
    runtime: Runtime, config: Config, link: WorkerLink, nursery: trio.Nursery
) -> None:
    """A worker with the embedded backend counts the shaping budgets in its supervisor's book
    (:mod:`egressd.hostbudgets`), shared exactly by every worker of the host: the same
    shared ledger and shell as for Redis, asking the supervisor over the worker's channel."""
    ledger = SharedLedger(f"worker{link.worker}/{os.getpid()}", prefix="egressd:")
    shared = FleetBudgets(
        ledger,
        SupervisorBudgets(link),
        lease_timeout=config.state.lease_timeout,
        heartbeat_interval=config.state.heartbeat_interval,
        unavailable=(ChannelClosed,),
    )
    await nursery.start(shared.run)
    runtime.share_budgets(shared)


def attach_warming(runtime: Runtime, warming: Warming) -> None:
    """Selection asks the engine and holds its quotas; the doors count into it
    (:mod:`egressd.egress.quotas`), against the shaping provider of the destination."""
    runtime.warmup = warming.engine
    shared = runtime.shared_budgets
    if isinstance(shared, FleetBudgets) and runtime.shared_quotas is None:
        quotas = SharedQuotas(warming.engine, prefix=shared.ledger.prefix)
        shared.share_quotas(quotas)  # the quotas hold across workers and nodes
        runtime.shared_quotas = quotas
    warming.attach_shaper(lambda: runtime.shaper)
    warming.attach_policy_cache(mtasts.DEFAULT_STORE)


EX_CONFIG = 78
"""A state database egressd cannot use will not heal by restarting (RestartPreventExitStatus)."""

EX_TEMPFAIL = 75
"""The state backend (Redis) is unreachable at startup: it may come back, so systemd's
``Restart=on-failure`` tries again."""


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one: a spliced connection costs several fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, hard
        soft = hard
    return soft, hard


def run_daemon(
    config: Config, *, json_logs: bool = False, worker: tuple[int, int] | None = None
) -> int:
    """``egressd run``: 0 after a clean shutdown, 1 when startup failed (logged).

    ``worker``: (number, channel descriptor) of a worker its supervisor started.
    """
    if worker is not None:
        PROCESS_FIELDS["worker"] = worker[0]
    setup_logging(
        "json" if json_logs else config.log.format, config.log.level, config.log.flush_interval
    )
    soft, _ = raise_open_files_limit()
    log.info(
        "starting",
        extra={
            "fields": {
                "config": str(config.path),
                "pid": os.getpid(),
                "open_files": soft,
                "build": build(),
            }
        },
    )
    tune_garbage_collector()
    if worker is None:  # systemd's sockets (a worker's come from its supervisor)
        activation.inherit(key[1] for key in configured_listeners(config))
    link = None if worker is None else WorkerLink(worker[0], socket.socket(fileno=worker[1]))
    try:
        trio.run(partial(serve, config, json_logs=json_logs, link=link))
    except StateUnavailable as exc:
        log.error("cannot start: %s", exc)
        return EX_TEMPFAIL
    except StateError as exc:
        log.error("cannot start: %s", exc)
        return EX_CONFIG
    except Exception as exc:
        error = startup_error(exc)
        if error is None:
            raise
        log.error("cannot start: %s", error)
        return 1
    log.info("stopped")
    return 0


def tune_garbage_collector() -> None:
    """Keep the collector off the per-connection path.

    What exists after startup (modules, configuration) lives as long as the process:
    ``gc.freeze`` moves it out of every later collection. A connection allocates a few
    hundred objects, most freed by reference counting; a youngest-generation threshold of
    10,000 instead of 700 makes the collector run a dozen times less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def startup_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed startup (trio wraps it in exception groups), if any."""
    if isinstance(exc, OSError):
        return exc
    inner: tuple[BaseException, ...] = getattr(exc, "exceptions", ())
    return startup_error(inner[0]) if len(inner) == 1 else None
