"""SOCKS5 wire fragments and helpers that the client, server and door tests share."""

from __future__ import annotations

from hypothesis import strategies as st

H = bytes.fromhex

NO_AUTH_GREETING = H("050100")
AUTH_GREETING = H("05020002")
CONNECT_192_0_2_25 = H("05010001c00002190019")  # CONNECT 192.0.2.25:25
BIND_10_0_0_5 = H("050200010a0000050000")  # BIND 10.0.0.5:0
SUCCESS_10_0_0_5_0 = H("050000010a0000050000")
SUCCESS_10_0_0_5_41234 = H("050000010a000005a112")
CREDENTIALS = H("01") + b"\x04pool" + b"\x06secret"


@st.composite
def split_points(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at up to 8 random points (empty pieces dropped)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [piece for piece in pieces if piece]
