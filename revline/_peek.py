"""The ``v`` of a payload that strict decoding refused, found without recursion. Never raises.

A refused payload may be a newer schema version, which is dead-lettered as
``unsupported_version`` rather than ``invalid``. Finding its ``v`` means walking the top-level
map and skipping whatever comes before ``v``. A lenient msgspec decode would do that skipping
recursively in C, guarded only by the interpreter's recursion limit: ~1,000 levels of nesting in
a 2 KB message then raise ``RecursionError`` (issue 12, defect 1), and with a raised limit the C
stack overflows. So this walks with an explicit stack, and gives up (None) beyond ``MAX_DEPTH``
levels or ``MAX_STEPS`` elements: the answer only chooses between two reasons, and it must cost
a hostile payload no more than a valid one.
"""

from __future__ import annotations

import re
import struct
from typing import Final

import msgspec

__all__ = ["MAX_DEPTH", "MAX_STEPS", "json_version", "msgpack_version"]

MAX_DEPTH: Final = 32
"""Nesting skipped while looking for ``v``; a valid message is 4 levels deep."""
MAX_STEPS: Final = 2_000
"""Elements (MessagePack) or tokens (JSON) looked at before giving up: ``v`` comes first in
everything Revline encodes, so only a hand-made message puts it behind this many."""


class _GiveUpError(Exception):
    pass


# -- MessagePack ---------------------------------------------------------------------------------


def _layouts() -> list[tuple[int, int, int]]:
    """Per first byte: (fixed bytes that follow, size of a length field, children per count).

    A str, bin or ext has a length field of 1, 2 or 4 bytes (an ext also a type byte, counted as
    fixed); an array has 1 child per count and a map 2, with the count in the first byte's low
    bits or in the length field. 0xc1 is never used: (-1, 0, 0).
    """
    table = [(0, 0, 0)] * 256  # fixints, nil, false, true
    table[0xC1] = (-1, 0, 0)
    for first in range(0x80, 0x90):
        table[first] = (0, 0, 2)  # fixmap
    for first in range(0x90, 0xA0):
        table[first] = (0, 0, 1)  # fixarray
    for first in range(0xA0, 0xC0):
        table[first] = (first & 0x1F, 0, 0)  # fixstr
    for base in (0xCC, 0xD0):  # uint / int 8, 16, 32, 64
        for offset, size in enumerate((1, 2, 4, 8)):
            table[base + offset] = (size, 0, 0)
    table[0xCA], table[0xCB] = (4, 0, 0), (8, 0, 0)  # float 32, 64
    for offset, size in enumerate((1, 2, 4, 8, 16)):
        table[0xD4 + offset] = (1 + size, 0, 0)  # fixext: type byte + data
    for offset, length_size in enumerate((1, 2, 4)):
        table[0xC4 + offset] = (0, length_size, 0)  # bin 8/16/32
        table[0xC7 + offset] = (1, length_size, 0)  # ext 8/16/32
        table[0xD9 + offset] = (0, length_size, 0)  # str 8/16/32
    table[0xDC], table[0xDD] = (0, 2, 1), (0, 4, 1)  # array 16/32
    table[0xDE], table[0xDF] = (0, 2, 2), (0, 4, 2)  # map 16/32
    return table


_LAYOUT: Final = _layouts()
_MAPS: Final = frozenset({*range(0x80, 0x90), 0xDE, 0xDF})
_STRS: Final = frozenset({*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB})
_INTS: Final = {
    0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"
}  # fmt: skip


