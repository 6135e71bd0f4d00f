"""Fuzzing the port's wire format: what a bad client sends ends only its own connection.

* ``test_bad_clients_are_disconnected_and_the_port_serves_on``: a seeded
  generator makes several hundred bad clients (bad magic, version or kind,
  oversized lengths, frames cut short by the end of the stream, frames only
  the daemon may send, descriptors where none belong, garbage, a second
  CONNECT, no CONNECT at all), each on a raw socket, before or after a valid
  handshake. Each is disconnected with a log line naming it (pid and uid)
  and its problem, each accepted one gets its disconnect callback once, a
  well-behaved client on the same port keeps working throughout, and the
  daemon keeps no descriptor.
* The :class:`~fltfuse._port.wire.Decoder` alone, fed valid frame streams cut
  at random places, gives the same frames; a stream that ends inside a frame
  is a truncated frame and one that ends between frames is not.
"""

from __future__ import annotations

import array
import itertools
import logging
import os
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from fltfuse import send_message
from fltfuse._port import server
from fltfuse._port.wire import (
    FROM_CLIENT,
    FROM_DAEMON,
    HEADER,
    MAGIC,
    MAX_CONTEXT,
    MAX_FDS,
    MAX_PAYLOAD,
    VERSION,
    Decoder,
    Frame,
    FrameKind,
    PortProtocolError,
    encode,
)
from fltfuse.port import open_filter_port
from tests.unit.test_ports import PORT, PortFilter

SEED = 20261122
CASES = 600


@dataclass
class Case:
    """One bad client: what it sends (bytes, each with the descriptors that go with it) and what the log must say."""

    name: str
    expect: str  # a piece of the daemon's log line about it
    sends: list[tuple[bytes, int]]  # (bytes, how many descriptors to attach)
    handshake: bool = False  # a valid CONNECT (answered) first
    end: bool = False  # shut its side down afterwards (the end of the stream)


def header(
    kind: int,
    *,
    magic: bytes = MAGIC,
    version: int = VERSION,
    nfds: int = 0,
    length: int = 0,
    aux: int = 0,
    message_id: int = 0,
) -> bytes:
    return HEADER.pack(magic, version, kind, nfds, length, aux, message_id)


def random_header(rng: random.Random, kind: int, **fields: int | bytes) -> bytes:
    """A header with random aux and id (the fields the daemon takes as they come) and ``fields``."""
    return header(kind, aux=rng.getrandbits(32), message_id=rng.getrandbits(64), **fields)  # type: ignore[arg-type]


def after_handshake_kind(rng: random.Random) -> FrameKind:
    return rng.choice([FrameKind.REQUEST, FrameKind.REPLY])


def bad_magic(rng: random.Random) -> Case:
    magic = bytes(rng.choice([b"FP"[:1] + b"Q", b"fp", b"\0\0", rng.randbytes(2)]))
    while magic == MAGIC:
        magic = rng.randbytes(2)
    return Case("bad magic", "bad magic", [(random_header(rng, FrameKind.CONNECT, magic=magic), 0)], rng.random() < 0.5)


def bad_version(rng: random.Random) -> Case:
    version = rng.choice([0, 2, 255, rng.randint(2, 255)])
    frame = random_header(rng, FrameKind.REQUEST, version=version)
    return Case("bad version", f"wire format version {version}", [(frame, 0)], rng.random() < 0.5)


def unknown_kind(rng: random.Random) -> Case:
    kind = rng.choice([0, 7, 255, rng.randint(7, 255)])
    return Case("unknown kind", f"unknown frame kind {kind}", [(random_header(rng, kind), 0)], rng.random() < 0.5)


def daemon_kind(rng: random.Random) -> Case:
    kind = rng.choice(sorted(FROM_DAEMON))
    frame = random_header(rng, kind, length=0)
    return Case("daemon's frame", f"a {kind.name} frame may not be sent", [(frame, 0)], rng.random() < 0.5)


def oversize(rng: random.Random) -> Case:
    length = rng.choice([MAX_PAYLOAD + 1, 0xFFFFFFFF, rng.randint(MAX_PAYLOAD + 1, 0xFFFFFFFF)])
    handshake = rng.random() < 0.5
    kind = after_handshake_kind(rng) if handshake else FrameKind.CONNECT
    return Case("oversize", f"a frame of {length} bytes", [(random_header(rng, kind, length=length), 0)], handshake)


def truncated(rng: random.Random) -> Case:
    handshake = rng.random() < 0.5
    kind = after_handshake_kind(rng) if handshake else FrameKind.CONNECT
    payload = rng.randbytes(rng.randint(1, 3000))
    frame = random_header(rng, kind, length=len(payload)) + payload
    cut = rng.randint(1, len(frame) - 1)
    return Case("truncated", "the stream ended inside a frame", [(frame[:cut], 0)], handshake, end=True)


