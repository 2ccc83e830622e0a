"""The message contract shared by the edge publisher and the consumer.

One vehicle publishes :class:`Batch` messages to ``telemetry/<vin>``; the consumer answers with an
:class:`Ack` on ``ack/<vin>`` once the batch is committed. MessagePack is the wire format; the same
structures are accepted as JSON so that a person can publish one by hand with ``mosquitto_pub``.
See ``docs/wire.md`` for a worked example.

Decoding is strict. Every way a payload can be wrong raises :class:`ContractError`, whose
``reason`` is a short, stable code (stored in the dead-letter table) and whose message says what
exactly was wrong. Any bytes at all, however deep, long or malformed, give a message or a
ContractError: nothing else (see "Hostile input" below).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Final, TypeVar

import msgspec

from revline._peek import json_version, msgpack_version
from revline.fields import FIELDS, Field

__all__ = [
    "ACK_PREFIX",
    "CMD_PREFIX",
    "DTC_PATTERN",
    "EXTRA_KEY_PATTERN",
    "FLAG_CLOCK_UNSYNCED",
    "MAX_BATCH_SAMPLES",
    "MAX_DETAIL_CHARS",
    "MAX_DTC_CODES",
    "MAX_PAYLOAD_BYTES",
    "MAX_STATUS_RANGES",
    "NUMERIC_FIELDS",
    "SCHEMA_VERSION",
    "STATUS_PREFIX",
    "TELEMETRY_PREFIX",
    "Ack",
    "Batch",
    "Command",
    "ContractError",
    "Crash",
    "LossRange",
    "Sample",
    "Status",
    "ack_topic",
    "cmd_topic",
    "decode_ack",
    "decode_batch",
    "decode_command",
    "decode_status",
    "encode",
    "encode_json",
    "is_valid_vin",
    "printable",
    "status_topic",
    "telemetry_topic",
    "vin_from_topic",
]

SCHEMA_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({SCHEMA_VERSION})

MAX_BATCH_SAMPLES: Final = 5000
"""Samples in one message, at most. The edge sends a few hundred; this bounds a hostile one."""

MAX_PAYLOAD_BYTES: Final = 2 * 1024 * 1024
"""Largest payload decoded at all; anything longer is rejected before parsing."""

MAX_EXTRA_FIELDS: Final = 64

EXTRA_KEY_PATTERN: Final = "^[A-Za-z0-9_]{1,64}$"
"""Keys of ``extra``: python-OBD command names (``TIMING_ADVANCE``, ``O2_B1S1``) are ASCII letters,
digits and ``_``. Anything else, control characters and NUL above all (PostgreSQL refuses a NUL
in ``jsonb``, which turned a whole batch into ``db_error``), is refused as ``invalid``."""

DTC_PATTERN: Final = "^[PCBU][0-3][0-9A-F]{3}$"
"""A diagnostic trouble code as SAE J2012 writes it (``P0301``): what ``Sample.dtc`` holds."""

MAX_DTC_CODES: Final = 128
"""Codes in one ``Sample.dtc`` set, at most (mode 03 and 07 together rarely hold ten)."""

MAX_DETAIL_CHARS: Final = 500
"""``ContractError.detail`` is cut to this: msgspec quotes unknown field names, however long."""

TELEMETRY_PREFIX: Final = "telemetry/"
ACK_PREFIX: Final = "ack/"
STATUS_PREFIX: Final = "status/"
CMD_PREFIX: Final = "cmd/"

FLAG_CLOCK_UNSYNCED: Final = 1
"""Sample flag: taken while the device clock was not yet trustworthy and never corrected."""

_VIN_PATTERN: Final = "^[A-HJ-NPR-Z0-9]{17}$"  # ISO 3779: letters I, O and Q are never used
_VIN_RE: Final = re.compile(_VIN_PATTERN)

# Bounds (the measurements' are in revline.fields) are physical limits with headroom. Beyond
# rejecting nonsense they reject NaN and infinities: msgspec fails a NaN on any range check, so no
# per-value Python check is needed.
_I64_MAX: Final = 2**63 - 1
_TS_MAX: Final = 7_258_118_400_000_000  # 2200-01-01 in µs: anything later is a broken clock


Vin = Annotated[str, msgspec.Meta(pattern=_VIN_PATTERN)]
Micros = Annotated[int, msgspec.Meta(ge=0, le=_TS_MAX)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=_I64_MAX)]
Flags = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
ExtraKey = Annotated[str, msgspec.Meta(pattern=EXTRA_KEY_PATTERN)]
ExtraValue = Annotated[float, msgspec.Meta(ge=-1e12, le=1e12)]
Extra = Annotated[dict[ExtraKey, ExtraValue], msgspec.Meta(max_length=MAX_EXTRA_FIELDS)]
DtcCode = Annotated[str, msgspec.Meta(pattern=DTC_PATTERN)]
DtcSet = Annotated[list[DtcCode], msgspec.Meta(max_length=MAX_DTC_CODES)]


def _measurement(field: Field) -> object:
    meta = msgspec.Meta(ge=field.lo, le=field.hi, description=f"{field.description}, {field.unit}")
    return Annotated[float, meta] | None


_SAMPLE_DOC: Final = """One reading of a vehicle at one instant. Every measurement is optional.

