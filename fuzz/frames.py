"""Fuzz the frame reader and the decoders of both twins, side by side.

Run ``python -m fuzz.frames --runs N [--twin cython|pure|both]``. Each input
is a byte stream that the target splits into chunks at points the fuzzer
chooses, feeds to ``FrameReader.feed()``, then hands every frame body it got
to the decoder of its type; one ``decode_*`` that the input chooses also
gets raw bytes (the first chunk and the whole stream). The only exception
allowed out of the codec is the twin's ``ProtocolError``: anything else
reaches atheris, which reports a crash and saves the input. Per input the target checks that

- the frames delivered, put back together, are exactly a prefix of the
  stream, and every byte fed is either in a frame or buffered; frames
  after the first AUTH or AUTH_OK are sealed (flags SEALED, 24 bytes of
  counter and tag after the body), those before are not, and ``sealed``
  says so;
- ``buffered()`` stays below the reader's ``max_frame_bytes`` (the reader
  holds at most one incomplete frame), so never above MAX_FRAME_BYTES plus
  the size of a chunk, and is 0 once the reader has stopped;
- after a violation every later ``feed()`` raises the same error;
- the decoder of a delivered frame's type accepts its body, and encoding the
  decoded fields gives the frame back;
- with ``--twin both`` (the default), the two twins give identical results
  for the same chunks: the same frames, decoded values, error codes, error
  text and request ids.

Coverage: the pure twin (``engine._fastpath_py``) is imported under
``atheris.instrument_imports()``, so its branches guide the fuzzer. The
compiled twin is not instrumented at the C level (it would need building
with ``-fsanitize=fuzzer``): it is exercised by the inputs that the pure
twin's coverage finds, and held to the pure twin's results.

Input layout (``make_input()`` builds one), so that a plain frame stream
behind one zero byte is a useful seed:

- byte 0, control: bits 0-2 the number of cut points (0..7); bit 3: a
  reader ``max_frame_bytes`` follows; bit 4: feed chunks as ``bytearray``;
  bit 5: a byte follows choosing the decoder of the raw bytes;
- if bit 3: a ``u16`` mapped into FRAME_HEADER_BYTES..MAX_FRAME_BYTES;
- if bit 5: a byte, the index of a decoder in ``DECODERS`` (modulo their
  number); without it no decoder gets raw bytes;
- one ``u16`` per cut point (taken modulo the stream length + 1);
- the rest: the stream.
"""

from __future__ import annotations

import argparse
import itertools
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from fuzz import CORPUS_DIR, FuzzFinding

TWIN_MODULES = {"cython": "engine._fastpath", "pure": "engine._fastpath_py"}

CUTS_MAX = 7  # chunks per input: enough to split a header, a body and the next frame
_CUTS_MASK = 0x07
_CUSTOM_LIMIT = 0x08
_AS_BYTEARRAY = 0x10
_RAW_DECODER = 0x20

# Longest input by default: a few kilobytes hold dozens of frames, or an
# OFFLINE_UPLOAD of 100 taps and a HOTLIST page of 400 cards; the largest
# counted bodies (16 KiB) only repeat the same entry code, and beyond this
# libFuzzer mostly spends its time copying.
MAX_LEN_DEFAULT = 4096

# libFuzzer's own limits, so that a hang or a leak is a finding too.
TIMEOUT_S = 10  # per input; the slowest input takes milliseconds
RSS_LIMIT_MB = 1024  # the fuzzer with both twins loaded stays far below

_U16 = struct.Struct(">H")
_HEADER = struct.Struct(">IBBHI")  # as docs/protocol.md, "Frames"
_SEALED = 0x0001  # the flags of a frame after the handshake
_SEAL_TRAILER_BYTES = 24  # counter u64 and 16-byte tag
_HANDSHAKE_ENDS = (0x03, 0x04)  # AUTH, AUTH_OK: the frames after them are sealed

# Every decoder, by the message type whose body it reads.
DECODERS = {
    0x01: "decode_hello",
    0x02: "decode_challenge",
    0x03: "decode_auth",
    0x04: "decode_auth_ok",
    0x10: "decode_tap",
    0x11: "decode_topup",
    0x12: "decode_reversal",
    0x13: "decode_tap_result",
    0x20: "decode_ping",
    0x21: "decode_pong",
    0x30: "decode_hotlist_request",
    0x31: "decode_hotlist",
    0x32: "decode_rules_request",
    0x33: "decode_rules",
    0x34: "decode_notice",
    0x40: "decode_offline_upload",
    0x41: "decode_offline_result",
    0x7F: "decode_error",
}
_MSG_ERROR = 0x7F
# A delivered body goes to its own type's decoder only, and raw bytes to the
# one decoder the input names: every decoder on every body cost 18 decodes
# a frame per twin, and the target ran at a ninth of today's rate (550
# inputs/s against 4,800) for no coverage the fuzzer cannot reach by
# choosing the decoder itself.
_DECODER_NAMES = tuple(DECODERS.values())

Observation = tuple[Any, ...]


