"""The test vectors of docs/protocol.md, checked against both codec twins.

The vectors are read FROM the markdown (section "Test vectors"), so the
document a vendor implements from and the engine's codec cannot drift
apart: a changed byte in either fails here. The block format (```vector,
```handshake, ```session_keys, ```sealed, ```list_key and ```reject fences
of ``key: value`` lines) is described in that section. Sealed frames are
checked against the document's formulas computed here with ``hmac`` alone,
against ``engine/seal.py``, and through both twins' frame readers; signed
lists against the document's key derivation and Ed25519.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import json
import os
import re
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from engine import fastpath
from engine.codes import ErrorCode, FrameFlag, MessageType, ResultCode, TapInfo
from engine.seal import Opener, Sealer, derive_session_keys
from engine.signing import ListSigner

PROTOCOL_DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

# --- The twins (same rule as tests/test_codec.py) ------------------------------

TWIN_MODULES = {"cython": "engine._fastpath", "pure": "engine._fastpath_py"}


def load_twin(name: str) -> ModuleType:
    """Import one twin; a missing compiled twin fails unless disabled."""
    try:
        return importlib.import_module(TWIN_MODULES[name])
    except ImportError as exc:
        if name == "cython" and os.environ.get("CITYCARD_NO_EXTENSIONS", "") not in (
            "",
            "0",
        ):
            pytest.skip("CITYCARD_NO_EXTENSIONS is set and engine._fastpath is not built: testing the pure twin only")
        pytest.fail(
            f"cannot import {TWIN_MODULES[name]} ({exc}); build it with"
            " `.venv/bin/cythonize -i -3 engine/_fastpath.pyx`, or set"
            " CITYCARD_NO_EXTENSIONS=1 to test the pure twin only"
        )


# --- Reading the vectors from the document ----------------------------------------

# The body fields of each message, in table order, with how to read them.
FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "HELLO": (("terminal_id", "int"), ("key_version", "int"), ("client_nonce", "hex")),
    "CHALLENGE": (("server_nonce", "hex"),),
    "AUTH": (("proof", "hex"),),
    "AUTH_OK": (("engine_proof", "hex"), ("engine_time_ms", "int")),
    "TAP": (
        ("terminal_seq", "int"),
        ("card_uid", "int"),
        ("card_counter", "int"),
        ("event_time_ms", "int"),
        ("tap_flags", "int"),
    ),
    "TOPUP": (
        ("terminal_seq", "int"),
        ("card_uid", "int"),
        ("amount_cents", "int"),
        ("event_time_ms", "int"),
    ),
    "REVERSAL": (("terminal_seq", "int"), ("original_seq", "int"), ("event_time_ms", "int")),
    "TAP_RESULT": (
        ("terminal_seq", "int"),
        ("result", "result"),
        ("amount_cents", "int"),
        ("balance_cents", "int"),
        ("info", "info"),
    ),
    "PING": (("payload", "int"),),
    "PONG": (("payload", "int"),),
    "ERROR": (("code", "error"), ("text", "text")),
    "HOTLIST_REQUEST": (("since_version", "int"), ("after_uid", "int")),
    "HOTLIST": (
        ("flags", "int"),
        ("since_version", "int"),
        ("version", "int"),
        ("after_uid", "int"),
        ("entries", "list"),
        ("signature", "hex"),
    ),
    "RULES_REQUEST": (("rules_version", "int"),),
    "RULES": (
        ("rules_version", "int"),
        ("service_id", "int"),
        ("service_kind", "int"),
        ("min_balance_to_enter_cents", "int"),
        ("tolerated_negative_cents", "int"),
        ("passback_window_s", "int"),
        ("max_charge_cents", "int"),
        ("transfer_window_minutes", "int"),
        ("transfer_percent_off", "int"),
        ("cap_daily_cents", "int"),
        ("cap_monthly_cents", "int"),
        ("fares", "list"),
        ("signature", "hex"),
    ),
    "NOTICE": (("hotlist_version", "int"), ("rules_version", "int")),
    "OFFLINE_UPLOAD": (("taps", "list"),),
    "OFFLINE_RESULT": (("results", "list"),),
}
# The label each signed list's signature is over (docs/protocol.md, "Signed lists").
SIGNED = {"HOTLIST": b"citycard/v1/hotlist", "RULES": b"citycard/v1/rules"}
assert set(FIELDS) == {member.name for member in MessageType}

BLOCK = re.compile(r"^```(vector|handshake|session_keys|sealed|list_key|reject)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
INTEGER = re.compile(r"-?(?:0x[0-9a-f]+|0|[1-9][0-9]*)")
HEX = re.compile(r"(?:[0-9a-f]{2}| )*")


def vectors_section() -> str:
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    start = text.index("\n## Test vectors\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def parse_block(body: str) -> dict[str, str]:
    """``key: value`` lines; an indented line continues the value above."""
    fields: dict[str, str] = {}
    key = None
    for line in body.splitlines():
        if line[:1].isspace():
            assert key is not None, f"continuation line without a key: {line!r}"
            fields[key] += " " + line.strip()
            continue
        key, colon, value = line.partition(":")
        assert colon and key == key.strip() and key not in fields, line
        fields[key] = value.strip()
    return fields


def parse_value(kind: str, text: str) -> Any:
    if kind == "int":
        assert INTEGER.fullmatch(text), f"not an integer: {text!r}"
        return int(text, 0)
    if kind == "hex":
        assert HEX.fullmatch(text), f"not hex: {text!r}"
        return bytes.fromhex(text)
    if kind == "text":
        value = json.loads(text)
        assert isinstance(value, str)
        return value
    if kind == "list":
        entries = json.loads(text)
        assert isinstance(entries, list) and all(isinstance(entry, list) for entry in entries)
        assert all(isinstance(field, int) for entry in entries for field in entry)
        return [tuple(entry) for entry in entries]
    if kind == "info":
        # The number in hex, then its bits' names, lowest first: both must agree.
        number, *names = text.split()
        assert re.fullmatch(r"0x[0-9a-f]{4}", number), f"info is 4 hex digits: {number!r}"
        value = int(number, 16)
        bits = [flag.name for flag in TapInfo if flag & value]
        assert sum(TapInfo[name] for name in bits) == value, f"unknown bits in {number}"
        assert names == (["|".join(bits)] if bits else []), f"{number} is not {names}"
        return value
    # "result" / "error": the number, then its name, which must agree.
    number, name = text.split()
    enum = ResultCode if kind == "result" else ErrorCode
    assert enum(int(number)).name == name, f"{number} is not {name}"
    return int(number)


BLOCKS = [(kind, parse_block(body)) for kind, body in BLOCK.findall(vectors_section())]
VECTORS = [fields for kind, fields in BLOCKS if kind == "vector"]
REJECTS = [fields for kind, fields in BLOCKS if kind == "reject"]
[HANDSHAKE] = [fields for kind, fields in BLOCKS if kind == "handshake"]
[SESSION_KEYS] = [fields for kind, fields in BLOCKS if kind == "session_keys"]
[LIST_KEY] = [fields for kind, fields in BLOCKS if kind == "list_key"]
SEALED = [fields for kind, fields in BLOCKS if kind == "sealed"]


def vector_fields(vector: dict[str, str]) -> tuple[Any, ...]:
    return tuple(parse_value(kind, vector[name]) for name, kind in FIELDS[vector["message"]])


def vector_id(vector: dict[str, str]) -> str:
    return f"{vector['message']}-request-{vector['request_id']}"


# --- The document -------------------------------------------------------------------


def test_every_message_type_has_a_vector() -> None:
    assert {vector["message"] for vector in VECTORS} == set(FIELDS)
    results = [vector_fields(vector) for vector in VECTORS if vector["message"] == "TAP_RESULT"]
    assert any(result == ResultCode.APPROVED for _, result, _, _, _ in results)
    assert any(result != ResultCode.APPROVED for _, result, _, _, _ in results)
    assert any(balance < 0 for _, _, _, balance, _ in results)
    assert any(info == TapInfo.CONCESSION_NOT_VALID for *_, info in results)
    assert any(info.bit_count() > 1 for *_, info in results)


def info_bits_table() -> list[tuple[int, str, str]]:
    """(value, name, terminal action) of each row of the "Info bits" table."""
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    start = text.index("\n#### Info bits\n")
    end = text.index("\n### ", start)
    rows = []
    for line in text[start:end].splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 5 and cells[1].startswith("`0x"):
            rows.append((int(cells[1].strip("`"), 16), cells[2], cells[4]))
    return rows


def test_info_bits_table_lists_every_tap_info_bit() -> None:
    """What a terminal reads about the bits is what the engine sets."""
    rows = info_bits_table()
    assert [(value, name) for value, name, _ in rows] == [(flag.value, flag.name) for flag in TapInfo if flag]
    assert all(action for _, _, action in rows)


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_vector_is_well_formed(vector: dict[str, str]) -> None:
    """Keys in the documented order; the frame's header matches them."""
    names = [name for name, _kind in FIELDS[vector["message"]]]
    assert list(vector) == ["message", "request_id", *names, "frame"]
    assert HEX.fullmatch(vector["frame"])
    frame = bytes.fromhex(vector["frame"])
    length, version, msg_type, flags, request_id = struct.unpack_from(">IBBHI", frame)
    assert length == len(frame) - 4
    assert (version, msg_type, flags) == (1, MessageType[vector["message"]], 0)
    assert request_id == parse_value("int", vector["request_id"])
    # The first line of the frame is exactly the header, split by field.
    assert vector["frame"].split()[:5] == [
        frame[0:4].hex(),
        frame[4:5].hex(),
        frame[5:6].hex(),
        frame[6:8].hex(),
        frame[8:12].hex(),
    ]