``(vin, ts, seq)`` is the sample's identity: decided once on the device, never changed on
resend, and the unique key of the cold table.

Fields: ``ts`` (UTC time of the reading, microseconds since the Unix epoch), ``seq`` (per-device
sequence number, strictly increasing across restarts), then one optional float per measurement of
:data:`revline.fields.FIELDS` (its unit and bounds there), ``extra`` (any other PID by its
python-OBD name, e.g. ``{"TIMING_ADVANCE": 12.5}``), ``flags`` (bit set:
``FLAG_CLOCK_UNSYNCED``) and ``dtc``: absent, except on the sample taken when the vehicle's set
of stored and pending trouble codes changed, which carries the full new set (``[]`` once
cleared), sorted.
"""

if TYPE_CHECKING:
    # What type checkers see; the class itself is generated from the field table below.

    class Sample(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
        """One reading of a vehicle at one instant (generated from :data:`FIELDS`)."""

        ts: int
        seq: int
        extra: dict[str, float] | None = None
        flags: int = 0
        dtc: list[str] | None = None

        def __init__(
            self,
            *,
            ts: int,
            seq: int,
            extra: dict[str, float] | None = None,
            flags: int = 0,
            dtc: list[str] | None = None,
            **measurements: float | None,
        ) -> None: ...

        def __getattr__(self, name: str) -> float | None:
            """A measurement of :data:`FIELDS`, None when it was not read."""

else:
    Sample = msgspec.defstruct(
        "Sample",
        [
            ("ts", Micros),
            ("seq", Seq),
            *((field.name, _measurement(field), None) for field in FIELDS),
            ("extra", Extra | None, None),
            ("flags", Flags, 0),
            ("dtc", DtcSet | None, None),
        ],
        module=__name__,
        namespace={"__doc__": _SAMPLE_DOC},
        forbid_unknown_fields=True,
        omit_defaults=True,
    )


NUMERIC_FIELDS: Final = tuple(field.name for field in FIELDS)
"""The typed measurement columns, in contract order (:data:`revline.fields.FIELDS`)."""


class Batch(msgspec.Struct, forbid_unknown_fields=True):
    """Samples of one vehicle sent as one MQTT message to ``telemetry/<vin>``."""

    v: int
    """Schema version, ``SCHEMA_VERSION``."""
    vin: Vin
    batch: Seq
    """Batch id, unique per vehicle; the ack names it. A resend reuses id and bytes."""
    samples: Annotated[list[Sample], msgspec.Meta(min_length=1, max_length=MAX_BATCH_SAMPLES)]


class Ack(msgspec.Struct, forbid_unknown_fields=True):
    """End-to-end acknowledgement on ``ack/<vin>``: these batches are committed to the database."""

    v: int
    vin: Vin
    batches: Annotated[list[Seq], msgspec.Meta(min_length=1, max_length=100_000)]


MAX_STATUS_RANGES: Final = 100
"""Ranges in one list of a :class:`Status` or :class:`Command`, at most."""
MAX_STATUS_BYTES: Final = 64 * 1024
"""A status or command payload is refused beyond this, before parsing."""

Count = Annotated[int, msgspec.Meta(ge=0, le=_I64_MAX)]
_SHORT_TEXT: Final = "^[A-Za-z0-9 ._+:()-]{0,60}$"
ShortText = Annotated[str, msgspec.Meta(pattern=_SHORT_TEXT)]


class LossRange(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """``[lo, hi, samples]``: sequence numbers ``lo..hi`` and how many samples of them were lost
    (fewer than ``hi - lo + 1`` when the range had holes already)."""

    lo: Seq
    hi: Seq
    samples: Count


class Crash(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """``[seq, samples, at]``: the device died with samples not yet in its spool. Found on the
    next start; they never got a sequence number (they would have come before ``seq``), and
    ``samples`` is an estimate (the size of the last flush before it), ``at`` that flush's
    time (µs)."""

    seq: Seq
    samples: Count
    at: Micros


class Status(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What a device says about itself on ``status/<vin>`` (every ``status_every_s``, on connect,
    after a repair command, and with ``online`` false at a clean stop), and its last will
    (``online`` false, nothing else)."""

    v: int
    vin: Vin
    online: bool = True
    sent_at: Micros | None = None
    """Device wall time of this status (µs)."""
    backlog: Count = 0
    """Samples in the spool not yet acked end to end."""
    oldest_unsent: Micros | None = None
    """Timestamp of the oldest sample the broker has not taken yet."""
    next_seq: Seq = 0
    """Sequence number of the next sample: how many were ever spooled."""
    durable_below: Seq | None = None
    """Every sequence number below this was acked end to end, or is declared lost here."""
    evicted: Annotated[list[LossRange], msgspec.Meta(max_length=MAX_STATUS_RANGES)] = []
    """Unsent samples the spool evicted at its size cap (the newest ranges)."""
    evicted_total: Count = 0
    not_held: Annotated[list[LossRange], msgspec.Meta(max_length=MAX_STATUS_RANGES)] = []
    """Ranges a repair command asked for that the spool no longer holds."""
    crashes: Annotated[list[Crash], msgspec.Meta(max_length=20)] = []
    crash_lost_total: Count = 0
    clock: ShortText = ""
    version: ShortText = ""


