"""Reading a whole table into columns, fast: PostgreSQL's binary COPY of
fixed-width integer rows, cut into typed arrays without a Python object per row.

A city of 10 million cards is loaded at every start. Fetched as rows, each
card costs an asyncpg record, a round trip share and a Python call, and the
database waits while Python works. ``COPY (query) TO STDOUT (FORMAT binary)``
instead streams the rows while they are being decoded, and a row of
integers that are never NULL has a fixed size: a column is every row's
bytes at one offset, so a batch of rows is cut into columns by strided
slices of the buffer (done in C), turned into ``array`` objects and put in
host byte order. Only the row skeleton (field count and field lengths,
the same bytes in every row) is checked, also by strided slices.

    columns = FixedWidthColumns((8, 2, 8), consume=state_loader)
    await conn.copy_from_query(sql, output=columns, format="binary")
    columns.finish()

The binary format (PostgreSQL documentation, "COPY", "Binary Format"): an
11-byte signature, a 32-bit flags field, a 32-bit header-extension length
and the extension; then per row a 16-bit field count and, per field, a
32-bit length and the value in network byte order; then the 16-bit
trailer -1.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable, Sequence

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_HEADER = struct.Struct(">11sII")
_TRAILER = b"\xff\xff"
_FIELD_COUNT = struct.Struct(">h")
_FIELD_LENGTH = struct.Struct(">i")
# Integer widths a column may have, and their array type codes.
_TYPECODES = {2: "h", 4: "i", 8: "q"}
_SWAP = sys.byteorder == "little"

# Rows handed to the consumer at once: enough that its per-batch costs
# (dict updates, array extends) are spread thin, few enough that a batch's
# bytes stay a few megabytes.
BATCH_ROWS = 50_000

Consume = Callable[[list["array[int]"]], None]


class CopyFormatError(Exception):
    """The stream is not binary COPY of the expected fixed-width rows."""


class FixedWidthColumns:
    """A binary COPY sink (asyncpg ``copy_from_query(output=...)``) for rows
    of non-NULL integers of the given byte widths (2, 4 or 8).

    ``consume(columns)`` is called with one ``array`` per column (type code
    h, i or q) for every BATCH_ROWS rows and for the rest at ``finish()``.
    ``rows`` counts them.
    """

    def __init__(self, widths: Sequence[int], consume: Consume) -> None:
        if not widths or any(width not in _TYPECODES for width in widths):
            raise ValueError(f"column widths must be 2, 4 or 8 bytes, got {list(widths)}")
        self._widths = tuple(widths)
        # The row skeleton: the field count, then each field's length before
        # its value. ``_values`` holds each value's offset in the row.
        skeleton = bytearray(_FIELD_COUNT.pack(len(widths)))
        self._values: list[int] = []
        for width in widths:
            skeleton += _FIELD_LENGTH.pack(width)
            self._values.append(len(skeleton))
            skeleton += bytes(width)
        self._row_size = len(skeleton)
        value_bytes = {offset + k for offset, width in zip(self._values, widths, strict=True) for k in range(width)}
        self._fixed = [(offset, skeleton[offset]) for offset in range(self._row_size) if offset not in value_bytes]
        self._consume = consume
        self._buffer = bytearray()
        self._header_read = False
        self._finished = False
        self.rows = 0

    async def __call__(self, chunk: bytes) -> None:
        self.feed(chunk)

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream; consume every whole batch."""
        if self._finished:
            raise CopyFormatError("data after the end of the COPY stream")
        self._buffer += chunk
        if not self._header_read and not self._read_header():
            return
        if len(self._buffer) >= BATCH_ROWS * self._row_size:
            self._decode(len(self._buffer) // self._row_size)

    def finish(self) -> None:
        """The stream has ended: consume the last rows, check the trailer."""
        if not self._header_read:
            raise CopyFormatError("the COPY stream ended before its header")
        whole = (len(self._buffer) - len(_TRAILER)) // self._row_size
        if whole > 0:
            self._decode(whole)
        if bytes(self._buffer) != _TRAILER:
            raise CopyFormatError(f"the COPY stream does not end with its trailer ({len(self._buffer)} bytes left)")
        self._buffer.clear()
        self._finished = True

    def _read_header(self) -> bool:
        buffer = self._buffer
        if len(buffer) < _HEADER.size:
            return False
        signature, _flags, extension = _HEADER.unpack_from(buffer)
        if signature != SIGNATURE:
            raise CopyFormatError("not a binary COPY stream (bad signature)")
        if len(buffer) < _HEADER.size + extension:
            return False
        del buffer[: _HEADER.size + extension]
        self._header_read = True
        return True

    def _decode(self, count: int) -> None:
        """Cut the first ``count`` rows of the buffer into columns; the
        trailer, shorter than a row, is never among them."""
        size = self._row_size
        end = count * size
        rows = bytes(memoryview(self._buffer)[:end])
        del self._buffer[:end]
        for offset, expected in self._fixed:
            if rows[offset:end:size] != bytes((expected,)) * count:
                raise CopyFormatError(
                    f"rows must be {len(self._widths)} integer fields of {list(self._widths)} bytes, never NULL"
                )
        columns: list[array[int]] = []
        for offset, width in zip(self._values, self._widths, strict=True):
            # Byte k of every value is every row's byte at offset + k.
            column_bytes = bytearray(count * width)
            for k in range(width):
                column_bytes[k::width] = rows[offset + k : end : size]
            column = array(_TYPECODES[width])
            column.frombytes(column_bytes)
            if _SWAP:
                column.byteswap()
            columns.append(column)
        self.rows += count
        self._consume(columns)
