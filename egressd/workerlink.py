"""A worker's end of the supervisor's channel (``[daemon] workers`` above 1).

Theory of operation
-------------------
A worker is an ordinary daemon (:func:`egressd.daemon.serve`) whose listening sockets,
reloads, drain, control requests and metrics scrapes come from its supervisor
(:mod:`egressd.supervisor`) over a :class:`~egressd.net.channel.Channel` instead of from
its own binds, signals, control socket and metrics endpoint:

* ``hello`` (the first message) carries the worker's number, the configuration's
  generation and one listening socket per configured listener, bound once by the supervisor:
  every worker accepts on the same sockets, and the kernel hands each connection to one;
* ``prepare`` carries the sockets of the new configuration's listeners and the
  fingerprints of the files the supervisor validated: the worker loads and validates the
  files itself (:meth:`Worked.prepare_reload`) and answers whether it could, without
  changing anything; ``commit`` swaps it in, ``abort`` drops it. The supervisor commits
  only when every worker prepared, so a reload applies to all workers or to none;
* ``status`` and ``request`` (a control-socket line) are answered from this worker's state
  with :class:`~egressd.observe.DaemonControls`; ``metrics`` with a snapshot of its registry
  (:func:`egressd.metrics.snapshot`);
* ``drain`` (and the channel's end of file: the supervisor is gone) starts the drain.

Every :data:`HEARTBEAT_PERIOD` the worker says ``alive`` from its event loop; a supervisor
that hears nothing for ``[daemon] worker_timeout`` kills and restarts it. Each request is
answered by a task of its own (a prepare may take seconds; the worker's own questions, its
shared budgets, must not wait for it); the supervisor sends a commit or an abort only once
every prepare was answered, so they never overtake one.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio

from egressd.config import Config, Endpoint, format_hostport, parse_hostport
from egressd.control import handle_request
from egressd.log import get_logger
from egressd.metrics import Metrics, snapshot
from egressd.net.balance import SessionBoard, WorkerShare
from egressd.net.channel import Channel, ChannelClosed, Message
from egressd.net.listen import close_listener
from egressd.observe import DaemonControls, Observed, refresh_gauges
from egressd.runtime import Runtime

log = get_logger("worker")

HEARTBEAT_PERIOD = 1.0
REQUEST_TIMEOUT = 5.0
ListenerKey = tuple[str, Endpoint]


class Prepared(Protocol):
    """A prepared reload (:class:`egressd.daemon.PreparedReload`)."""

    @property
    def files(self) -> list[tuple[int, int, int] | None]: ...


class Worked(Observed, Protocol):
    """The daemon as its worker link drives it."""

    @property
    def runtime(self) -> Runtime: ...

    @property
    def metrics(self) -> Metrics: ...

    async def prepare_reload(self) -> Any: ...

    async def commit_reload(self, prepared: Any) -> Config: ...

    def abort_reload(self, prepared: Any) -> None: ...

    def reloaded(self, reason: str, generation: int) -> None: ...


class ReloadError(Exception):
    """A prepare this worker refused; ``errors`` are its log lines."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def listener_key(item: dict[str, Any]) -> ListenerKey:
    """A listener as the supervisor names it: ``{"door": ..., "address": "ip:port"}``."""
    return str(item["door"]), parse_hostport(
        str(item["address"]), allow_names=False, allow_zero=True
    )


def listener_item(key: ListenerKey) -> dict[str, str]:
    return {"door": key[0], "address": str(key[1])}


