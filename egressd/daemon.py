"""The daemon: root nursery, listeners, signals, reload, drain and readiness.

Theory of operation
-------------------
``serve()`` binds every configured listener, then tells systemd READY=1. Accepted
connections run in one daemon-wide nursery, apart from the listeners' accept loops, so a
listener can be removed on reload, or all of them closed at the start of a drain, without
disturbing connections in flight.

Reload (SIGHUP, or a change of the main file or a sources file, polled at the sources'
shortest ``ttl``): the new configuration is loaded and validated off to the side. Invalid:
every error is logged and the daemon keeps running on the old one. Valid: it is swapped in
with one assignment (:meth:`Runtime.swap_config`), listeners that disappeared are closed,
new ones are bound, and the others keep their socket (a changed default pool applies to the
next connection they accept).

SIGTERM or SIGINT: STOPPING=1, stop accepting, give sessions ``[limits] shutdown_grace`` to
finish (SMTP sessions are told 421 at their next command boundary), then cancel what is
left and exit 0.
"""

from __future__ import annotations

import os
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from egressd.access import client_refusal
from egressd.config import Config, ConfigError, Endpoint, Listener, load_config
from egressd.log import get_logger, setup_logging
from egressd.net import sdnotify
from egressd.net.listen import accept_loop, bound_port, open_listener, peer_of
from egressd.runtime import Overloaded, Runtime, SessionRecord

log = get_logger("daemon")


class Door(Protocol):
    """A front door: speaks one protocol to clients, dials out through the runtime."""

    name: str

    async def handle(
        self,
        stream: trio.SocketStream,
        runtime: Runtime,
        listener: Listener,
        record: SessionRecord,
    ) -> None: ...

    async def refuse(self, stream: trio.SocketStream, reason: str) -> None:
        """Answer a connection that cannot be served (overload) protocol-correctly."""


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
    listener: Listener
    scope: trio.CancelScope
    port: int


@dataclass
class Daemon:
    """One running egressd: its runtime, listeners and connection nursery."""

    runtime: Runtime
    doors: dict[str, Door]
    connections: trio.Nursery
    listeners: dict[tuple[str, Endpoint], _Running] = field(default_factory=dict)
    on_reload: list[Callable[[bool], None]] = field(default_factory=list)

    def bound_ports(self) -> dict[tuple[str, Endpoint], int]:
        """Each listener's real port (port 0 in the configuration picks a free one)."""
        return {key: running.port for key, running in self.listeners.items()}

    async def start_listener(self, key: tuple[str, Endpoint], listener: Listener) -> None:
        door_name, address = key
        socket_listener = await open_listener(address)
        scope = trio.CancelScope()
        running = _Running(listener, scope, bound_port(socket_listener))
        self.listeners[key] = running

        async def handler(stream: trio.SocketStream) -> None:
            await self.handle_connection(self.doors[door_name], running, stream)

        async def loop() -> None:
            with scope:
                await accept_loop(socket_listener, handler, self.connections)

        self.connections.start_soon(loop)
        log.info("listening", extra={"fields": {"door": door_name, "address": str(address)}})

    def stop_listener(self, key: tuple[str, Endpoint]) -> None:
        running = self.listeners.pop(key)
        running.scope.cancel()
        log.info("listener closed", extra={"fields": {"door": key[0], "address": str(key[1])}})

    async def reconcile_listeners(self, config: Config) -> None:
        wanted = configured_listeners(config)
        for key in [k for k in self.listeners if k not in wanted]:
            self.stop_listener(key)
        for key, listener in wanted.items():
            if key in self.listeners:
                self.listeners[key].listener = listener
            else:
                await self.start_listener(key, listener)

    async def handle_connection(
        self, door: Door, running: _Running, stream: trio.SocketStream
    ) -> None:
        host, port = peer_of(stream)
        client = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        refusal = client_refusal(self.runtime.config.access, host)
        if refusal is not None:
            log.warning("client refused", extra={"fields": {"door": door.name, "reason": refusal}})
            return
        try:
            async with self.runtime.session(door.name, client) as record:
                record.pool = running.listener.pool
                await door.handle(stream, self.runtime, running.listener, record)
        except Overloaded as exc:
            log.warning(
                "connection refused", extra={"fields": {"client": client, "reason": str(exc)}}
            )
            with trio.move_on_after(5):
                await door.refuse(stream, str(exc))

    async def reload(self, reason: str) -> bool:
        """Load, validate and swap in the configuration; True when it was swapped."""
        path = self.runtime.config.path
        sdnotify.reloading()
        try:
            config = load_config(path)
        except ConfigError as exc:
            for error in exc.errors:
                log.error("reload refused: %s", error)
            log.error(
                "reload failed, still running on the previous configuration",
                extra={"fields": {"trigger": reason, "errors": len(exc.errors)}},
            )
            sdnotify.ready()
            self._reloaded(False)
            return False
        try:
            await self.reconcile_listeners(config)
        except OSError as exc:
            log.error("reload: cannot bind a new listener: %s", exc)
        self.runtime.swap_config(config)
        setup_logging(config.log.format, config.log.level)
        log.info("configuration reloaded", extra={"fields": {"trigger": reason}})
        sdnotify.ready()
        self._reloaded(True)
        return True

    def _reloaded(self, ok: bool) -> None:
        for hook in self.on_reload:
            hook(ok)

    async def drain(self) -> None:
        """Stop accepting, let sessions finish within the grace period."""
        sdnotify.stopping()
        self.runtime.begin_drain()
        for key in list(self.listeners):
            self.stop_listener(key)
        grace = self.runtime.config.limits.shutdown_grace
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