def make_input(
    stream: bytes,
    cuts: Sequence[int] = (),
    max_frame_bytes: int | None = None,
    raw_decoder: str | None = None,
) -> bytes:
    """Build an input of this target (for the corpus and reproducers).

    >>> make_input(b"\\x00\\x00\\x00\\x08")[:1]
    b'\\x00'
    >>> make_input(b"", raw_decoder="decode_tap").hex()
    '2004'
    """
    if len(cuts) > CUTS_MAX:
        raise ValueError(f"at most {CUTS_MAX} cuts, got {len(cuts)}")
    control = len(cuts)
    head = b""
    if max_frame_bytes is not None:
        control |= _CUSTOM_LIMIT
        head += _U16.pack(max_frame_bytes - 12)
    if raw_decoder is not None:
        control |= _RAW_DECODER
        head += bytes([_DECODER_NAMES.index(raw_decoder)])
    return bytes([control]) + head + b"".join(_U16.pack(cut) for cut in cuts) + stream


def split_input(data: bytes, max_frame_bytes_max: int) -> tuple[int | None, list[bytes], bool, str | None]:
    """An input -> (reader limit or None, chunks, as_bytearray, decoder of
    the raw bytes or None)."""
    control = data[0] if data else 0
    pos = 1
    limit: int | None = None
    if control & _CUSTOM_LIMIT:
        raw = data[pos : pos + 2].ljust(2, b"\x00")
        pos += 2
        # 12 is FRAME_HEADER_BYTES, the smallest limit a reader accepts.
        limit = 12 + _U16.unpack(raw)[0] % (max_frame_bytes_max - 12 + 1)
    raw_decoder: str | None = None
    if control & _RAW_DECODER:
        index = data[pos] if pos < len(data) else 0
        pos += 1
        raw_decoder = _DECODER_NAMES[index % len(_DECODER_NAMES)]
    raw_cuts = []
    for _ in range(control & _CUTS_MASK):
        raw_cuts.append(_U16.unpack(data[pos : pos + 2].ljust(2, b"\x00"))[0])
        pos += 2
    stream = data[pos:]
    points = sorted({cut % (len(stream) + 1) for cut in raw_cuts} | {0, len(stream)})
    chunks = [stream[start:end] for start, end in itertools.pairwise(points)] or [b""]
    return limit, chunks, bool(control & _AS_BYTEARRAY), raw_decoder


def _error_key(error: Any) -> Observation:
    return (int(error.code), str(error), int(error.request_id))


def _decode(fp: ModuleType, name: str, body: bytes) -> Observation:
    """One decoder on body: its value, or its ProtocolError."""
    try:
        return (name, "ok", getattr(fp, name)(body))
    except fp.ProtocolError as error:
        return (name, "error", *_error_key(error))


def _check_frame(fp: ModuleType, msg_type: int, request_id: int, body: bytes) -> Observation:
    """The decoder of the frame's own type accepts it and round-trips."""
    name = DECODERS.get(msg_type)
    if name is None:
        raise FuzzFinding(f"{fp.__name__}: reader delivered unknown type 0x{msg_type:02x}")
    outcome = _decode(fp, name, body)
    if outcome[1] != "ok":
        raise FuzzFinding(f"{fp.__name__}: reader delivered a {name[7:]} body its decoder refuses: {outcome}")
    value = outcome[2]
    fields = value if isinstance(value, tuple) else (value,)
    if msg_type == _MSG_ERROR:
        try:
            body[3:].decode("utf-8")
        except UnicodeDecodeError:
            return outcome  # the decoder replaced the text: it cannot round-trip
    encoder: Callable[..., bytes] = getattr(fp, "encode_" + name[len("decode_") :])
    frame = _HEADER.pack(8 + len(body), 1, msg_type, 0, request_id) + body
    if encoder(request_id, *fields) != frame:
        raise FuzzFinding(f"{fp.__name__}: {name} then encode does not give the frame back: {frame.hex()}")
    return outcome