class WorkerLink:
    """The worker side of one supervisor channel."""

    def __init__(self, worker: int, sock: socket.socket) -> None:
        self.worker = worker
        self.channel = Channel(sock)
        self.generation = 1
        self.inherited: dict[ListenerKey, socket.socket] = {}
        self._pending: Any = None
        self._stop: Callable[[str], None] = lambda reason: None
        self._ids = itertools.count(1)
        self.board: SessionBoard | None = None
        self.share: WorkerShare | None = None
        """Every worker's open sessions (:mod:`egressd.net.balance`), from the hello."""
        self._asked: dict[int, tuple[trio.Event, list[Message]]] = {}

    async def hello(self) -> None:
        """Wait for the supervisor's first message: generation and listening sockets."""
        message, sockets = await self.channel.receive()
        if message.get("type") != "hello":
            raise ChannelClosed(f"expected hello, got {message.get('type')!r}")
        self.generation = int(message["generation"])
        self._inherit(message, sockets)
        board = message.get("board")
        if board is not None:
            self.board = SessionBoard(int(board["fd"]), int(board["workers"]))

    def take(self, key: ListenerKey) -> socket.socket:
        """The supervisor's socket for listener ``key`` (the daemon's ``open_socket``)."""
        sock = self.inherited.pop(key, None)
        if sock is None:
            raise OSError(errno.ENOENT, f"the supervisor passed no socket for {key[1]} ({key[0]})")
        return sock

    def _inherit(self, message: Message, sockets: list[socket.socket]) -> None:
        self._close_inherited()
        items = message.get("listeners", [])
        pairs = zip(items, sockets, strict=True)
        self.inherited = {listener_key(item): sock for item, sock in pairs}

    def _close_inherited(self) -> None:
        for sock in self.inherited.values():
            close_listener(sock)
        self.inherited = {}

    async def run(
        self,
        daemon: Worked,
        stop: Callable[[str], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Heartbeats and the supervisor's requests until the channel ends (say
        :meth:`ready` once the listeners run)."""
        self._stop = stop
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, daemon)
                await self._requests(daemon, nursery)
                nursery.cancel_scope.cancel()
        except ChannelClosed as exc:
            log.warning("supervisor gone (%s), draining", exc)
            stop("supervisor gone")

    async def ready(self) -> None:
        """Tell the supervisor this worker serves (its listeners run)."""
        if self.share is not None:
            self.share.serving()
        elif self.board is not None:
            self.board.set(self.worker, 0)
        await self.channel.send({"type": "ready", "pid": os.getpid()})

    def balance(self) -> WorkerShare | None:
        """This worker's slot on the board, kept by its accept loops, which wait while it is
        busier than another worker (None without a board)."""
        if self.board is not None and self.share is None:
            self.share = WorkerShare(self.board, self.worker)
        return self.share

    async def request(self, message: Message, timeout: float = REQUEST_TIMEOUT) -> Message:
        """Ask the supervisor (e.g. the host's shared budgets); its answer. Raises
        :class:`ChannelClosed` when it is gone or does not answer within ``timeout``."""
        number = next(self._ids)
        event, box = trio.Event(), list[Message]()
        self._asked[number] = (event, box)
        try:
            with trio.move_on_after(timeout):
                await self.channel.send({**message, "id": number})
                await event.wait()
        finally:
            self._asked.pop(number, None)
        if not box:
            raise ChannelClosed("the supervisor did not answer")
        return box[0]

    async def _heartbeats(self, daemon: Worked) -> None:
        while True:
            await self.channel.send({"type": "alive", "sessions": daemon.runtime.active_sessions})
            await trio.sleep(HEARTBEAT_PERIOD)

    async def _requests(self, daemon: Worked, nursery: trio.Nursery) -> None:
        """Read the channel; each request is answered by a task of its own, so that a
        prepare loading the files for seconds never holds up the answers to this worker's
        own questions (its shared budgets). The supervisor sends a commit or an abort only
        once the prepare was answered."""
        while True:
            message, sockets = await self.channel.receive()
            kind = message.get("type")
            if kind == "answer":
                self._answered(message)
                continue
            if kind == "prepare":
                self._inherit(message, sockets)
            else:
                for sock in sockets:
                    sock.close()
            nursery.start_soon(self._reply, daemon, kind, message)

    async def _reply(self, daemon: Worked, kind: object, message: Message) -> None:
        reply = await self._answer(daemon, kind, message)
        if reply is not None:
            await self.channel.send({"type": "reply", "id": message.get("id"), **reply})

    def _answered(self, message: Message) -> None:
        slot = self._asked.get(int(message.get("id", 0)))
        if slot is not None:
            slot[1].append(message)
            slot[0].set()

    async def _answer(self, daemon: Worked, kind: object, message: Message) -> Message | None:
        if kind == "drain":
            self._stop("drain requested by the supervisor")
            return None
        if kind == "prepare":
            return await self._prepare(daemon, message)
        if kind == "commit":
            return await self._commit(daemon, message)
        if kind == "abort":
            self._abort(daemon)
            return {"ok": True}
        if kind == "status":
            return {"ok": True, "status": DaemonControls(daemon).status()}
        if kind == "request":
            return {"reply": handle_request(DaemonControls(daemon), str(message["line"]).encode())}
        if kind == "metrics":
            refresh_gauges(daemon)
            families = snapshot(daemon.metrics.registry)
            return {"ok": True, "families": families, "breakers": open_breakers(daemon.runtime)}
        return {"ok": False, "error": f"unknown message {kind!r}"}

    async def _prepare(self, daemon: Worked, message: Message) -> Message:
        self._abort(daemon)
        try:
            prepared = await daemon.prepare_reload()
        except Exception as exc:  # ReloadRefused: its errors are the reply
            errors = getattr(exc, "errors", None) or [f"{type(exc).__name__}: {exc}"]
            return {"ok": False, "errors": [str(error) for error in errors]}
        if _as_lists(prepared.files) != _as_lists(message.get("files")):
            daemon.abort_reload(prepared)
            return {
                "ok": False,
                "errors": ["the configuration files changed while the workers read them"],
            }
        self._pending = prepared
        return {"ok": True}

    async def _commit(self, daemon: Worked, message: Message) -> Message:
        prepared, self._pending = self._pending, None
        if prepared is None:
            return {"ok": False, "errors": ["no prepared reload to commit"]}
        if daemon.runtime.draining:
            daemon.abort_reload(prepared)
            return {"ok": False, "errors": ["draining"]}
        await daemon.commit_reload(prepared)
        self._close_inherited()
        daemon.reloaded(str(message.get("reason", "supervisor")), int(message["generation"]))
        return {"ok": True}

    def _abort(self, daemon: Worked) -> None:
        prepared, self._pending = self._pending, None
        if prepared is not None:
            daemon.abort_reload(prepared)


def _as_lists(value: object) -> object:
    """Fingerprints as JSON gives them back (tuples become lists)."""
    if isinstance(value, list | tuple):
        return [_as_lists(item) for item in value]
    return value


class SupervisorBudgets:
    """The host's shared budgets, kept by the supervisor (:mod:`egressd.hostbudgets`): the
    client a :class:`~egressd.shaping.ledger.SharedLedger`'s shell asks, with the same
    encoded ops as Redis's script (``source``, the script's text, is not sent)."""

    def __init__(self, link: WorkerLink) -> None:
        self.link = link

    async def script(self, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        message = {
            "type": "budgets",
            "keys": [str(k) for k in keys],
            "args": [str(a) for a in args],
        }
        reply = await self.link.request(message)
        if not reply.get("ok"):
            raise ChannelClosed(f"the supervisor refused the budgets: {reply.get('error')}")
        return reply["reply"]

    async def ping(self) -> None:
        await self.script("", [], ["0"])


def open_breakers(runtime: Runtime) -> list[list[str]]:
    """This worker's open destination breakers as (destination, kind of failure), for the
    supervisor's count of each destination once (:func:`egressd.aggregate.
    count_open_breakers`); a (source, site) path's breaker names its source."""
    return [
        [
            format_hostport(*item.destination) + (f" source={item.source}" if item.source else ""),
            str(item.last_kind),
        ]
        for item in runtime.breaker.open_breakers()
    ]