# --- Both twins ------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_vector_encodes(fp: ModuleType, vector: dict[str, str]) -> None:
    encode = getattr(fp, f"encode_{vector['message'].lower()}")
    request_id = parse_value("int", vector["request_id"])
    assert encode(request_id, *vector_fields(vector)).hex() == bytes.fromhex(vector["frame"]).hex()


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_vector_decodes(fp: ModuleType, vector: dict[str, str]) -> None:
    frame = bytes.fromhex(vector["frame"])
    reader = fp.FrameReader()
    [(msg_type, request_id, body)] = reader.feed(frame)
    assert reader.error is None and reader.buffered() == 0
    assert msg_type == MessageType[vector["message"]]
    assert request_id == parse_value("int", vector["request_id"])
    fields = vector_fields(vector)
    decoded = getattr(fp, f"decode_{vector['message'].lower()}")(body)
    assert decoded == (fields if len(fields) > 1 else fields[0])


@pytest.mark.parametrize("reject", REJECTS, ids=[f"reject-{r['error'].split()[1]}" for r in REJECTS])
def test_rejected_frame(fp: ModuleType, reject: dict[str, str]) -> None:
    data = bytes.fromhex(reject["frame"])
    reader = fp.FrameReader()
    for index in range(len(data) - 1):  # not a byte early (whole frames before it pass)...
        reader.feed(data[index : index + 1])
        assert reader.error is None
    assert reader.feed(data[-1:]) == []  # ...and not a byte late
    assert reader.error is not None
    assert reader.error.code == parse_value("error", reject["error"])
    assert reader.error.request_id == parse_value("int", reject["request_id"])