def descriptors_announced(rng: random.Random) -> Case:
    handshake = rng.random() < 0.5
    kind = after_handshake_kind(rng) if handshake else FrameKind.CONNECT
    nfds = rng.randint(1, MAX_FDS)
    frame = random_header(rng, kind, nfds=nfds)
    return Case("descriptors with a frame", f"{nfds} descriptors with a {kind.name} frame", [(frame, nfds)], handshake)


def descriptors_unannounced(rng: random.Random) -> Case:
    payload = rng.randbytes(rng.randint(0, 100))
    frame = random_header(rng, FrameKind.REQUEST, length=len(payload)) + payload
    count = rng.randint(1, MAX_FDS)
    return Case("stray descriptors", f"{count} descriptors without a frame", [(frame, count)], handshake=True)


def too_many_descriptors(rng: random.Random) -> Case:
    frame = random_header(rng, FrameKind.REQUEST)
    return Case("too many descriptors", "more descriptors than a frame may carry", [(frame, 20)], rng.random() < 0.5)


def garbage(rng: random.Random) -> Case:
    data = rng.randbytes(rng.choice([rng.randint(1, HEADER.size - 1), rng.randint(HEADER.size, 500)]))
    if data[:2] == MAGIC:
        data = b"X" + data[1:]
    if len(data) < HEADER.size:  # not even a header, then the end
        return Case("short garbage", "the stream ended inside a frame", [(data, 0)], rng.random() < 0.5, end=True)
    return Case("garbage", "bad magic", [(data, 0)], rng.random() < 0.5)


def second_connect(rng: random.Random) -> Case:
    return Case("second CONNECT", "a second CONNECT", [(encode(Frame(FrameKind.CONNECT, payload=b"v1")), 0)], True)


def first_not_connect(rng: random.Random) -> Case:
    request = encode(Frame(after_handshake_kind(rng), rng.getrandbits(64), rng.getrandbits(32), rng.randbytes(10)))
    connect = encode(Frame(FrameKind.CONNECT, payload=b"v1"))
    data = rng.choice([request, connect + request])  # not CONNECT, or CONNECT not alone
    return Case("first frame", "the first frame must be CONNECT, alone", [(data, 0)])


def big_context(rng: random.Random) -> Case:
    context = rng.randbytes(rng.randint(MAX_CONTEXT + 1, MAX_CONTEXT + 5000))
    data = encode(Frame(FrameKind.CONNECT, payload=context))
    return Case("big context", f"a connection context of {len(context)} bytes", [(data, 0)])


def silent(rng: random.Random) -> Case:
    return Case("no CONNECT", "sent no CONNECT within", [])


GENERATORS: list[tuple[Callable[[random.Random], Case], int]] = [  # (generator, weight)
    (bad_magic, 4),
    (bad_version, 4),
    (unknown_kind, 4),
    (daemon_kind, 4),
    (oversize, 4),
    (truncated, 6),
    (descriptors_announced, 4),
    (descriptors_unannounced, 3),
    (too_many_descriptors, 2),
    (garbage, 6),
    (second_connect, 2),
    (first_not_connect, 3),
    (big_context, 2),
    (silent, 1),
]


def cases(seed: int, count: int) -> Iterator[Case]:
    rng = random.Random(seed)
    generators, weights = zip(*GENERATORS, strict=True)
    for _ in range(count):
        yield rng.choices(generators, weights)[0](rng)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def play(path: str, case: Case, spare_fd: int) -> None:
    """Be the bad client: connect, send what the case says, then read until the daemon hangs up."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(path)
        if case.handshake:
            await sock.send(encode(Frame(FrameKind.CONNECT, payload=b"fuzz")))
            decoder = Decoder(FROM_DAEMON)
            frames: list[Frame] = []
            while not frames:
                data = await sock.recv(4096)
                assert data, "the daemon hung up on a valid CONNECT"
                frames = decoder.feed(data)
            assert frames[0].kind is FrameKind.CONNECTED and frames[0].aux == 0, frames
        for data, nfds in case.sends:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [spare_fd] * nfds).tobytes())]
            await sock.sendmsg([data], ancillary if nfds else [])
        if case.end:
            sock.shutdown(socket.SHUT_WR)
        try:
            while await sock.recv(65536):
                pass
        except ConnectionResetError:
            pass  # it closed with our bytes unread: as good as the end


async def test_bad_clients_are_disconnected_and_the_port_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="fltfuse.port")
    pf = PortFilter(max_connections=4)
    spare_read, spare_write = os.pipe()
    seen: dict[str, int] = {}
    try:
        async with pf.volume(tmp_path) as vol, open_filter_port(vol.port_path(PORT), b"good") as good:
            good_client = pf.connections[0].client

            async def answer_one() -> None:
                message = await good.get_message()
                await good.reply_message(message.message_id, b"re:" + message.data)

            before = open_descriptors()
            peer = f"pid {os.getpid()} (uid {os.geteuid()})"  # each log line names the bad client
            with trio.fail_after(60):
                for number, case in enumerate(cases(SEED, CASES)):
                    start = len(caplog.records)
                    # Only the silent client may meet the handshake timeout: a short one for it, and one
                    # no loaded machine reaches for the others (their bytes follow the connect at once).
                    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT", 0.05 if case.name == "no CONNECT" else 30.0)
                    await play(vol.port_path(PORT), case, spare_read)
                    said = [r.getMessage() for r in caplog.records[start:] if r.levelno >= logging.WARNING]
                    assert any(case.expect in line and peer in line for line in said), (number, case, said)
                    assert not any("filter bug" in line or "failed" in line for line in said), said
                    seen[case.name] = seen.get(case.name, 0) + 1
                    assert await good.send_message(b"ping %d" % number) == b"echo:ping %d" % number
                    if number % 10 == 0:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(answer_one)
                            assert await send_message(good_client, b"m%d" % number, timeout=5) == b"re:m%d" % number
                await until_no_bad_clients(pf)
            assert open_descriptors() == before  # every bad client's socket and descriptors closed
            accepted = pf.connections[1:]
            assert len(accepted) == sum(case.handshake for case in cases(SEED, CASES))
            assert sorted(map(id, pf.disconnected)) == sorted(map(id, accepted))  # once each
    finally:
        os.close(spare_read)
        os.close(spare_write)
    assert len(seen) == len(GENERATORS) + 1, seen  # every kind of case came up ("garbage" has two)


async def until_no_bad_clients(pf: PortFilter) -> None:
    """The bad clients' tasks end as soon as they are disconnected: only the good client stays."""
    assert pf.port is not None
    while len(pf.port.clients) != 1:
        await trio.sleep(0.002)


