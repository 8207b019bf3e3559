"""Atomic file writes: a temporary file in the target's folder, fsynced, renamed over the target.

A crash, a kill or a full disk at any moment leaves either the old file or the new one, never a
torn one; the temporary file (``.NAME.XXXX.tmp``) is removed when the write fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path


def fsync_dir(folder: Path):
    """Make a rename in ``folder`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path):
    """``with atomic_open(path) as f: f.write(...)``: ``path`` appears whole when the block
    ends without an exception, and is untouched otherwise."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes):
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(data)


def file_kind(path) -> str | None:
    """None for a regular file, a directory or a missing path; else what it is ("a FIFO (named
    pipe)", "a socket", ...): open() may wait forever on a FIFO without a writer, and none of
    them can be read twice."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "a special file"


_digests: dict = {}


def sha256_file(path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks. Remembered for the process while the
    file's identity, size and modification time are unchanged: a run checks its corpus's digest
    at several points (resume, the token cache, the checkpoint's metadata), and a corpus of
    several GB would otherwise be read once for each."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    digest = _digests.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = _digests[key] = h.hexdigest()
    return digest