def test_handshake_worked_example(fp: ModuleType) -> None:
    assert list(HANDSHAKE) == [
        "terminal_key",
        "terminal_id",
        "key_version",
        "client_nonce",
        "server_nonce",
        "transcript",
        "terminal_proof",
        "engine_proof",
    ]
    key = parse_value("hex", HANDSHAKE["terminal_key"])
    terminal_id = parse_value("int", HANDSHAKE["terminal_id"])
    key_version = parse_value("int", HANDSHAKE["key_version"])
    client_nonce = parse_value("hex", HANDSHAKE["client_nonce"])
    server_nonce = parse_value("hex", HANDSHAKE["server_nonce"])
    transcript = parse_value("hex", HANDSHAKE["transcript"])
    terminal_proof = parse_value("hex", HANDSHAKE["terminal_proof"])
    engine_proof = parse_value("hex", HANDSHAKE["engine_proof"])
    assert key == bytes(range(32))

    # The document's formula, computed here without the codec...
    assert transcript == (struct.pack(">IH", terminal_id, key_version) + client_nonce + server_nonce)
    assert terminal_proof == hmac.new(key, b"citycard/v1/terminal-proof" + transcript, hashlib.sha256).digest()
    assert engine_proof == hmac.new(key, b"citycard/v1/engine-proof" + transcript, hashlib.sha256).digest()
    # ...and by the codec.
    inputs = (key, terminal_id, key_version, client_nonce, server_nonce)
    assert fp.terminal_proof(*inputs) == terminal_proof
    assert fp.engine_proof(*inputs) == engine_proof

    # The message vectors are this very exchange.
    first = {v["message"]: vector_fields(v) for v in reversed(VECTORS)}
    assert first["HELLO"] == (terminal_id, key_version, client_nonce)
    assert first["CHALLENGE"] == (server_nonce,)
    assert first["AUTH"] == (terminal_proof,)
    assert first["AUTH_OK"][0] == engine_proof


