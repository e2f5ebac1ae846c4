"""``[daemon] workers = N``: a supervising parent and N worker processes, one daemon outside.

Theory of operation
-------------------
One egressd process uses one core. With ``workers`` above 1, ``egressd run`` becomes the
*supervisor*: it binds every front-door listener once and starts N workers
(``python -m egressd run --worker N:FD``), each an ordinary daemon with its own trio loop
(:func:`egressd.daemon.serve`) that accepts on the very sockets the supervisor bound,
passed over a channel (:mod:`egressd.net.channel`, ``SCM_RIGHTS``). The kernel queues each
connection once and the workers take turns at it, so fixed ports, port 0 and IPv6 behave
as with one process, nothing depends on ``SO_REUSEPORT``'s hashing, and a worker that dies
or restarts loses none of the connections waiting in the queue (with a socket per worker,
those hashed to its socket would be reset; why the wake-ups of a shared socket are kept is
in :mod:`egressd.net.listen`). With ``workers = 1``
(the default) there is no supervisor: ``egressd run`` is the daemon, as before.

What the supervisor owns, so that the outside sees one daemon:

* **systemd**: only the supervisor talks to ``$NOTIFY_SOCKET`` (workers get an
  environment without it). READY=1 goes out once every worker said it is ready; the
  watchdog pings come from the supervisor's loop, and each worker says ``alive`` every
  second from its own: a worker silent for ``[daemon] worker_timeout`` (its loop stuck) is
  killed with SIGKILL and started again, logged as hung.
* **Reload** (SIGHUP, ``ExecReload``, or a settled change of the watched files): all or
  none. The supervisor loads and validates the files first (an invalid file never reaches
  a worker), binds the new listeners, then asks every worker to *prepare* (load the same
  files, compare their fingerprints, take the new sockets, change nothing). Only when every
  worker prepared does it *commit* them all; otherwise it aborts them all and logs each
  worker's errors: the old configuration stays everywhere. A worker that fails a commit
  (it was draining, or it died in between) is named in the log with the generation the
  others run, and everyone keeps serving; a worker that died is started again on the new
  configuration.
* **Drain** (SIGTERM, SIGINT): STOPPING=1, the supervisor closes its copies of the
  listening sockets, tells every worker to drain (each closes its copies, so the kernel
  refuses new connections once all are closed, and lets its sessions finish within
  ``[limits] shutdown_grace``), waits for them, exits 0. The unit's ``KillMode=mixed``
  sends SIGTERM to the supervisor alone.
* **A worker that dies** is started again, at once the first time and after 1, 2, 4 ... 30
  seconds when it keeps dying within :data:`STABLE_AFTER` of its start, while the others
  keep serving. Its sessions die with it, and so do its connection leases (they live in
  its memory). A worker that cannot start before the daemon was ever ready stops the
  startup with its exit status (78 for an invalid configuration or state database).
* **The control socket** is the supervisor's: ``status`` asks every worker and merges the
  answers (:func:`egressd.aggregate.merge_status`: totals, one row per worker); suspend,
  resume and the warm-up changes go to every worker (each keeps its own source health and
  shaper), and explain to the first one.
* **The metrics endpoint** is the supervisor's: a scrape asks every worker for a snapshot
  of its registry and serves the merge (:func:`egressd.aggregate.merge_families`). One
  aggregating endpoint rather than prometheus_client's multiprocess mode: that mode needs
  its directory set before the first import, cannot clear labelled gauges (the
  ``egressd_source_*`` gauges are rewritten at each scrape), and drops the ``process_*``
  collector; here ``process_*`` are the sums over the supervisor and every worker.
* **Logs**: workers write to the supervisor's stderr (the journal sees one service, one
  ``SyslogIdentifier``), every line with ``worker=N``.

A reload that changes ``workers`` starts the new workers (on the new configuration), or
drains and retires the highest-numbered ones. Shaping budgets are shared exactly across
workers through the supervisor's book (:mod:`egressd.hostbudgets`); see the README
("Workers on one host").
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from egressd import __version__
from egressd.aggregate import (
    FamilyRow,
    count_open_breakers,
    merge_families,
    merge_status,
    retired_families,
    worker_families,
)
from egressd.config import Config, ConfigError, Endpoint, load_config
from egressd.control import ControlReply, parse_request, serve_control
from egressd.daemon import (
    EX_CONFIG,
    Fingerprint,
    SettledChange,
    configured_listeners,
    file_fingerprint,
    raise_open_files_limit,
    startup_error,
    tune_garbage_collector,
    watch_period,
    watched_files,
)
from egressd.hostbudgets import BudgetBook, BudgetRequestError
from egressd.log import get_logger, setup_logging
from egressd.metrics import SupervisorMetrics, serve_metrics
from egressd.net import activation, sdnotify
from egressd.net.balance import NOT_SERVING, SessionBoard
from egressd.net.channel import Channel, ChannelClosed, Message, socket_pair
from egressd.net.listen import close_listener, open_listener
from egressd.net.shaping import load_policy_in_thread
from egressd.workerlink import ListenerKey, listener_item

log = get_logger("supervisor")

BOARD_SLOTS = 256
"""Slots of the session board: the most workers ``[daemon] workers`` allows."""
STABLE_AFTER = 30.0
"""A worker that ran this long before it died is restarted at once (its crashes are old)."""
MAX_BACKOFF = 30.0
STARTUP_TIMEOUT = 60.0
"""A worker that has not said ready this long after its start is killed."""
ASK_TIMEOUT = 2.0
"""How long a status, a metrics snapshot or a control request may take a worker (less than
``egressd status`` waits for the supervisor, so a stuck worker shows as such)."""
PREPARE_TIMEOUT = 60.0
"""A prepare loads the files and the shaping policy (MX look-ups): a worker may take time."""
CHECK_PERIOD = 1.0
DRAIN_MARGIN = 10.0
"""Beyond ``shutdown_grace``, how long the supervisor waits for draining workers."""
WORKER_ENVIRONMENT_DROPPED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_")


def backoff(crashes: int) -> float:
    """Seconds before restarting a worker that died ``crashes`` times in a row quickly."""
    return 0.0 if crashes <= 1 else min(MAX_BACKOFF, 2.0 ** (crashes - 2))


@dataclass
class Worker:
    """One worker process as the supervisor tracks it."""

    number: int
    state: str = "starting"
    """starting (spawned, not ready yet), ready, or stopped."""
    pid: int | None = None
    process: trio.Process | None = None
    channel: Channel | None = None
    started: float = 0.0
    last_seen: float = 0.0
    sessions: int = 0
    restarts: int = 0
    crashes: int = 0
    ever_ready: bool = False
    retiring: bool = False
    """Draining for good: ``[daemon] workers`` went down at a reload."""
    ready: trio.Event = field(default_factory=trio.Event)
    replies: dict[int, tuple[trio.Event, list[Message]]] = field(default_factory=dict)
    families: list[FamilyRow] = field(default_factory=list)
    """Its last metrics snapshot (counters left behind when it dies)."""
    breakers: list[list[str]] | None = None
    """Its open destination breakers at its last snapshot, (destination, kind) each."""

    def row(self, now: float) -> dict[str, Any]:
        return {
            "worker": self.number,
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "last_seen": round(now - self.last_seen, 1) if self.state == "ready" else None,
        }


class StartupFailed(Exception):
    """A worker died before the daemon was ready; ``code`` is what ``run`` exits with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class Supervisor:
    """The parent of ``[daemon] workers`` processes (see the module doc)."""

    def __init__(self, config: Config, nursery: trio.Nursery, *, json_logs: bool) -> None:
        self.config = config
        self.nursery = nursery
        self.json_logs = json_logs
        self.count = config.daemon.workers
        self.workers = {number: Worker(number) for number in range(1, self.count + 1)}
        self.listeners: dict[ListenerKey, socket.socket] = {}
        self.generation = 1
        self.reload_failures = 0
        self.draining = False
        self.started_at = time.time()
        self.files_seen: Fingerprint = file_fingerprint(watched_files(config))
        self.metrics = SupervisorMetrics(self._families)
        self.retired: list[FamilyRow] = []
        self.board = SessionBoard.create(BOARD_SLOTS)
        self.board.set_workers(self.count)
        """Every worker's open sessions, which the workers balance their accepts on."""
        self.budgets = BudgetBook()
        """The host's shared budgets, asked by every worker (:mod:`egressd.hostbudgets`)."""
        self.metrics_port: int | None = None
        self._lock = trio.Lock()
        self._ids = itertools.count(1)
        self.ready_once = False
        """Every worker was ready once: from then on a dead worker is restarted, never fatal."""
        self._startup_failure: StartupFailed | None = None
        self._failed = trio.Event()

    # ------------------------------------------------------------------ listeners

    def bind_listeners(self, config: Config) -> dict[ListenerKey, socket.socket]:
        """Sockets for every listener of ``config``: kept ones, and new ones bound now.

        Mirrors the daemon's rule: an address that stays keeps its socket, also when it
        moves to another door. Raises OSError (closing what it bound) when one fails.
        """
        by_address = {key[1]: sock for key, sock in self.listeners.items() if key[1].port}
        result: dict[ListenerKey, socket.socket] = {}
        opened: list[socket.socket] = []
        try:
            for key in configured_listeners(config):
                sock = self.listeners.get(key) or (by_address.get(key[1]) if key[1].port else None)
                if sock is None:
                    sock = open_listener(key[1])
                    opened.append(sock)
                result[key] = sock
        except OSError as exc:
            for sock in opened:
                close_listener(sock)
            why = f"cannot listen on {key[1]} ({key[0]}): {exc.strerror}"
            raise OSError(exc.errno, why) from exc
        return result

    def adopt_listeners(self, sockets: dict[ListenerKey, socket.socket]) -> None:
        """Keep ``sockets``; close the supervisor's copy of every other."""
        kept = {id(sock) for sock in sockets.values()}
        for sock in self.listeners.values():
            if id(sock) not in kept:
                close_listener(sock)
        self.listeners = sockets

    def close_listeners(self) -> None:
        self.adopt_listeners({})

    def forget_listeners(self, sockets: dict[ListenerKey, socket.socket]) -> None:
        """Close the sockets of an aborted reload that the running configuration lacks."""
        running = {id(sock) for sock in self.listeners.values()}
        for sock in sockets.values():
            if id(sock) not in running:
                close_listener(sock)

    def _listener_message(
        self, sockets: dict[ListenerKey, socket.socket]
    ) -> tuple[list[dict[str, str]], list[int]]:
        keys = list(sockets)
        return [listener_item(key) for key in keys], [sockets[key].fileno() for key in keys]

    # ------------------------------------------------------------------ workers

    def worker_argv(self, number: int, fd: int) -> list[str]:
        argv = [sys.executable, "-m", "egressd", "run", "-c", str(self.config.path)]
        argv += ["--worker", f"{number}:{fd}"]
        return argv + (["--json-logs"] if self.json_logs else [])

    async def keep_running(self, worker: Worker) -> None:
        """Run ``worker`` and start it again whenever it dies, until the drain."""
        while not self.draining and not worker.retiring:
            began = trio.current_time()
            code = await self.run_worker(worker)
            if self.draining:
                return
            if worker.retiring:
                del self.workers[worker.number]
                log.info("worker retired", extra={"fields": {"worker": worker.number}})
                return
            lived = trio.current_time() - began
            worker.crashes = 1 if lived >= STABLE_AFTER else worker.crashes + 1
            if not self.ready_once:
                self._fail_startup(worker, code)
                return
            delay = backoff(worker.crashes)
            log.error(
                "worker died, starting it again",
                extra={
                    "fields": {
                        "worker": worker.number,
                        "pid": worker.pid,
                        "exit": _exit(code),
                        "restart_in": delay,
                    }
                },
            )
            await trio.sleep(delay)
            worker.restarts += 1
            self.metrics.worker_restarts.labels(str(worker.number)).inc()

    def resize(self, count: int) -> None:
        """Start workers up to ``count``, or drain and retire the highest-numbered ones."""
        for number in range(self.count + 1, count + 1):
            worker = self.workers[number] = Worker(number)
            self.nursery.start_soon(self.keep_running, worker)
        for number in range(count + 1, self.count + 1):
            worker = self.workers[number]
            worker.retiring, worker.state = True, "retiring"
            self.nursery.start_soon(self._retire, worker)
        self.count = count
        self.board.set_workers(count)

    async def _retire(self, worker: Worker) -> None:
        if worker.channel is not None:
            with contextlib.suppress(ChannelClosed):
                await worker.channel.send({"type": "drain"})
        elif worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.terminate()

    def _fail_startup(self, worker: Worker, code: int | None) -> None:
        status = code if code is not None and code > 0 else 1
        reason = f"worker {worker.number} exited ({_exit(code)}) before it was ready"
        self._startup_failure = StartupFailed(EX_CONFIG if status == EX_CONFIG else 1, reason)
        self._failed.set()

    async def run_worker(self, worker: Worker) -> int | None:
        """Start ``worker``'s process, serve its channel, return its exit status."""
        mine, theirs = socket_pair()
        channel = Channel(mine)
        argv = self.worker_argv(worker.number, theirs.fileno())
        try:
            async with trio.open_nursery() as nursery:
                try:
                    process: trio.Process = await nursery.start(
                        partial(
                            trio.run_process,
                            argv,
                            check=False,
                            stdin=subprocess.DEVNULL,
                            pass_fds=(theirs.fileno(), self.board.fd),
                            env=worker_environment(),
                        )
                    )
                finally:
                    theirs.close()
                self._started(worker, process, channel)
                nursery.start_soon(self._hello_and_listen, worker, channel)
                await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            channel.close()
            self._stopped(worker)
        return worker.process.returncode if worker.process is not None else None

    def _started(self, worker: Worker, process: trio.Process, channel: Channel) -> None:
        worker.process, worker.channel, worker.pid = process, channel, process.pid
        worker.state = "starting"
        worker.started = worker.last_seen = trio.current_time()
        log.info("worker started", extra={"fields": {"worker": worker.number, "pid": process.pid}})

    def _stopped(self, worker: Worker) -> None:
        worker.state = "retired" if worker.retiring else "stopped"
        worker.channel = None
        self.board.set(worker.number, NOT_SERVING)
        freed = self.budgets.forget(worker.number)
        if freed:
            log.info(
                "a stopped worker's connection slots returned",
                extra={"fields": {"worker": worker.number, "slots": freed}},
            )
        for event, _ in worker.replies.values():
            event.set()
        worker.replies.clear()
        self.retired = merge_families([self.retired, retired_families(worker.families)])
        worker.families = []

    async def _hello_and_listen(self, worker: Worker, channel: Channel) -> None:
        items, fds = self._listener_message(self.listeners)
        hello = {
            "type": "hello",
            "generation": self.generation,
            "listeners": items,
            "board": {"fd": self.board.fd, "workers": self.board.workers},
        }
        try:
            await channel.send(hello, fds)
            while True:
                message, sockets = await channel.receive()
                for sock in sockets:
                    sock.close()
                if message.get("type") == "budgets":
                    await channel.send(self._budgets(worker, message))
                else:
                    self._heard(worker, message)
        except ChannelClosed:
            pass

    def _budgets(self, worker: Worker, message: Message) -> Message:
        """A worker's batch of budget ops, run in the host's book (:mod:`egressd.hostbudgets`)."""
        worker.last_seen = trio.current_time()
        answer: Message = {"type": "answer", "id": message.get("id")}
        try:
            keys, args = message["keys"], message["args"]
            now_us = time.monotonic_ns() // 1000
            return {
                **answer,
                "ok": True,
                "reply": self.budgets.run(worker.number, keys, args, now_us),
            }
        except (KeyError, TypeError, BudgetRequestError) as exc:
            log.error("worker sent a malformed budget request: %s", exc)
            return {**answer, "ok": False, "error": str(exc)}

    def _heard(self, worker: Worker, message: Message) -> None:
        worker.last_seen = trio.current_time()
        kind = message.get("type")
        if kind == "alive":
            worker.sessions = int(message.get("sessions", 0))
        elif kind == "ready":
            worker.state, worker.ever_ready = "ready", True
            worker.ready.set()
            log.info("worker ready", extra={"fields": {"worker": worker.number, "pid": worker.pid}})
        elif kind == "reply":
            slot = worker.replies.get(int(message.get("id", 0)))
            if slot is not None:
                slot[1].append(message)
                slot[0].set()

    async def ask(
        self,
        worker: Worker,
        message: Message,
        fds: list[int] | None = None,
        timeout: float = ASK_TIMEOUT,
    ) -> Message | None:
        """Send ``message`` to ``worker``; its reply, or None (gone, or too slow)."""
        channel = worker.channel
        if channel is None:
            return None
        number = next(self._ids)
        event, box = trio.Event(), list[Message]()
        worker.replies[number] = (event, box)
        sent = False
        try:
            with trio.move_on_after(timeout):
                await channel.send({**message, "id": number}, fds or [])
                sent = True
                await event.wait()
        except ChannelClosed:
            return None
        finally:
            worker.replies.pop(number, None)
        if not sent:  # cut mid-message: the channel is unusable, and the worker is stuck
            self._kill_hung(worker, "its channel stayed full")
        return box[0] if box else None

    async def ask_all(
        self, message: Message, fds: list[int] | None = None, timeout: float = ASK_TIMEOUT
    ) -> dict[int, Message | None]:
        """``message`` to every ready worker at once; each one's reply (None: no answer)."""
        ready = [w for w in self.workers.values() if w.state == "ready"]
        replies: dict[int, Message | None] = {}

        async def one(worker: Worker) -> None:
            replies[worker.number] = await self.ask(worker, message, fds, timeout)

        async with trio.open_nursery() as nursery:
            for worker in ready:
                nursery.start_soon(one, worker)
        return replies

    async def watch_workers(self) -> None:
        """Kill a worker whose loop went silent (hung) or that never became ready."""
        timeout = self.config.daemon.worker_timeout
        while True:
            await trio.sleep(CHECK_PERIOD)
            now = trio.current_time()
            for worker in self.workers.values():
                process = worker.process
                if process is None or process.returncode is not None:
                    continue
                silent = now - worker.last_seen
                if worker.state == "ready" and silent > timeout:
                    self._kill_hung(worker, f"silent for {silent:.0f}s (worker_timeout)")
                elif worker.state == "starting" and now - worker.started > STARTUP_TIMEOUT:
                    self._kill_hung(worker, f"not ready after {STARTUP_TIMEOUT:.0f}s")

    def _kill_hung(self, worker: Worker, why: str) -> None:
        log.error(
            "worker hung, killing it",
            extra={"fields": {"worker": worker.number, "pid": worker.pid, "reason": why}},
        )
        worker.state = "hung"
        if worker.process is not None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()

    # ------------------------------------------------------------------ reload

    async def reload(self, reason: str) -> bool:
        """All workers or none (see the module doc); True when it took effect."""
        async with self._lock:
            if self.draining:
                log.info("reload ignored while draining", extra={"fields": {"trigger": reason}})
                return False
            sdnotify.reloading(f"reloading ({reason})")
            try:
                ok = await self._reload(reason)
            finally:
                sdnotify.ready(self.status_line())
            self.metrics.config_loaded(ok, time.time())
            return ok

    async def _reload(self, reason: str) -> bool:
        self.files_seen = file_fingerprint(watched_files(self.config))
        try:
            config = load_config(self.config.path)
            await load_policy_in_thread(config)
        except ConfigError as exc:
            return self._refused(reason, exc.errors)
        files = self.files_seen = file_fingerprint(watched_files(config))
        try:
            sockets = self.bind_listeners(config)
        except OSError as exc:
            return self._refused(reason, [str(exc.strerror or exc)])
        errors = await self._prepare_all(sockets, files)
        if errors:
            await self.ask_all({"type": "abort"})
            self.forget_listeners(sockets)
            return self._refused(reason, errors)
        await self._commit_all(reason)
        self.adopt_listeners(sockets)
        await self._adopt_config(config)
        log.info(
            "configuration reloaded",
            extra={"fields": {"trigger": reason, "generation": self.generation}},
        )
        return True

    async def _prepare_all(
        self, sockets: dict[ListenerKey, socket.socket], files: Fingerprint
    ) -> list[str]:
        items, fds = self._listener_message(sockets)
        prepare = {"type": "prepare", "listeners": items, "files": files}
        replies = await self.ask_all(prepare, fds, PREPARE_TIMEOUT)
        errors = []
        for number, reply in sorted(replies.items()):
            if reply is None:
                errors.append(f"worker {number}: no answer to the reload")
            elif not reply.get("ok"):
                errors += [f"worker {number}: {error}" for error in reply.get("errors", [])]
        return errors

    async def _commit_all(self, reason: str) -> None:
        """Commit every prepared worker; a worker that fails is named, not fatal."""
        self.generation += 1
        commit = {"type": "commit", "generation": self.generation, "reason": reason}
        replies = await self.ask_all(commit, timeout=PREPARE_TIMEOUT)
        for number, reply in sorted(replies.items()):
            if reply is None or not reply.get("ok"):
                errors = "; ".join(reply.get("errors", [])) if reply else "no answer"
                log.error(
                    "worker did not take the reload; restarting it on the new configuration",
                    extra={
                        "fields": {
                            "worker": number,
                            "reason": errors,
                            "generation": self.generation,
                        }
                    },
                )
                self._restart(self.workers[number])
        for worker in self.workers.values():
            if worker.number not in replies and worker.state == "starting":
                self._restart(worker)  # it may have read the old files: start it again

    def _restart(self, worker: Worker) -> None:
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.terminate()

    async def _adopt_config(self, config: Config) -> None:
        if config.daemon.workers != self.count:
            log.info(
                "[daemon] workers changed",
                extra={"fields": {"running": self.count, "configured": config.daemon.workers}},
            )
            self.resize(config.daemon.workers)
        self.config = config
        setup_logging("json" if self.json_logs else config.log.format, config.log.level)
        await self.extras.apply(config)

    def _refused(self, reason: str, errors: list[str]) -> bool:
        for error in errors:
            log.error("reload refused: %s", error)
        log.error(
            "reload failed, every worker still runs the previous configuration",
            extra={"fields": {"trigger": reason, "errors": len(errors)}},
        )
        self.reload_failures += 1
        return False

    async def watch_files(self) -> None:
        """Reload on a settled change of the watched files (as one daemon does)."""
        settled = SettledChange()
        while True:
            await trio.sleep(watch_period(self.config))
            if self.draining:
                return
            current = file_fingerprint(watched_files(self.config))
            if settled.poll(self.files_seen, current):
                await self.reload("file change")

    # ------------------------------------------------------------------ drain

    async def drain(self, why: str) -> None:
        """Close the supervisor's listener copies, drain every worker, wait for them."""
        async with self._lock:
            self.draining = True
        log.info("shutting down", extra={"fields": {"signal": why}})
        sdnotify.stopping(f"draining {self.count} workers")
        self.close_listeners()
        for worker in self.workers.values():
            if worker.channel is not None:
                with contextlib.suppress(ChannelClosed):
                    await worker.channel.send({"type": "drain"})
        with trio.move_on_after(self.config.limits.shutdown_grace + DRAIN_MARGIN):
            for worker in self.workers.values():
                while worker.process is not None and worker.process.returncode is None:
                    await trio.sleep(0.05)

    # ------------------------------------------------------------------ control, metrics

    async def answer(self, line: bytes) -> ControlReply:
        """One control-socket request for the whole daemon (see the module doc)."""
        try:
            request = parse_request(line)
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        if request["command"] == "status":
            return {"ok": True, "status": await self.status()}
        message = {"type": "request", "line": line.decode("utf-8", errors="replace")}
        if _changes_state(request):
            return _combine(await self.ask_all(message))
        for worker in self.workers.values():
            if worker.state == "ready":
                reply = await self.ask(worker, message)
                if reply is not None:
                    return dict(reply["reply"])
        return {"ok": False, "error": "no worker is ready to answer"}

    async def status(self) -> dict[str, Any]:
        replies = await self.ask_all({"type": "status"})
        statuses = {n: r["status"] for n, r in replies.items() if r is not None and r.get("ok")}
        now = trio.current_time()
        supervisor = {
            "pid": os.getpid(),
            "version": __version__,
            "config": str(self.config.path),
            "started": round(self.started_at, 3),
            "generation": self.generation,
            "reload_failures": self.reload_failures,
            "draining": self.draining,
        }
        rows = [worker.row(now) for worker in self.workers.values()]
        merged = merge_status(supervisor, rows, statuses)
        merged["host_budgets"] = {"slots": self.budgets.slots(time.monotonic_ns() // 1_000_000)}
        return merged

    async def gather_metrics(self) -> None:
        """Fetch every ready worker's metrics snapshot (before a scrape)."""
        for state in ("starting", "ready"):
            count = sum(1 for w in self.workers.values() if w.state == state)
            self.metrics.workers.labels(state).set(count)
        replies = await self.ask_all({"type": "metrics"})
        for number, reply in replies.items():
            if reply is not None and reply.get("ok"):
                self.workers[number].families = worker_families(reply["families"])
                self.workers[number].breakers = reply.get("breakers")

    def _families(self, own: list[FamilyRow]) -> list[FamilyRow]:
        live = [w for w in self.workers.values() if w.state not in ("stopped", "retired")]
        merged = merge_families([own, *(w.families for w in live), self.retired])
        if all(w.breakers is not None for w in live):  # workers from before: the maximum
            merged = count_open_breakers(merged, (w.breakers or [] for w in live))
        return merged

    def status_line(self) -> str:
        ready = sum(1 for w in self.workers.values() if w.state == "ready")
        sessions = sum(w.sessions for w in self.workers.values() if w.state == "ready")
        return (
            f"generation {self.generation}, {ready} of {self.count} workers ready, "
            f"{len(self.listeners)} listeners, {sessions} sessions"
        )

    extras: SupervisorEndpoints


def _changes_state(request: dict[str, Any]) -> bool:
    """Requests every worker must carry out (each keeps its own health and shaper)."""
    command = request["command"]
    if command in ("suspend", "resume"):
        return True
    return command == "warmup" and request.get("action", "status") not in ("status", "plan")


def _combine(replies: dict[int, Message | None]) -> ControlReply:
    """One reply from every worker's: the first refusal, else the first with any
    ``was_suspended`` true."""
    answers = [(n, r["reply"]) for n, r in sorted(replies.items()) if r is not None]
    if not answers:
        return {"ok": False, "error": "no worker is ready to answer"}
    for number, reply in answers:
        if not reply.get("ok"):
            return {**reply, "error": f"worker {number}: {reply.get('error')}"}
    combined = dict(answers[0][1])
    if "was_suspended" in combined:
        combined["was_suspended"] = any(reply.get("was_suspended") for _, reply in answers)
    missing = len(replies) - len(answers)
    if missing:
        combined["unanswered_workers"] = missing
    return combined


def _exit(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


def worker_environment() -> dict[str, str]:
    """The supervisor's environment without systemd's notify, watchdog and socket variables:
    only the supervisor speaks to systemd."""
    return {k: v for k, v in os.environ.items() if not k.startswith(WORKER_ENVIRONMENT_DROPPED)}


class SupervisorEndpoints:
    """The supervisor's metrics endpoint and control socket, matched to the configuration."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self._metrics: tuple[Endpoint, trio.CancelScope] | None = None
        self._control: tuple[str, trio.CancelScope] | None = None

    async def apply(self, config: Config, *, at_startup: bool = False) -> None:
        try:
            await self._apply_metrics(config.metrics.listen)
            await self._apply_control(config.control.socket)
        except OSError as exc:
            if at_startup:
                raise
            log.error("reload: %s", exc)

    async def _apply_metrics(self, endpoint: Endpoint | None) -> None:
        if self._metrics is not None and self._metrics[0] == endpoint:
            return
        if self._metrics is not None:
            self._metrics[1].cancel()
            self._metrics, self.supervisor.metrics_port = None, None
        if endpoint is None:
            return
        supervisor = self.supervisor
        serve = partial(
            serve_metrics,
            endpoint,
            supervisor.metrics.registry,
            settings=lambda: supervisor.config.metrics,
            gather=supervisor.gather_metrics,
        )
        try:
            scope, listeners = await self._start(serve)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {endpoint}: {exc.strerror}") from exc
        self._metrics = (endpoint, scope)
        supervisor.metrics_port = listeners[0].socket.getsockname()[1]
        log.info(
            "metrics endpoint listening",
            extra={"fields": {"address": str(endpoint), "port": supervisor.metrics_port}},
        )

    async def _apply_control(self, path: str | None) -> None:
        if self._control is not None and self._control[0] == path:
            return
        if self._control is not None:
            self._control[1].cancel()
            self._control = None
        if path is None:
            return
        scope, _ = await self._start(partial(serve_control, path, self.supervisor.answer))
        self._control = (path, scope)
        log.info("control socket listening", extra={"fields": {"path": path}})

    async def _start(self, service: Any) -> tuple[trio.CancelScope, Any]:
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await service(task_status=task_status)

        started = await self.supervisor.nursery.start(run)
        return scope, started


async def supervise(config: Config, *, json_logs: bool = False) -> int:
    """Bind, start the workers, serve until SIGTERM/SIGINT and the drain; the exit status."""
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(config, nursery, json_logs=json_logs)
            supervisor.extras = SupervisorEndpoints(supervisor)
            await supervisor.extras.apply(config, at_startup=True)
            supervisor.adopt_listeners(supervisor.bind_listeners(config))
            for worker in supervisor.workers.values():
                nursery.start_soon(supervisor.keep_running, worker)
            stop = _StopSignal()
            nursery.start_soon(_handle_signals, supervisor, signals, stop)
            code = await _until_ready(supervisor, stop.event)
            supervisor.ready_once = code is None
            if code is None:
                await _serve(supervisor, nursery, stop)
                code = 0
            else:
                supervisor.draining = True
                supervisor.close_listeners()
            nursery.cancel_scope.cancel()
    return code


class _StopSignal:
    def __init__(self) -> None:
        self.event = trio.Event()
        self.name = ""


async def _handle_signals(supervisor: Supervisor, signals: Any, stop: _StopSignal) -> None:
    """SIGHUP reloads every worker (once all are ready); SIGTERM/SIGINT start the drain."""
    async for signum in signals:
        if signum != signal.SIGHUP:
            stop.name = stop.name or signal.Signals(signum).name
            stop.event.set()
        elif supervisor.ready_once:
            await supervisor.reload("SIGHUP")
        else:
            log.warning("SIGHUP ignored: the workers are still starting")


async def _serve(supervisor: Supervisor, nursery: trio.Nursery, stop: _StopSignal) -> None:
    """READY=1 (unless a stop came during the startup), then serve until the stop; drain."""
    if not stop.event.is_set():
        nursery.start_soon(supervisor.watch_workers)
        nursery.start_soon(supervisor.watch_files)
        await nursery.start(sdnotify.watchdog_loop)
        sdnotify.ready(supervisor.status_line())
        log.info(
            "egressd ready",
            extra={"fields": {"workers": supervisor.count, "listeners": len(supervisor.listeners)}},
        )
        await stop.event.wait()
    await supervisor.drain(stop.name)


async def _until_ready(supervisor: Supervisor, stopped: trio.Event) -> int | None:
    """None once every worker is ready (or a stop signal came); the exit status if a worker
    died before that."""
    async with trio.open_nursery() as nursery:

        async def all_ready() -> None:
            for worker in supervisor.workers.values():
                await worker.ready.wait()
            nursery.cancel_scope.cancel()

        async def cancel_on(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(all_ready)
        nursery.start_soon(cancel_on, supervisor._failed)
        nursery.start_soon(cancel_on, stopped)
    failure = supervisor._startup_failure
    if failure is not None:
        log.error("cannot start: %s", failure)
        return failure.code
    return None


def run_supervisor(config: Config, *, json_logs: bool = False) -> int:
    """``egressd run`` with ``[daemon] workers`` above 1: the exit status."""
    setup_logging("json" if json_logs else config.log.format, config.log.level)
    soft, _ = raise_open_files_limit()
    log.info(
        "starting",
        extra={
            "fields": {
                "config": str(config.path),
                "pid": os.getpid(),
                "open_files": soft,
                "workers": config.daemon.workers,
            }
        },
    )
    tune_garbage_collector()
    activation.inherit(key[1] for key in configured_listeners(config))  # systemd's sockets
    try:
        code = trio.run(partial(supervise, config, json_logs=json_logs))
    except Exception as exc:
        error = startup_error(exc)
        if error is None:
            raise
        log.error("cannot start: %s", error)
        return 1
    log.info("stopped")
    return code
