"""The npz side of a model file: a zip of ``.npy`` members, read member by member without
trusting either the zip directory or the ``.npy`` headers.

:class:`CappedFile` fails a read of the zip directory larger than its cap (zipfile reads the
whole directory in one call, whatever size the end record claims); :func:`read_header` reads a
member's ``.npy`` header without its data, refuses pickled objects, and checks that the
header's byte count and the zip directory's agree; :func:`read_array` then reads exactly that
many bytes, a chunk at a time. Which members a model file holds, and their shapes, are
checkpoint.py's to say.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from dataclasses import dataclass

import numpy
from numpy.lib import format as npy_format

from . import bounds

# A 2-layer LSTM's last.npz has 31 members and a directory of about 2 KB.
MAX_DIRECTORY = 1 << 20  # bytes of zip central directory (about 15,000 members)
MAX_HEADER = 4096  # bytes of one .npy header (NumPy writes 128)
_CHUNK = 1 << 20  # bytes read (and inflated) at a time
_NPY_MAGIC = b"\x93NUMPY"


class NpzFileError(ValueError):
    """A member cannot be read as a charnn model file's array; the message has no path."""


class TooLarge(Exception):
    """A read asked for more than a CappedFile's cap."""


class CappedFile(io.FileIO):
    """A file whose reads fail while ``cap`` is set and a read asks for more: zipfile reads the
    whole central directory in one call, whatever size the end record claims."""

    cap = None

    def read(self, n=-1):
        if self.cap is not None:
            want = n if n is not None and n >= 0 else os.fstat(self.fileno()).st_size - self.tell()
            if want > self.cap:
                raise TooLarge
        return super().read(n)


@dataclass
class Member:
    info: zipfile.ZipInfo
    dtype: numpy.dtype
    shape: tuple
    fortran: bool
    offset: int  # bytes of magic and header before the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(z: zipfile.ZipFile, name: str, info: zipfile.ZipInfo) -> Member:
    """The .npy header of a member, read without reading its data."""
    with z.open(info) as f:
        start = f.read(len(_NPY_MAGIC) + 2)
        if len(start) < len(_NPY_MAGIC) + 2 or not start.startswith(_NPY_MAGIC):
            raise NpzFileError(f"not a valid model file (member {name!r} is not a NumPy array)")
        major = start[-2]
        if major not in (1, 2):
            raise NpzFileError(f"member {name!r} is a .npy file of version {major}, which charnn does not read")
        size_bytes = f.read(2 if major == 1 else 4)
        length = int.from_bytes(size_bytes, "little")
        if len(size_bytes) < (2 if major == 1 else 4) or length > MAX_HEADER:
            raise NpzFileError(f"member {name!r} has a malformed .npy header")
        text = f.read(length)
    if len(text) < length:
        raise NpzFileError(f"member {name!r} is truncated")
    fp = io.BytesIO(start + size_bytes + text)
    npy_format.read_magic(fp)
    reader = npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
    try:
        shape, fortran, dtype = reader(fp, max_header_size=MAX_HEADER)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, OverflowError) as e:
        raise NpzFileError(f"member {name!r} has a malformed .npy header ({bounds.one_line(e)})") from None
    if dtype.hasobject:
        raise NpzFileError("refused: the file holds pickled Python objects, which charnn never loads")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise NpzFileError(f"member {name!r} declares a negative shape {shape}")
    m = Member(info, dtype, shape, fortran, len(start) + len(size_bytes) + length)
    if m.offset + m.nbytes != info.file_size:
        # What the header declares and what the zip directory declares must agree, so the
        # data read below is exactly the size that was checked.
        raise NpzFileError(f"member {name!r} is malformed (its header declares {m.nbytes} bytes of data, "
                           f"the zip directory {info.file_size - m.offset})")
    return m


def read_array(z: zipfile.ZipFile, m: Member) -> numpy.ndarray:
    """The member's data: exactly the checked byte count, read a chunk at a time (the zip's
    checksum is verified as the last chunk arrives)."""
    a = numpy.empty(m.shape[::-1] if m.fortran else m.shape, dtype=m.dtype)
    view = memoryview(a.reshape(-1).view(numpy.uint8)) if a.size else memoryview(b"")
    with z.open(m.info) as f:
        f.read(m.offset)
        pos = 0
        while pos < m.nbytes:
            chunk = f.read(min(_CHUNK, m.nbytes - pos))
            if not chunk:
                raise EOFError(f"member {m.info.filename!r} ends after {pos} of {m.nbytes} bytes")
            view[pos: pos + len(chunk)] = chunk
            pos += len(chunk)
        f.read(1)  # at the end: makes zipfile check the CRC even for an empty array
    return a.T if m.fortran else a