# --- Sealed frames ----------------------------------------------------------------------


def handshake_inputs() -> tuple[bytes, int, int, bytes, bytes]:
    return (
        parse_value("hex", HANDSHAKE["terminal_key"]),
        parse_value("int", HANDSHAKE["terminal_id"]),
        parse_value("int", HANDSHAKE["key_version"]),
        parse_value("hex", HANDSHAKE["client_nonce"]),
        parse_value("hex", HANDSHAKE["server_nonce"]),
    )


def documented_key(direction: str) -> bytes:
    assert direction in ("terminal_to_engine", "engine_to_terminal"), direction
    return parse_value("hex", SESSION_KEYS[direction])


def plain_vector(message: str, request_id: str) -> dict[str, str]:
    [vector] = [v for v in VECTORS if v["message"] == message and v["request_id"] == request_id]
    return vector


def test_session_keys_worked_example() -> None:
    assert list(SESSION_KEYS) == ["salt", "prk", "terminal_to_engine", "engine_to_terminal"]
    key, terminal_id, key_version, client_nonce, server_nonce = handshake_inputs()
    salt = parse_value("hex", SESSION_KEYS["salt"])
    prk = parse_value("hex", SESSION_KEYS["prk"])
    # The document's formula (HKDF-SHA256, one block), computed here...
    assert salt == client_nonce + server_nonce
    assert prk == hmac.new(salt, key, hashlib.sha256).digest()
    ids = struct.pack(">IH", terminal_id, key_version)
    for direction, label in (
        ("terminal_to_engine", b"citycard/v1/seal/terminal-to-engine"),
        ("engine_to_terminal", b"citycard/v1/seal/engine-to-terminal"),
    ):
        expected = hmac.new(prk, label + ids + b"\x01", hashlib.sha256).digest()
        assert documented_key(direction) == expected, direction
    # ...and by the engine.
    keys = derive_session_keys(key, terminal_id, key_version, client_nonce, server_nonce)
    assert keys.terminal_to_engine == documented_key("terminal_to_engine")
    assert keys.engine_to_terminal == documented_key("engine_to_terminal")


def test_both_directions_have_a_sealed_vector() -> None:
    assert {s["direction"] for s in SEALED} == {"terminal_to_engine", "engine_to_terminal"}


