"""A TCP proxy that breaks the connections it carries, on command.

    python -m benchmarks.proxy --listen 127.0.0.1:7701 --target 127.0.0.1:7700 --chaos --seed 3

Faults, each usable at run time while connections are open:

- ``reset()``: every current connection is aborted on both sides with a
  TCP RST (``SO_LINGER`` 0, then ``transport.abort()``): the client and the
  server each see "connection reset", and data in flight is lost.
- ``stall(seconds)``: nothing is forwarded in either direction for a while;
  connections stay open and new ones are accepted (their bytes wait too).
  Bytes read before the stall are delivered after it, in order, and so is a
  close: a statement sent just before a stall reaches the server late,
  after its sender may have given up.
- ``fragment`` (a mode, on or off): data is forwarded in random small
  pieces, with a small random pause between pieces, so every frame boundary
  of the protocol is split somewhere.
- ``chaos(rng, seconds)``: a seeded schedule of the three.

As a library::

    async with FaultyProxy("127.0.0.1", 5432) as proxy:
        dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/citycard"
        proxy.reset()
        proxy.stall(2.0)
        proxy.fragment = True
        proxy.faults  # Counter({'reset': 1, 'stall': 1})
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import struct
from collections import Counter
from collections.abc import Sequence
from types import TracebackType
from typing import Self

# Bytes read from one side per call. A read waits until the previous chunk
# has been written and drained, so per connection and direction the proxy
# holds at most this plus the transport's write buffer (below): 2 x 80 KiB
# per connection, 16 MiB for the 100 connections of a test.
READ_CHUNK_BYTES = 16 * 1024
# The write buffer beyond which a direction pauses (drain() waits): the
# receiver's back-pressure reaches the sender instead of piling up here.
WRITE_HIGH_WATER_BYTES = 64 * 1024
# The proxy carries a handful of engine and terminal connections; more is a
# leak in whoever opens them, refused rather than held.
CONNECTIONS_MAX = 256
# Fragment mode: pieces of 1..FRAGMENT_BYTES_MAX bytes, each followed by a
# pause of 0..FRAGMENT_PAUSE_MAX_S. A 40-byte frame becomes a few pieces and
# a millisecond or two of delay: boundaries split, throughput still usable.
FRAGMENT_BYTES_MAX = 16
FRAGMENT_PAUSE_MAX_S = 0.001
# Connecting to the target: it is on this machine.
CONNECT_TIMEOUT_S = 5.0

# The chaos schedule: a fault every CHAOS_GAP_MIN_S..CHAOS_GAP_MAX_S; stalls
# of STALL_SHORT_MIN_S..STALL_SHORT_MAX_S (well under the engine's
# timeouts); fragment mode switched on for FRAGMENT_SPELL_MAX_S at most.
CHAOS_GAP_MIN_S = 0.2
CHAOS_GAP_MAX_S = 1.5
STALL_SHORT_MIN_S = 0.05
STALL_SHORT_MAX_S = 2.0
FRAGMENT_SPELL_MAX_S = 2.0

_LINGER_RESET = struct.pack("ii", 1, 0)


class _Link:
    """One proxied connection: the two streams and the two pumps between them."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        target: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.client = client
        self.target = target
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        """RST both sides now, dropping what is buffered."""
        for _, writer in (self.client, self.target):
            transport = writer.transport
            if transport.is_closing():
                continue
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultyProxy:
    """Forwards ``listen_host:listen_port`` (0: a free port) to ``target_host:target_port``."""

    def __init__(
        self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.port = 0
        self.fragment = False
        self.faults: Counter[str] = Counter()
        self.connections_total = 0
        self.bytes_forwarded = 0
        self._links: set[_Link] = set()
        self._server: asyncio.AbstractServer | None = None
        # Set while data flows; cleared during a stall.
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stall_until = 0.0
        self._stall_task: asyncio.Task[None] | None = None
        self._fragment_rng = random.Random(0)

    # --- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and RST what is still open."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._stall_task is not None:
            self._stall_task.cancel()
        self._flowing.set()
        for link in list(self._links):
            link.abort()
        self._links.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def connections_open(self) -> int:
        return len(self._links)

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    # --- faults -------------------------------------------------------------------

    def reset(self) -> int:
        """RST every current connection on both sides; how many there were."""
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        self.faults["reset"] += 1
        return len(links)

    def stall(self, seconds: float) -> None:
        """Forward nothing for ``seconds`` (extends a stall already running)."""
        loop = asyncio.get_running_loop()
        self._stall_until = max(self._stall_until, loop.time() + seconds)
        self._flowing.clear()
        self.faults["stall"] += 1
        if self._stall_task is None or self._stall_task.done():
            self._stall_task = asyncio.create_task(self._end_stall())

    def resume(self) -> None:
        """End a stall now."""
        self._stall_until = 0.0
        self._flowing.set()

    async def _end_stall(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._flowing.is_set() and loop.time() < self._stall_until:
            await asyncio.sleep(self._stall_until - loop.time())
        self._flowing.set()

    async def chaos(
        self,
        rng: random.Random,
        seconds: float,
        *,
        long_stalls_s: Sequence[float] = (),
        long_stall_share: float = 0.0,
    ) -> None:
        """Inject faults drawn from ``rng`` for ``seconds``: resets, short stalls
        and fragment spells; with ``long_stalls_s``, that share of the stalls is
        a reset followed at once by a stall of one of those lengths (whoever
        reconnects meets a silent server and must give up). Leaves the proxy
        clean (flowing, not fragmenting)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        fragment_off_at = 0.0
        try:
            while True:
                await asyncio.sleep(min(rng.uniform(CHAOS_GAP_MIN_S, CHAOS_GAP_MAX_S), max(0.0, end - loop.time())))
                now = loop.time()
                if self.fragment and now >= fragment_off_at:
                    self.fragment = False
                if now >= end:
                    break
                draw = rng.random()
                if draw < 0.4:
                    self.reset()
                elif draw < 0.75:
                    if long_stalls_s and rng.random() < long_stall_share:
                        length = rng.choice(list(long_stalls_s))
                        self.faults["long_stall"] += 1
                        self.reset()
                        self.stall(length)
                        await asyncio.sleep(length)
                    else:
                        self.stall(rng.uniform(STALL_SHORT_MIN_S, STALL_SHORT_MAX_S))
                elif not self.fragment:
                    self.fragment = True
                    self.faults["fragment"] += 1
                    fragment_off_at = now + rng.uniform(0.1, FRAGMENT_SPELL_MAX_S)
        finally:
            self.fragment = False
            self.resume()

    # --- forwarding -----------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._links) >= CONNECTIONS_MAX:
            writer.transport.abort()
            return
        try:
            target = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        self.connections_total += 1
        link = _Link((reader, writer), target)
        for _, side in (link.client, link.target):
            side.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(reader, target[1])),
            asyncio.create_task(self._pump(target[0], writer)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            for _, side in (link.client, link.target):
                side.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy one direction until EOF; a stall holds data and EOF alike."""
        try:
            while True:
                data = await source.read(READ_CHUNK_BYTES)
                await self._flowing.wait()
                if not data:
                    if sink.can_write_eof():
                        sink.write_eof()
                    return
                if self.fragment:
                    await self._write_fragments(data, sink)
                else:
                    sink.write(data)
                    await sink.drain()
                self.bytes_forwarded += len(data)
        except (ConnectionError, OSError):
            # One side broke: break the other too, as a network would.
            sink.transport.abort()

    async def _write_fragments(self, data: bytes, sink: asyncio.StreamWriter) -> None:
        rng = self._fragment_rng
        view = memoryview(data)
        while view:
            size = rng.randint(1, FRAGMENT_BYTES_MAX)
            sink.write(bytes(view[:size]))
            view = view[size:]
            await sink.drain()
            await asyncio.sleep(rng.uniform(0.0, FRAGMENT_PAUSE_MAX_S))
            # A stall that starts mid-chunk holds the rest of it.
            await self._flowing.wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _serve(args: argparse.Namespace) -> None:
    listen_host, listen_port = _address(args.listen)
    target_host, target_port = _address(args.target)
    async with FaultyProxy(target_host, target_port, listen_host=listen_host, listen_port=listen_port) as proxy:
        proxy.fragment = args.fragment
        print(f"proxy {listen_host}:{proxy.port} -> {target_host}:{target_port}", flush=True)
        if args.chaos:
            await proxy.chaos(random.Random(args.seed), args.seconds)
            print(f"faults: {dict(proxy.faults)}", flush=True)
        else:
            await asyncio.sleep(args.seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: any free one)")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--fragment", action="store_true", help="forward in small random pieces")
    parser.add_argument("--chaos", action="store_true", help="inject resets, stalls and fragmentation")
    parser.add_argument("--seed", type=int, default=1, help="seeds --chaos")
    parser.add_argument("--seconds", type=float, default=3600.0, help="run this long, then exit")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
