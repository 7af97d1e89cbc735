"""A unit's data script: the unit's JSON as one gzip member in base64, which the page inflates with
the browser's DecompressionStream. Base64 has no character a <script> could stumble on.

A unit's JSON is a head that changes whenever the unit is re-simulated or re-scored (explanations,
scores, simulations, links) and a tail that its records alone decide (exemplars, statistics, four
fifths of the bytes). The tail is compressed once, by itself, and kept in the records cache
(`view._RecordsCache`). The member holds the head's deflate blocks, ended by a sync flush so that
the next block starts on a byte, then the tail's blocks, and the CRC-32 of the two texts combined:
a valid deflate stream that any inflater reads as the whole text, so a rebuild compresses only the
head. The tail's matches cannot reach into the head, which costs about nothing here (exemplars and
simulations share little).
"""

from __future__ import annotations

import base64
import gzip
import json
import struct
import zlib
from dataclasses import dataclass

from autoexplain.view_data import js_text

# Level 6: level 9 saves 2% of the bytes for 4 times the time, over a whole model's units.
LEVEL = 6
_HEADER = bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 255])  # gzip, deflate, no name, mtime 0, OS unknown
_ONES = 0xFFFFFFFF


@dataclass(frozen=True)
class Tail:
    """The end of a unit's JSON, compressed: a deflate stream of its own (final block last), the
    CRC-32 and the length of its UTF-8 bytes."""

    z: bytes
    crc: int
    size: int


def _encode(text: str) -> bytes:
    return text.encode("utf-8", errors="replace")


def tail(text: str) -> Tail:
    data = _encode(text)
    c = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
    return Tail(c.compress(data) + c.flush(), zlib.crc32(data), len(data))


def _crc_then(crc: int, after: Tail) -> int:
    """The CRC-32 of bytes whose CRC is `crc` followed by the tail's bytes. The CRC register is
    linear: the head's register carried through as many zero bytes as the tail has, plus the
    tail's own CRC (zlib's crc32 inverts the register before and after: hence the XORs)."""
    return (zlib.crc32(bytes(after.size), crc ^ _ONES) ^ _ONES) ^ after.crc


def packed(key: str, head: str, end: Tail) -> bytes:
    """The script that stores the unit whose JSON is `head` then `end`'s text at `window.__data[key]`."""
    data = _encode(head)
    c = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
    member = b"".join((_HEADER, c.compress(data), c.flush(zlib.Z_SYNC_FLUSH), end.z,
                       struct.pack("<II", _crc_then(zlib.crc32(data), end), (len(data) + end.size) & _ONES)))
    return js_text(key, '{"z":"' + base64.b64encode(member).decode("ascii") + '"}').encode("ascii")


def unpacked(text: str) -> dict:
    """The unit a `packed` script holds (for tests and benches)."""
    body = json.loads(text.split("]=", 1)[1].rstrip(";\n"))
    return json.loads(gzip.decompress(base64.b64decode(body["z"])))