@pytest.mark.parametrize("sealed", SEALED, ids=lambda s: f"{s['message']}-{s['direction']}")
def test_sealed_vector(fp: ModuleType, sealed: dict[str, str]) -> None:
    assert list(sealed) == ["message", "direction", "request_id", "counter", "tag", "frame"]
    key = documented_key(sealed["direction"])
    counter = parse_value("int", sealed["counter"])
    tag = parse_value("hex", sealed["tag"])
    plain = bytes.fromhex(plain_vector(sealed["message"], sealed["request_id"])["frame"])
    frame = bytes.fromhex(sealed["frame"])

    # The layout: the plain frame's header with SEALED and 24 more bytes,
    # its body, the counter, the tag; split by field on the lines.
    length, version, msg_type, _flags, request_id = struct.unpack_from(">IBBHI", plain)
    assert frame == (
        struct.pack(">IBBHI", length + 24, version, msg_type, FrameFlag.SEALED, request_id)
        + plain[12:]
        + counter.to_bytes(8, "big")
        + tag
    )
    tokens = sealed["frame"].split()
    assert tokens[-2:] == [counter.to_bytes(8, "big").hex(), tag.hex()]
    assert tokens[:5] == [
        frame[0:4].hex(),
        frame[4:5].hex(),
        frame[5:6].hex(),
        frame[6:8].hex(),
        frame[8:12].hex(),
    ]
    # The tag by the document's formula, and the engine's sealer.
    assert tag == hmac.new(key, frame[4:-16], hashlib.sha256).digest()[:16]
    assert Sealer(key, counter).seal(plain) == frame

    # Through the twin's reader, after the handshake frame of that stream.
    last = "AUTH" if sealed["direction"] == "terminal_to_engine" else "AUTH_OK"
    handshake_end = bytes.fromhex(plain_vector(last, "2")["frame"])
    reader = fp.FrameReader()
    delivered = reader.feed(handshake_end + frame)
    assert reader.error is None and reader.sealed and len(delivered) == 2
    got_type, got_request_id, body = delivered[1]
    assert (got_type, got_request_id) == (msg_type, request_id)
    assert Opener(key, counter).open(got_type, got_request_id, body) == plain[12:]

    # The refusals the document promises: a changed bit, a replay, a reflection.
    changed = bytearray(body)
    changed[3] ^= 0x10
    for opener, data, code in (
        (Opener(key, counter), bytes(changed), ErrorCode.BAD_TAG),
        (Opener(key, counter + 1), body, ErrorCode.BAD_COUNTER),
        (
            Opener(
                documented_key(
                    "engine_to_terminal" if sealed["direction"] == "terminal_to_engine" else "terminal_to_engine"
                ),
                counter,
            ),
            body,
            ErrorCode.BAD_TAG,
        ),
    ):
        # engine/seal.py raises the ProtocolError of the twin engine.fastpath selected.
        with pytest.raises(fastpath.ProtocolError) as raised:
            opener.open(got_type, got_request_id, data)
        assert raised.value.code == code


# --- Signed lists -------------------------------------------------------------------------


def test_list_key_worked_example() -> None:
    assert list(LIST_KEY) == ["master_secret", "seed", "public_key"]
    master = parse_value("hex", LIST_KEY["master_secret"])
    seed = parse_value("hex", LIST_KEY["seed"])
    public_key = parse_value("hex", LIST_KEY["public_key"])
    assert master == bytes(range(0x40, 0x60))
    # The document's formula (HKDF-SHA256 without salt, one block), computed here...
    prk = hmac.new(bytes(32), master, hashlib.sha256).digest()
    assert seed == hmac.new(prk, b"citycard/v1/list-signing-key" + b"\x01", hashlib.sha256).digest()
    derived = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert derived == public_key
    # ...and by the engine.
    assert ListSigner(master).public_key == public_key


@pytest.mark.parametrize(
    "vector", [v for v in VECTORS if v["message"] in SIGNED], ids=lambda v: f"{v['message']}-request-{v['request_id']}"
)
def test_signed_list_vector(vector: dict[str, str]) -> None:
    """The signature verifies with the documented key over the label and the
    body before it; it is what the engine signs; a changed bit fails it."""
    public_key = Ed25519PublicKey.from_public_bytes(parse_value("hex", LIST_KEY["public_key"]))
    body = bytes.fromhex(vector["frame"])[12:]
    content, signature = body[:-64], body[-64:]
    assert signature == parse_value("hex", vector["signature"])
    label = SIGNED[vector["message"]]
    public_key.verify(signature, label + content)  # raises when it does not verify
    assert ListSigner(parse_value("hex", LIST_KEY["master_secret"])).sign(label, content) == signature
    changed = bytearray(content)
    changed[-1] ^= 1
    with pytest.raises(InvalidSignature):
        public_key.verify(signature, label + bytes(changed))
    other = b"citycard/v1/rules" if label == b"citycard/v1/hotlist" else b"citycard/v1/hotlist"
    with pytest.raises(InvalidSignature):
        public_key.verify(signature, other + content)
