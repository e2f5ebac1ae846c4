"""Spliced sessions share a pool of pipes, never bytes.

The splice path moves each direction's bytes through a kernel pipe taken from a pool the
whole run shares (:mod:`egressd.net.zerocopy`). A session that ends while its pipe still
holds bytes -- the receiver stopped reading and then reset -- must close that pipe, not
pool it: the next session given it would send one tenant's bytes to another. What a user
would notice is exactly that: foreign bytes at the head of a later session's stream.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import termios

import trio
from harness import read_to_eof
from test_splice import relayed, reset

from egressd.net import zerocopy


def queued(read_fd: int) -> int:
    """The bytes waiting in a pipe (FIONREAD)."""
    count = array.array("i", [0])
    fcntl.ioctl(read_fd, termios.FIONREAD, count)
    return count[0]


async def test_a_pipe_left_full_by_a_reset_is_never_given_to_the_next_session() -> None:
    tenant_a = b"A" * (8 << 20)  # far more than the client's buffers and one pipe hold
    with trio.fail_after(20):
        async with relayed(True) as r, trio.open_nursery() as nursery:

            async def send_a() -> None:
                # the relay resets the remote side after the client's reset
                with contextlib.suppress(trio.BrokenResourceError):
                    await r.remote_app.send_all(tenant_a)

            nursery.start_soon(send_a)
            moved = -1
            while r.traffic.down != moved:  # until the client's buffers are full and
                moved = r.traffic.down  # a pipe waits to be written to it
                await trio.sleep(0.05)
            reset(r.client_app)  # the client read nothing: a pipe holds A's bytes
            await r.done.wait()
        for read_fd, _ in zerocopy._PIPES.free:  # pooled pipes are all empty
            assert queued(read_fd) == 0
        for turn in range(8):
            mine = b"B%d" % turn * 50_000
            async with relayed(True) as r:
                await r.remote_app.send_all(mine)
                await r.remote_app.send_eof()
                assert await read_to_eof(r.client_app) == mine
