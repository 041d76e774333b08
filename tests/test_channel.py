"""The transport on its own: frames over a real socketpair, read into the channel's one
reused buffer, whatever the sizes and however the bytes arrive."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest

from conftest import run
from looppool.channel import Channel, Parser, encode, socketpair

pytestmark = pytest.mark.timeout(60)


def _frames(count: int) -> list[tuple[int, int, bytes]]:
    # Sizes around the read size and the large-frame cut, and many tiny ones.
    sizes = [0, 1, 13, 4095, 65535, 65536, 70000, (1 << 18) - 13, 1 << 18, (1 << 18) + 1,
             3 << 20]
    frames = []
    for n in range(count):
        size = sizes[n % len(sizes)] if n % 3 == 0 else n % 97
        frames.append((n % 200 + 1, n - 50, os.urandom(16) * (size // 16) + b'x' * (size % 16)))
    return frames


async def _receive(sock: socket.socket, expected: int,
                   on_frame: Any = None) -> list[tuple[int, int, bytes]]:
    loop = asyncio.get_running_loop()
    got: list[tuple[int, int, bytes]] = []
    done = loop.create_future()

    def on_frames(frames: list[tuple[int, int, Any]]) -> None:
        for kind, arg, payload in frames:
            got.append((kind, arg, bytes(payload)))
            if on_frame is not None:
                on_frame(channel, kind, arg, payload)
        if len(got) >= expected and not done.done():
            done.set_result(None)

    channel = Channel(sock, loop, on_frames, lambda: None)
    try:
        await asyncio.wait_for(done, 30)
    finally:
        channel.close()
    return got


async def _send_while_receiving(pieces: list[bytes],
                                 expected: int) -> list[tuple[int, int, bytes]]:
    """Write ``pieces`` to one end of a socketpair, from the loop, while a Channel on the
    other end receives ``expected`` frames; every fifth piece lets the reader run first."""
    reader, writer = socketpair()
    loop = asyncio.get_running_loop()
    writer.setblocking(False)

    async def write() -> None:
        for turn, piece in enumerate(pieces, 1):
            await loop.sock_sendall(writer, piece)
            if turn % 5 == 0:
                await asyncio.sleep(0)   # let the reader read what came so far

    sender = asyncio.ensure_future(write())
    try:
        return await _receive(reader, expected)
    finally:
        await sender
        writer.close()


def test_frames_cut_into_pieces_of_every_size_arrive_whole() -> None:
    # The writer cuts the stream at awkward places (inside headers, inside payloads, across
    # frames), so the reader keeps partial frames between reads of its one buffer.
    frames = _frames(120)
    stream = b''.join(encode(kind, arg, payload) for kind, arg, payload in frames)
    cuts = [1, 2, 3, 7, 12, 13, 14, 100, 4096, 70001, 1 << 18]
    pieces, pos = [], 0
    while pos < len(stream):
        pieces.append(stream[pos:pos + cuts[len(pieces) % len(cuts)]])
        pos += len(pieces[-1])
    assert run(_send_while_receiving(pieces, len(frames))) == frames


def test_a_read_that_ends_a_large_frame_and_begins_the_next_keeps_both_whole() -> None:
    # A large frame is collected into a buffer of its own, kept for the next one; a read
    # (here: one feed) that ends one large frame and begins another must not collect the
    # second into the buffer the first is handed out in.
    first, second = bytes([1]) * 300_000, bytes([2]) * 200_000
    stream = encode(5, 1, first) + encode(5, 2, second)
    parser = Parser()
    frames = parser.feed(stream[:100_000])
    frames += parser.feed(stream[100_000:400_000])   # the rest of the first, half the second
    assert [bytes(payload) == first for _, _, payload in frames] == [True]
    frames += parser.feed(stream[400_000:])
    assert [(kind, arg, bytes(payload)) for kind, arg, payload in frames] == [
        (5, 1, first), (5, 2, second)]


def test_a_read_inside_on_frames_leaves_the_frames_being_handled_intact() -> None:
    # An owner that drains its channel from inside its own frame handler (the pool does
    # not, since it would take frames out of order; the channel guards against it anyway)
    # must not have that read land in the buffer whose frames are still being handled.
    first = [(1, n, bytes([n]) * 1000) for n in range(50)]
    second = [(2, n, bytes([255 - n]) * 1000) for n in range(50)]
    seen: list[tuple[int, int, bytes]] = []

    async def main() -> list[tuple[int, int, bytes]]:
        reader, writer = socketpair()
        writer.sendall(b''.join(encode(*frame) for frame in first))
        nested = False

        def on_frame(channel: Channel, kind: int, arg: int, payload: Any) -> None:
            nonlocal nested
            if kind == 1 and arg == 0 and not nested:
                nested = True
                writer.sendall(b''.join(encode(*frame) for frame in second))
                channel.drain()   # reads the second lot now, inside this handler
            seen.append((kind, arg, bytes(payload)))   # read after the nested read

        try:
            return await _receive(reader, len(first) + len(second), on_frame)
        finally:
            writer.close()

    got = run(main())
    assert sorted(got) == sorted(first + second)
    assert sorted(seen) == sorted(first + second)   # nothing overwritten under the handler


def test_payloads_larger_than_a_read_are_received_whole() -> None:
    big = [(3, n, os.urandom(1 << 20) + bytes([n])) for n in range(4)]
    assert run(_send_while_receiving([encode(*frame) for frame in big], len(big))) == big
