"""Writing model-file archives byte by byte, for tests of the loader: local headers, central
directory and ZIP64 extras by hand, so a member can declare any .npy shape and dtype, the zip
directory any size, and the data can be a deflate stream that inflates to far more than either
declares; and safetensors files, their JSON header as any dict or text and any declared length."""

from __future__ import annotations

import bz2
import json
import struct
import zlib

import numpy

MiB = 1 << 20


def npy_header(descr: str, shape, fortran: bool = False, version: int = 1) -> bytes:
    text = "{'descr': %r, 'fortran_order': %r, 'shape': %r, }" % (descr, fortran, tuple(shape))
    return raw_header(text, version)


def raw_header(text: str, version: int = 1) -> bytes:
    prefix = 6 + 2 + (2 if version == 1 else 4)
    text = text + " " * ((-(prefix + len(text) + 1)) % 64) + "\n"
    size = struct.pack("<H" if version == 1 else "<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + size + text.encode("latin-1")


def npy(a: numpy.ndarray) -> bytes:
    return npy_header(a.dtype.str, a.shape) + numpy.ascontiguousarray(a).tobytes()


def _zeros_stream(n: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = bytes(MiB)
    return b"".join(c.compress(block) for _ in range(n // MiB)) + c.flush()


BOMB_BYTES = 256 * MiB
BOMB = _zeros_stream(BOMB_BYTES)  # raw deflate: 256 MiB of zeros in about 250 KB


class Member:
    """One zip entry: ``data`` is what is stored (already compressed for method 8/12), and
    ``size`` the uncompressed size the directory declares."""

    def __init__(self, name: str, plain: bytes, method: int = 0):
        self.name, self.method = name, method
        self.size, self.crc = len(plain), zlib.crc32(plain)
        if method == 8:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            self.data = c.compress(plain) + c.flush()
        elif method == 12:
            self.data = bz2.compress(plain)
        else:
            self.data = plain

    @classmethod
    def bomb(cls, name: str, head: bytes, size: int | None = None):
        """``head`` then 256 MiB of zeros, deflated; the directory declares ``size`` (by default
        all of it) and the checksum of what that many bytes would be."""
        m = cls(name, b"")
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        m.data = c.compress(head) + c.flush(zlib.Z_SYNC_FLUSH) + BOMB  # two raw streams, one inflate
        m.method = 8
        m.size = len(head) + BOMB_BYTES if size is None else size
        declared = min(m.size, len(head) + BOMB_BYTES) - len(head)
        m.crc = zlib.crc32(bytes(max(0, min(declared, 8 * MiB))), zlib.crc32(head[: m.size]))
        return m


def zip_bytes(members: list[Member]) -> bytes:
    out, central = bytearray(), bytearray()
    for m in members:
        name = m.name.encode("utf-8")
        m.size = min(m.size, 2**64 - 1)
        big = m.size >= 0xFFFFFFFF or len(m.data) >= 0xFFFFFFFF
        sizes = (0xFFFFFFFF, 0xFFFFFFFF) if big else (len(m.data), m.size)
        extra = struct.pack("<HHQQ", 1, 16, m.size, len(m.data)) if big else b""
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, 0, m.method, 0, 0x21, m.crc, *sizes, len(name), len(extra))
        out += name + extra + m.data
        central += struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 45, 3, 45, 0, 0, m.method, 0, 0x21, m.crc,
                               *sizes, len(name), len(extra), 0, 0, 0, 0, offset)
        central += name + extra
    start = len(out)
    out += central
    out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), start, 0)
    return bytes(out)


# ----- safetensors files -----

ST_DTYPES = {"float16": "F16", "float32": "F32", "float64": "F64"}


def st_layout(tensors: dict, metadata: dict | None = None) -> tuple[dict, bytes]:
    """(header, data) of a safetensors file holding ``tensors`` (name -> float array) in order:
    the header as a dict (``__metadata__`` first, then each tensor's dtype, shape and
    data_offsets), to be edited before :func:`st_bytes` packs it."""
    header = {"__metadata__": metadata} if metadata is not None else {}
    data = bytearray()
    for name, a in tensors.items():
        a = numpy.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        header[name] = {"dtype": ST_DTYPES[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [len(data), len(data) + a.nbytes]}
        data += a.tobytes()
    return header, bytes(data)


def st_bytes(header, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file: the header (a dict, or its JSON text as str or bytes), its length in
    8 little-endian bytes (``length`` to declare another), then the data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    return struct.pack("<Q", len(header) if length is None else length % 2**64) + header + data
