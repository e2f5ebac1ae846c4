"""The supervisor's channel to a worker: JSON messages and listening sockets (SCM_RIGHTS)."""

from __future__ import annotations

import socket
from functools import partial

import pytest
import trio

from egressd.net.channel import Channel, ChannelClosed, socket_pair


async def test_messages_arrive_whole_and_in_order_with_their_sockets() -> None:
    left, right = socket_pair()
    sender, receiver = Channel(left), Channel(right)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    big = "x" * 3_000_000  # far beyond one read and the socket buffer
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(sender.send, {"type": "big", "data": big}))
        message, sockets = await receiver.receive()
    assert (message["type"], len(message["data"]), sockets) == ("big", 3_000_000, [])
    await sender.send({"type": "hello"}, [listener.fileno()])
    await sender.send({"type": "after"})
    message, (inherited,) = await receiver.receive()
    listener.close()  # the received descriptor is a socket of its own on the same file
    assert message["type"] == "hello" and inherited.getsockname()[1] == port
    assert not inherited.get_inheritable() and not inherited.getblocking()
    assert (await receiver.receive())[0]["type"] == "after"
    inherited.close()
    sender.close()
    with pytest.raises(ChannelClosed):
        await receiver.receive()
    receiver.close()