SeqRange = Annotated[list[Seq], msgspec.Meta(min_length=2, max_length=2)]


class Command(msgspec.Struct, forbid_unknown_fields=True):
    """Consumer to device on ``cmd/<vin>``: resend the batches holding these ranges."""

    v: int
    vin: Vin
    resend: Annotated[list[SeqRange], msgspec.Meta(min_length=1, max_length=MAX_STATUS_RANGES)]
    """``[lo, hi]`` inclusive sequence ranges missing from the database."""


# C0 controls (NUL included), DEL, C1 controls and lone surrogates: PostgreSQL text refuses NUL
# (SQLSTATE 22021) and UTF-8 cannot carry a surrogate; the others break log lines.
def printable(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text`` safe for a log line and a text column, cut to ``limit``: every character Python
    does not print (controls, NUL, surrogates, line and paragraph separators) is escaped
    (``\\x00``). Only the head of a long text is looked at."""
    head = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[: limit + 1])
    return head if len(head) <= limit else head[: limit - 1] + "…"


class ContractError(ValueError):
    """A payload that does not satisfy the contract.

    ``reason`` is a stable short code (``too_large``, ``undecodable``, ``invalid``,
    ``unsupported_version``, ``vin_mismatch``, ``bad_topic``); ``detail`` says what was wrong. The
    detail is stored in a text column and logged, so it never holds a control character (they are
    escaped, see :func:`printable`) and is at most ``MAX_DETAIL_CHARS`` long.
    """

    def __init__(self, reason: str, detail: str) -> None:
        detail = printable(detail)
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def is_valid_vin(vin: str) -> bool:
    """True for a 17-character VIN made of digits and capitals other than I, O and Q."""
    return _VIN_RE.fullmatch(vin) is not None


def _check_vin(vin: str) -> str:
    if not is_valid_vin(vin):
        raise ContractError("bad_topic", f"{vin!r} is not a VIN (17 of 0-9 A-Z without I, O, Q)")
    return vin


def telemetry_topic(vin: str) -> str:
    """``telemetry/<vin>``, where a vehicle publishes its batches."""
    return TELEMETRY_PREFIX + _check_vin(vin)


def ack_topic(vin: str) -> str:
    """``ack/<vin>``, where the consumer confirms committed batches."""
    return ACK_PREFIX + _check_vin(vin)


def status_topic(vin: str) -> str:
    """``status/<vin>``, where a device reports on itself."""
    return STATUS_PREFIX + _check_vin(vin)


def cmd_topic(vin: str) -> str:
    """``cmd/<vin>``, where the consumer asks a device to resend missing ranges."""
    return CMD_PREFIX + _check_vin(vin)


def vin_from_topic(topic: str) -> str:
    """The VIN of a ``telemetry/``, ``ack/``, ``status/`` or ``cmd/<vin>`` topic; ContractError
    otherwise."""
    for prefix in (TELEMETRY_PREFIX, ACK_PREFIX, STATUS_PREFIX, CMD_PREFIX):
        if topic.startswith(prefix):
            return _check_vin(topic[len(prefix) :])
    raise ContractError("bad_topic", f"topic {topic!r} is neither telemetry/<vin> nor ack/<vin>")


_batch_msgpack = msgspec.msgpack.Decoder(Batch)
_batch_json = msgspec.json.Decoder(Batch)
_ack_msgpack = msgspec.msgpack.Decoder(Ack)
_ack_json = msgspec.json.Decoder(Ack)
_status_msgpack = msgspec.msgpack.Decoder(Status)
_status_json = msgspec.json.Decoder(Status)
_command_msgpack = msgspec.msgpack.Decoder(Command)
_command_json = msgspec.json.Decoder(Command)
_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()


def encode(message: Batch | Ack | Status | Command) -> bytes:
    """MessagePack bytes of a batch or an ack, as sent on the wire."""
    return _encoder.encode(message)


def encode_json(message: Batch | Ack | Status | Command) -> bytes:
    """The JSON form of a batch or an ack, for people and ``mosquitto_pub``."""
    return _json_encoder.encode(message)


_JSON_START: Final = re.compile(rb"[ \t\r\n]*+\{")


def _is_json(payload: bytes) -> bool:
    # A MessagePack batch starts with a map header (0x80-0x8f, 0xde, 0xdf); '{' is 0x7b, which
    # in MessagePack is the integer 123, never a valid message. So one byte tells them apart.
    return _JSON_START.match(payload) is not None


_T = TypeVar("_T", Batch, Ack, Status, Command)


# Hostile input. The strict decoders below are typed all the way down and forbid unknown fields,
# so msgspec never descends further than a valid message does (4 levels): a deeper value is
# refused where it appears, without recursion, at any depth (tests/stack/test_poison.py proves it
# with the recursion limit raised to a million). What a lenient decode would skip recursively (an
# unknown field's value) is never decoded: the version of a refused payload is looked up by the
# non-recursive walker in revline._peek. Keep every field typed: an `Any`, a `Raw` or a struct
# without forbid_unknown_fields here would bring back recursion driven by the sender.


def _decode(
    payload: bytes,
    strict: tuple[msgspec.msgpack.Decoder[_T], msgspec.json.Decoder[_T]],
) -> _T:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError("too_large", f"{len(payload)} bytes, limit {MAX_PAYLOAD_BYTES}")
    as_json = _is_json(payload)
    kind = "JSON" if as_json else "MessagePack"
    try:
        message = strict[1].decode(payload) if as_json else strict[0].decode(payload)
    except msgspec.ValidationError as exc:
        version = json_version(payload) if as_json else msgpack_version(payload)
        if version is not None and version not in SUPPORTED_VERSIONS:
            raise ContractError(
                "unsupported_version", f"schema version {version}, expected 1"
            ) from exc
        detail = str(exc)
        if detail.startswith("Expected `object`, got") and " - at `" not in detail:
            # The top level itself is wrong: say what it looked like.
            detail += f" (payload starts {payload[:16]!r}: not a MessagePack map or JSON object)"
        raise ContractError("invalid", detail) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec's MessagePack decoder lets invalid UTF-8 in a string escape as
        # UnicodeDecodeError rather than DecodeError (found by the hypothesis corruption test).
        raise ContractError("undecodable", f"not valid {kind}: {exc}") from exc
    except RecursionError as exc:  # cannot happen with the typed decoders; never let it out
        raise ContractError("undecodable", f"{kind} nested too deeply") from exc
    except Exception as exc:  # a decoder bug must not stop a service either
        # MemoryError, OverflowError, or whatever a future msgspec raises: this one payload is
        # bad, the process goes on.
        detail = f"{kind} decoder failed: {type(exc).__name__}: {exc}"
        raise ContractError("undecodable", detail) from exc
    if message.v not in SUPPORTED_VERSIONS:
        raise ContractError("unsupported_version", f"schema version {message.v}, expected 1")
    return message


def decode_batch(payload: bytes, topic: str | None = None) -> Batch:
    """Decode and validate a batch (MessagePack or JSON); check it against its topic if given."""
    batch = _decode(payload, (_batch_msgpack, _batch_json))
    if topic is not None and vin_from_topic(topic) != batch.vin:
        raise ContractError("vin_mismatch", f"payload VIN {batch.vin} on topic {topic!r}")
    return batch


def decode_ack(payload: bytes) -> Ack:
    """Decode and validate an end-to-end ack (MessagePack or JSON)."""
    return _decode(payload, (_ack_msgpack, _ack_json))


def _small(payload: bytes) -> bytes:
    if len(payload) > MAX_STATUS_BYTES:
        raise ContractError("too_large", f"{len(payload)} bytes, limit {MAX_STATUS_BYTES}")
    return payload


def decode_status(payload: bytes, topic: str | None = None) -> Status:
    """Decode and validate a device status (MessagePack or JSON); check it against its topic."""
    status = _decode(_small(payload), (_status_msgpack, _status_json))
    if topic is not None and vin_from_topic(topic) != status.vin:
        raise ContractError("vin_mismatch", f"payload VIN {status.vin} on topic {topic!r}")
    return status


def decode_command(payload: bytes) -> Command:
    """Decode and validate a repair command (MessagePack or JSON)."""
    command = _decode(_small(payload), (_command_msgpack, _command_json))
    for lo, hi in command.resend:
        if lo > hi:
            raise ContractError("invalid", f"range [{lo}, {hi}] ends before it starts")
    return command