class _Msgpack:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.steps = 0

    def head(self, pos: int) -> tuple[int, int, int]:
        """(where this element's data starts, where it ends, children that follow it)."""
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise _GiveUpError
        first = self.data[pos]
        fixed, length_size, per_count = _LAYOUT[first]
        if fixed < 0:
            raise _GiveUpError
        start = pos + 1 + length_size
        length = int.from_bytes(self.data[pos + 1 : start], "big")
        if start > len(self.data):
            raise _GiveUpError
        if per_count:
            return start, start, (length if length_size else first & 0x0F) * per_count
        end = start + fixed + length
        if end > len(self.data):
            raise _GiveUpError
        return start, end, 0

    def skip(self, pos: int) -> int:
        """Where the element at ``pos`` ends, nested elements included."""
        pending = [1]  # elements still to read at each open level
        while pending:
            if not pending[-1]:
                pending.pop()
                continue
            pending[-1] -= 1
            _, pos, children = self.head(pos)
            if children:
                if len(pending) > MAX_DEPTH:
                    raise _GiveUpError
                pending.append(children)
        return pos

    def version(self) -> int | None:
        if self.data[0] not in _MAPS:
            return None
        _, pos, children = self.head(0)
        for _ in range(children // 2):
            start, end, _ = self.head(pos)
            if self.data[pos] in _STRS and self.data[start:end] == b"v":
                return self.integer(end)
            pos = self.skip(self.skip(pos))  # the key, then its value
        return None

    def integer(self, pos: int) -> int | None:
        first = self.data[pos]
        if first < 0x80:
            return first
        if first >= 0xE0:
            return first - 0x100
        fmt = _INTS.get(first)
        if fmt is None:
            return None
        (value,) = struct.unpack_from(fmt, self.data, pos + 1)
        return int(value)


def msgpack_version(data: bytes) -> int | None:
    """The integer ``v`` of a MessagePack top-level map, or None if not found cheaply."""
    try:
        return _Msgpack(data).version()
    except (_GiveUpError, IndexError, struct.error):
        return None


# -- JSON ----------------------------------------------------------------------------------------
# Possessive quantifiers: a 2 MB string or number is matched without any backtracking state.
_WS: Final = re.compile(rb"[ \t\r\n]*+")
_STRING: Final = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_ATOM: Final = re.compile(rb"[^ \t\r\n\"\[\]{}:,]++")
_INTEGER: Final = re.compile(rb"-?(?:0|[1-9][0-9]{0,18})(?=[ \t\r\n]*+[,}])")


class _Json:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.steps = 0

    def ws(self, pos: int) -> int:
        match = _WS.match(self.data, pos)
        return match.end() if match else pos

    def expect(self, pos: int, char: bytes) -> int:
        pos = self.ws(pos)
        if self.data[pos : pos + 1] != char:
            raise _GiveUpError
        return pos + 1

    def skip(self, pos: int) -> int:
        depth = 0
        while True:
            self.steps += 1
            if self.steps > MAX_STEPS:
                raise _GiveUpError
            pos = self.ws(pos)
            char = self.data[pos : pos + 1]
            if char in (b"[", b"{"):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _GiveUpError
                pos += 1
                continue
            if char in (b"]", b"}"):
                depth -= 1
                pos += 1
            elif char in (b",", b":") and depth:
                pos += 1
                continue
            else:
                match = (_STRING if char == b'"' else _ATOM).match(self.data, pos)
                if match is None:
                    raise _GiveUpError
                pos = match.end()
            if depth <= 0:
                if depth < 0:
                    raise _GiveUpError
                return pos

    def version(self) -> int | None:
        pos = self.expect(0, b"{")
        while True:
            pos = self.ws(pos)
            match = _STRING.match(self.data, pos)
            if match is None:
                return None
            key = msgspec.json.decode(match.group(), type=str)  # a flat string: no recursion
            pos = self.expect(match.end(), b":")
            pos = self.ws(pos)
            if key == "v":
                number = _INTEGER.match(self.data, pos)
                return int(number.group()) if number else None
            pos = self.ws(self.skip(pos))
            if self.data[pos : pos + 1] != b",":
                return None
            pos += 1


def json_version(data: bytes) -> int | None:
    """The integer ``v`` of a JSON top-level object, or None if not found cheaply."""
    try:
        return _Json(data).version()
    except (_GiveUpError, msgspec.DecodeError, IndexError):
        return None
