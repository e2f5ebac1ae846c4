"""Load generators and sinks for bench/relay_bench.py, each run as its own process.

Subcommands (all on loopback):

``blast-sink PORT`` greets each connection with one byte, reads it to EOF (thread per
                   connection, recv_into into one buffer), then answers the byte count.
``echo-sink PORT``  echoes each connection's first line, then holds it until the peer
                   closes (short sessions and idle connections; asyncio).
``blast``          one connection (direct, or through a SOCKS5 proxy) waits for the sink's
                   greeting (the path is up: not timed), sends N bytes and
                   half-closes, waits for the sink's count; prints seconds, bytes and its
                   own CPU seconds over that time (not its start-up) as JSON.
``rate``           N short sessions through a SOCKS5 proxy (connect, handshake, one
                   exchange, close), C at a time, or straight to the sink without
                   ``--proxy``; prints sessions per second as JSON.
``hold``           opens N sessions through a SOCKS5 proxy, one exchange each, prints
                   ``ready`` and keeps them open until stdin closes.
``relay``          a bare trio relay built on egressd.net.splice (``--zero-copy yes|no``):
                   accepts, connects to the sink, relays; for the splice-path comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import resource
import socket
import struct
import sys
import threading
import time

CHUNK = 1 << 20


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --------------------------------------------------------------------------- sink


def listen(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(8192)
    return listener


def serve_blast_sink(port: int) -> None:
    """Thread per connection: read everything with recv_into (no allocation), answer the count."""
    listener = listen(port)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=_discard, args=(sock,), daemon=True).start()


GREETING = b"\x00"
"""The blast sink's first byte: the generator starts its clock when it arrives, so a
forwarder's own set-up (socat forks and connects per connection) is not timed, just as
egressd's SOCKS5 handshake is not."""


def _discard(sock: socket.socket) -> None:
    view = memoryview(bytearray(CHUNK))
    total = 0
    try:
        sock.sendall(GREETING)
        while count := sock.recv_into(view):
            total += count
        sock.sendall(struct.pack("!Q", total))
    finally:
        sock.close()


def serve_echo_sink(port: int) -> None:
    """asyncio: echo the first line, then hold the connection until the peer closes."""
    raise_fd_limit()
    listener = listen(port)
    listener.setblocking(False)

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await reader.readline())
            await writer.drain()
            while await reader.read(65536):
                pass
        except OSError:
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(connection, sock=listener)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


# --------------------------------------------------------------------------- SOCKS5 client


def socks5_request(host: str, port: int) -> bytes:
    ip = ipaddress.ip_address(host)
    return bytes([5, 1, 0, 1 if ip.version == 4 else 4]) + ip.packed + struct.pack("!H", port)


def read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {count} bytes")
        data += chunk
    return data


def socks5_connect(sock: socket.socket, host: str, port: int) -> None:
    """Lock-step RFC 1928: greeting, then CONNECT (what curl and Exim do)."""
    sock.sendall(b"\x05\x01\x00")
    if read_exactly(sock, 2) != b"\x05\x00":
        raise ConnectionError("SOCKS5 method refused")
    sock.sendall(socks5_request(host, port))
    head = read_exactly(sock, 4)
    if head[1] != 0:
        raise ConnectionError(f"SOCKS5 reply {head[1]}")
    read_exactly(sock, (4 if head[3] == 1 else 16) + 2)