# -- the decoder alone -------------------------------------------------------------------------------


def random_frames(rng: random.Random, kinds: list[FrameKind], fds: list[int]) -> list[Frame]:
    frames = []
    for _ in range(rng.randint(1, 40)):
        kind = rng.choice(kinds)
        size = rng.choice([0, 1, HEADER.size - 1, HEADER.size, rng.randint(0, 5000)])
        with_fds = tuple(rng.sample(fds, rng.randint(0, MAX_FDS))) if kind is FrameKind.MESSAGE else ()
        frames.append(Frame(kind, rng.getrandbits(64), rng.getrandbits(32), rng.randbytes(size), with_fds))
    return frames


def cuts(rng: random.Random, length: int) -> list[int]:
    """Where a stream of ``length`` bytes is cut: nowhere, everywhere, or at random places."""
    how = rng.choice(["whole", "bytes", "random", "random"])
    if how == "whole":
        return [0, length]
    if how == "bytes" and length < 3000:
        return list(range(length + 1))
    return sorted({0, length, *rng.sample(range(1, max(length, 2)), min(length - 1, rng.randint(1, 60)))})


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("side", ["client", "daemon"])
def test_the_decoder_gives_the_same_frames_however_the_stream_is_cut(seed: int, side: str) -> None:
    rng = random.Random(seed)
    kinds = sorted(FROM_DAEMON if side == "client" else FROM_CLIENT)
    pool = [os.open(os.devnull, os.O_RDONLY) for _ in range(MAX_FDS)]  # descriptor numbers, passed through
    try:
        frames = random_frames(rng, kinds, pool)
        stream = b""
        starts: dict[int, tuple[int, ...]] = {}  # each frame's descriptors travel with its first byte
        for frame in frames:
            starts[len(stream)] = frame.fds
            stream += encode(frame)
        decoder = Decoder(FROM_DAEMON if side == "client" else FROM_CLIENT)
        got: list[Frame] = []
        points = cuts(rng, len(stream))
        for a, b in itertools.pairwise(points):
            fds = [fd for offset, with_fds in starts.items() if a <= offset < b for fd in with_fds]
            got += decoder.feed(stream[a:b], fds)
        decoder.finish()
        assert got == frames
    finally:
        for fd in pool:
            os.close(fd)


@pytest.mark.parametrize("seed", range(20))
def test_a_stream_that_ends_inside_a_frame_is_truncated(seed: int) -> None:
    rng = random.Random(seed)
    frames = random_frames(rng, sorted(FROM_CLIENT), [])
    boundaries = {0}
    stream = b""
    for frame in frames:
        stream += encode(frame)
        boundaries.add(len(stream))
    end = rng.choice([rng.randint(1, len(stream)), rng.choice(sorted(boundaries))])
    decoder = Decoder(FROM_CLIENT)
    got = decoder.feed(stream[:end])
    if end in boundaries:
        decoder.finish()
        assert got == frames[: sorted(boundaries).index(end)]
    else:
        with pytest.raises(PortProtocolError, match="the stream ended inside a frame"):
            decoder.finish()


def test_descriptors_a_frame_announced_must_come_with_it() -> None:
    decoder = Decoder(FROM_DAEMON)
    fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(PortProtocolError, match="announced 2 descriptors, 1 came"):
        decoder.feed(encode(Frame(FrameKind.MESSAGE, fds=(fd, fd))), [fd])
    decoder.close()  # closes the descriptor it held
    with pytest.raises(OSError):
        os.fstat(fd)