def file_fingerprint(paths: list[Path]) -> list[tuple[int, int, int] | None]:
    prints: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            prints.append(None)
            continue
        prints.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return prints


def watched_files(config: Config) -> list[Path]:
    return [config.path, *config.source_files]


async def watch_config_files(daemon: Daemon) -> None:
    """Reload when the main file or a sources file changes, checked every shortest ttl."""
    config = daemon.runtime.config
    seen = file_fingerprint(watched_files(config))
    while True:
        await trio.sleep(max(0.2, daemon.runtime.config.min_ttl))
        config = daemon.runtime.config
        now = file_fingerprint(watched_files(config))
        if now != seen:
            await daemon.reload("file change")
            seen = file_fingerprint(watched_files(daemon.runtime.config))


async def serve(
    config: Config,
    *,
    doors: dict[str, Door] | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM/SIGINT (and their drain) or cancellation."""
    runtime = Runtime(config)
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as connections:
            daemon = Daemon(runtime, doors if doors is not None else load_doors(), connections)
            await _start_extras(daemon, connections)
            await daemon.reconcile_listeners(config)
            connections.start_soon(watch_config_files, daemon)
            interval = sdnotify.watchdog_interval()
            if interval is not None:
                connections.start_soon(sdnotify.watchdog_loop)
            sdnotify.ready()
            log.info("egressd ready", extra={"fields": {"listeners": len(daemon.listeners)}})
            task_status.started(daemon)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await daemon.reload("SIGHUP")
                    continue
                log.info("shutting down", extra={"fields": {"signal": signal.Signals(signum).name}})
                await daemon.drain()
                connections.cancel_scope.cancel()
                break


async def _start_extras(daemon: Daemon, nursery: trio.Nursery) -> None:
    """Metrics endpoint and control socket, when configured."""
    from egressd import observe

    await observe.start(daemon, nursery)


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


def run_daemon(config: Config, *, json_logs: bool = False) -> int:
    setup_logging("json" if json_logs else config.log.format, config.log.level)
    soft, _ = raise_open_files_limit()
    log.info(
        "starting",
        extra={"fields": {"config": str(config.path), "pid": os.getpid(), "open_files": soft}},
    )
    try:
        trio.run(serve, config)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    log.info("stopped")
    return 0