def run_twin(
    fp: ModuleType, limit: int | None, chunks: list[bytes], as_bytearray: bool, raw_decoder: str | None
) -> list[Observation]:
    """Feed the chunks to one twin; return what it did, checking invariants."""
    reader = fp.FrameReader() if limit is None else fp.FrameReader(limit)
    stream = b"".join(chunks)
    observed: list[Observation] = []
    delivered = bytearray()  # the frames given back, re-encoded
    fed = 0
    error = None
    sealed = False  # an AUTH or AUTH_OK was delivered
    for chunk in chunks:
        fed += len(chunk)
        try:
            frames = reader.feed(bytearray(chunk) if as_bytearray else chunk)
        except fp.ProtocolError as raised:
            if error is None or _error_key(raised) != _error_key(error):
                raise FuzzFinding(f"{fp.__name__}: feed raised {raised!r}, recorded error {error!r}") from raised
            observed.append(("raised", *_error_key(raised)))
            continue
        if error is not None:
            raise FuzzFinding(f"{fp.__name__}: feed after the error {error!r} did not raise")
        for msg_type, request_id, body in frames:
            delivered += _HEADER.pack(8 + len(body), 1, msg_type, _SEALED if sealed else 0, request_id) + body
            fields = body[:-_SEAL_TRAILER_BYTES] if sealed else body
            decoded = _check_frame(fp, msg_type, request_id, fields)
            observed.append(("frame", msg_type, request_id, body, decoded))
            sealed = sealed or msg_type in _HANDSHAKE_ENDS
        if stream[: len(delivered)] != delivered:
            raise FuzzFinding(f"{fp.__name__}: the frames delivered are not the stream's bytes")
        if reader.sealed != sealed:
            raise FuzzFinding(f"{fp.__name__}: sealed is {reader.sealed} after the frames delivered")
        error = reader.error
        buffered = reader.buffered()
        if error is not None:
            observed.append(("error", *_error_key(error)))
            if buffered != 0:
                raise FuzzFinding(f"{fp.__name__}: a stopped reader still holds {buffered} bytes")
        elif len(delivered) + buffered != fed:
            raise FuzzFinding(f"{fp.__name__}: {fed} bytes fed, {len(delivered)} delivered, {buffered} buffered")
        elif buffered >= reader.max_frame_bytes:
            raise FuzzFinding(f"{fp.__name__}: {buffered} bytes buffered, limit {reader.max_frame_bytes}")
        observed.append(("buffered", buffered))
    if error is not None:
        try:
            reader.feed(b"\x00")
        except fp.ProtocolError as raised:
            if _error_key(raised) != _error_key(error):
                raise FuzzFinding(f"{fp.__name__}: a later feed raised {raised!r}, not {error!r}") from raised
        else:
            raise FuzzFinding(f"{fp.__name__}: a later feed after {error!r} did not raise")
    if raw_decoder is not None:
        observed.append(("raw first chunk", _decode(fp, raw_decoder, chunks[0])))
        observed.append(("raw stream", _decode(fp, raw_decoder, stream)))
    return observed


def _first_difference(left: list[Observation], right: list[Observation]) -> str:
    for index, (one, other) in enumerate(zip(left, right, strict=False)):
        if one != other:
            return f"step {index}: {one!r} != {other!r}"
    return f"lengths {len(left)} != {len(right)}"


def check_input(data: bytes, twins: Sequence[ModuleType]) -> None:
    """The fuzz target: raises FuzzFinding (or a codec's crash) on a bug."""
    limit, chunks, as_bytearray, raw_decoder = split_input(data, twins[0].MAX_FRAME_BYTES)
    results = [run_twin(fp, limit, chunks, as_bytearray, raw_decoder) for fp in twins]
    for fp, result in zip(twins[1:], results[1:], strict=True):
        if result != results[0]:
            raise FuzzFinding(
                f"{twins[0].__name__} and {fp.__name__} differ on {data.hex()}: "
                + _first_difference(results[0], result)
            )


def load_twins(which: str) -> list[ModuleType]:
    """Import the twins asked for; the compiled one may be missing only when
    CITYCARD_NO_EXTENSIONS says so (then "both" means the pure one)."""
    import importlib

    names = ["pure", "cython"] if which == "both" else [which]
    twins = []
    for name in names:
        try:
            twins.append(importlib.import_module(TWIN_MODULES[name]))
        except ImportError as error:
            if name == "cython" and which == "both" and os.environ.get("CITYCARD_NO_EXTENSIONS", "") not in ("", "0"):
                print("fuzz.frames: engine._fastpath not built: fuzzing the pure twin only", file=sys.stderr)
                continue
            raise SystemExit(f"fuzz.frames: cannot import {TWIN_MODULES[name]}: {error}") from error
    return twins


def libfuzzer_arguments(target: str, runs: int, max_len: int, extra: Sequence[str]) -> list[str]:
    """libFuzzer's argv: limits, a scratch corpus (libFuzzer writes new
    inputs into the first directory; the checked-in one stays read-only)."""
    scratch = tempfile.mkdtemp(prefix=f"citycard-fuzz-{target}-")
    print(f"fuzz.{target}: new inputs and crash reproducers go to {scratch}", file=sys.stderr)
    return [
        sys.argv[0],
        f"-runs={runs}",
        f"-max_len={max_len}",
        f"-timeout={TIMEOUT_S}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-artifact_prefix={scratch}/",
        "-print_final_stats=1",
        *extra,
        scratch,
        str(CORPUS_DIR / target),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fuzz.frames", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="inputs to run (default 100000)")
    parser.add_argument("--twin", choices=["cython", "pure", "both"], default="both")
    parser.add_argument("--max-len", type=int, default=MAX_LEN_DEFAULT, help="longest input in bytes")
    parser.add_argument("libfuzzer", nargs="*", help="more libFuzzer flags, e.g. -seed=1 (after --)")
    args = parser.parse_args(argv)

    import atheris

    with atheris.instrument_imports(include=["engine"]):
        twins = load_twins(args.twin)
    print(f"fuzz.frames: twins {[fp.__name__ for fp in twins]}", file=sys.stderr)

    def target(data: bytes) -> None:
        check_input(data, twins)

    atheris.Setup(libfuzzer_arguments("frames", args.runs, args.max_len, args.libfuzzer), target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
