"""MQTT packet encoding shared by the harness scripts (bench_console.py,
soak.py, chaos.py): each speaks MQTT over a plain socket with the standard
library only, so a CI machine needs no client package."""

import struct


def mqtt_str(s):
    """A UTF-8 string (or bytes) with its two-byte length."""
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def varint(n):
    """MQTT's variable byte integer."""
    out = bytearray()
    while True:
        d, n = n % 128, n // 128
        out.append(d | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first, body):
    """A whole packet: the first byte, the remaining length, the body."""
    return bytes([first]) + varint(len(body)) + body