def blast(proxy: str | None, dest: str, size: int) -> None:
    host, port = dest.rsplit(":", 1)
    target = proxy or dest
    phost, pport = target.rsplit(":", 1)
    sock = socket.create_connection((phost, int(pport)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if proxy:
        socks5_connect(sock, host, int(port))
    if read_exactly(sock, len(GREETING)) != GREETING:  # the path to the sink is up
        raise ConnectionError("the blast sink did not greet")
    payload = memoryview(bytes(CHUNK))
    started, cpu = time.perf_counter(), time.process_time()
    sent = 0
    while sent < size:
        sock.sendall(payload)
        sent += CHUNK
    sock.shutdown(socket.SHUT_WR)
    (received,) = struct.unpack("!Q", read_exactly(sock, 8))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    sock.close()
    assert received == sent, (received, sent)
    print(json.dumps({"seconds": elapsed, "bytes": sent, "cpu": cpu}))


# --------------------------------------------------------------------------- short sessions


async def _session(proxy: tuple[str, int] | None, dest: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if proxy is None:  # straight to the sink: the generator's own ceiling
            await loop.sock_connect(sock, dest)
        else:
            await loop.sock_connect(sock, proxy)
            await loop.sock_sendall(sock, b"\x05\x01\x00")
            assert await _recv_exactly(loop, sock, 2) == b"\x05\x00"
            await loop.sock_sendall(sock, socks5_request(*dest))
            reply = await _recv_exactly(loop, sock, 10)
            if reply[1] != 0:
                raise ConnectionError(f"SOCKS5 reply {reply[1]}")
        await loop.sock_sendall(sock, b"PING\n")
        assert await _recv_exactly(loop, sock, 5) == b"PING\n"
    finally:
        sock.close()


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await loop.sock_recv(sock, count - len(data))
        if not chunk:
            raise ConnectionError("EOF")
        data += chunk
    return data


async def _rate(
    proxy: tuple[str, int] | None, dest: tuple[str, int], sessions: int, workers: int
) -> None:
    remaining = sessions
    failures = 0

    async def worker() -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            try:
                await _session(proxy, dest)
            except (OSError, AssertionError):
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - started
    print(json.dumps({"sessions": sessions, "seconds": elapsed, "failures": failures}))


def rate(proxy: str | None, dest: str, sessions: int, workers: int) -> None:
    raise_fd_limit()
    host, port = dest.rsplit(":", 1)
    through = None
    if proxy:
        phost, pport = proxy.rsplit(":", 1)
        through = (phost, int(pport))
    asyncio.run(_rate(through, (host, int(port)), sessions, workers))


# --------------------------------------------------------------------------- idle sessions


def hold(proxy: str, dest: str, count: int) -> None:
    raise_fd_limit()
    phost, pport = proxy.rsplit(":", 1)
    host, port = dest.rsplit(":", 1)
    held = []
    for _ in range(count):
        sock = socket.create_connection((phost, int(pport)))
        socks5_connect(sock, host, int(port))
        sock.sendall(b"PING\n")
        assert read_exactly(sock, 5) == b"PING\n"
        held.append(sock)
    print("ready", flush=True)
    sys.stdin.read()
    for sock in held:
        sock.close()


# --------------------------------------------------------------------------- bare relay


def bare_relay(port: int, dest: str, zero_copy: bool) -> None:
    import trio

    from egressd.net.splice import Traffic, relay

    host, dport = dest.rsplit(":", 1)

    async def handle(client: trio.SocketStream) -> None:
        remote = await trio.open_tcp_stream(host, int(dport))
        async with client, remote:
            await relay(client, remote, traffic=Traffic(), idle_timeout=600, zero_copy=zero_copy)

    async def main() -> None:
        await trio.serve_tcp(handle, port, host="127.0.0.1")

    trio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("blast-sink", "echo-sink"):
        commands.add_parser(name).add_argument("port", type=int)
    blast_p = commands.add_parser("blast")
    blast_p.add_argument("--proxy")
    blast_p.add_argument("--dest", required=True)
    blast_p.add_argument("--bytes", type=int, required=True)
    rate_p = commands.add_parser("rate")
    rate_p.add_argument("--proxy", help="none: straight to the sink")
    rate_p.add_argument("--dest", required=True)
    rate_p.add_argument("--sessions", type=int, required=True)
    rate_p.add_argument("--concurrency", type=int, default=32)
    hold_p = commands.add_parser("hold")
    hold_p.add_argument("--proxy", required=True)
    hold_p.add_argument("--dest", required=True)
    hold_p.add_argument("--count", type=int, required=True)
    relay_p = commands.add_parser("relay")
    relay_p.add_argument("port", type=int)
    relay_p.add_argument("--dest", required=True)
    relay_p.add_argument("--zero-copy", choices=("yes", "no"), required=True)
    args = parser.parse_args()
    if args.command == "blast-sink":
        serve_blast_sink(args.port)
    elif args.command == "echo-sink":
        serve_echo_sink(args.port)
    elif args.command == "blast":
        blast(args.proxy, args.dest, args.bytes)
    elif args.command == "rate":
        rate(args.proxy, args.dest, args.sessions, args.concurrency)
    elif args.command == "hold":
        hold(args.proxy, args.dest, args.count)
    else:
        bare_relay(args.port, args.dest, args.zero_copy == "yes")


if __name__ == "__main__":
    main()
