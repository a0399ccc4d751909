"""Fuzz the session state machine: fuzzer bytes into ``data_received()``.

Run ``python -m fuzz.session --runs N``. Each input drives one
``engine.session.TerminalSession`` on the in-memory rig of ``fuzz/rig.py``
(a tiny city, a fake transport, the real ``Processor`` with a fake batch
writer that the rig commits or rolls back after every chunk). Half of the
input space starts with a valid handshake (HELLO, then AUTH with the proof
computed from the CHALLENGE the fake transport received), and half of those
have the rig seal the fuzzer's frames with the session's key and counters,
so that the fuzzer's bytes also reach the OPEN state and the decision
ladder; unsealed, they exercise the refusal of plain, forged, replayed and
reordered frames. Per input the target checks that

- no exception escapes ``data_received()`` (atheris reports any as a crash);
- everything written parses as whole frames of types the engine sends, each
  accepted by its decoder, and everything after AUTH_OK is sealed with
  consecutive counters and valid tags;
- after an ERROR frame the transport is closed and nothing more is written;
- the session's in-flight count is never negative, and once every batch is
  settled a session still open has no request left unanswered;
- the money invariants of the city hold after every batch
  (``CityState.check_invariants``; ``batch_done`` checks floors itself).

The twin used is the one ``engine.fastpath`` selects
(``CITYCARD_NO_EXTENSIONS=1`` for the pure one). Coverage comes from the
Python modules of ``engine`` (session, processor, ladder, and the pure
twin), imported under ``atheris.instrument_imports()``; the compiled twin is
not instrumented at the C level.

Input layout (``make_input()`` builds one):

- byte 0, control: bit 0 handshake first; bits 1-3 the number of cut
  points (0..7); bit 4 the writer has no room (requests get BUSY_RETRY);
  bit 5 batches roll back instead of committing; bit 6 the handshake is
  the kiosk's (TOPUP allowed) instead of the bus validator's; bit 7 the
  rig seals each plain whole frame at the start of the stream (after a
  handshake) before delivering it;
- one ``u16`` per cut point (taken modulo the stream length + 1);
- the rest: the bytes delivered after the handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import struct
import sys
from collections.abc import Sequence

from fuzz import FuzzFinding

HANDSHAKE = 0x01
_CUTS_SHIFT = 1
_CUTS_MASK = 0x07
NO_ROOM = 0x10
ROLL_BACK = 0x20
KIOSK = 0x40
SEAL = 0x80

# A session's input is a few pipelined requests: 16 TAPs are 784 bytes.
MAX_LEN_DEFAULT = 2048

_U16 = struct.Struct(">H")


def make_input(stream: bytes, cuts: Sequence[int] = (), control: int = HANDSHAKE) -> bytes:
    """Build an input of this target (for the corpus and reproducers).

    >>> make_input(b"", control=0)
    b'\\x00'
    """
    if len(cuts) > _CUTS_MASK:
        raise ValueError(f"at most {_CUTS_MASK} cuts, got {len(cuts)}")
    head = (control & ~(_CUTS_MASK << _CUTS_SHIFT)) | (len(cuts) << _CUTS_SHIFT)
    return bytes([head]) + b"".join(_U16.pack(cut) for cut in cuts) + stream


async def run_input(data: bytes) -> None:
    """The fuzz target, in a running event loop: raises on a finding."""
    from engine.session import OPEN
    from fuzz.rig import KIOSK as KIOSK_TERMINAL
    from fuzz.rig import VALIDATOR, SessionRig

    control = data[0] if data else 0
    pos = 1
    cuts = []
    for _ in range((control >> _CUTS_SHIFT) & _CUTS_MASK):
        cuts.append(_U16.unpack(data[pos : pos + 2].ljust(2, b"\x00"))[0])
        pos += 2
    stream = data[pos:]
    rig = SessionRig(writer_room=not control & NO_ROOM, commit=not control & ROLL_BACK)
    if control & HANDSHAKE:
        await rig.open(KIOSK_TERMINAL if control & KIOSK else VALIDATOR)
        if rig.session._state != OPEN:
            raise FuzzFinding(f"the valid handshake did not open the session: {rig.frames()}")
    if control & HANDSHAKE and control & SEAL:
        stream = rig.seal_stream(stream)
    await rig.send(stream, cuts)
    rig.check_output()
    await rig.settle()
    if not rig.transport.closed and rig.session._in_flight != 0:
        raise FuzzFinding(f"{rig.session._in_flight} requests unanswered after every batch settled")
    await rig.finish()
    rig.check_output()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fuzz.session", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="inputs to run (default 100000)")
    parser.add_argument("--max-len", type=int, default=MAX_LEN_DEFAULT, help="longest input in bytes")
    parser.add_argument("libfuzzer", nargs="*", help="more libFuzzer flags, e.g. -seed=1 (after --)")
    args = parser.parse_args(argv)

    import atheris

    from fuzz.frames import libfuzzer_arguments

    with atheris.instrument_imports(include=["engine"]):
        from engine import fastpath
        from fuzz import rig  # noqa: F401 - imports the session and processor under instrumentation
    print(f"fuzz.session: twin {fastpath.IMPLEMENTATION}", file=sys.stderr)
    # A failed AUTH logs a warning: millions of them would only slow the run.
    logging.disable(logging.CRITICAL)
    loop = asyncio.new_event_loop()

    def target(data: bytes) -> None:
        loop.run_until_complete(run_input(data))

    atheris.Setup(libfuzzer_arguments("session", args.runs, args.max_len, args.libfuzzer), target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
