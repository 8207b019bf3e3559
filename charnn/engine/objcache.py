"""Compiled object code kept on disk between processes, one file per key (packed.py's products).

LLVM takes about 0.1 s to optimise and compile one of packed.py's products, and every process
that scores or trains used to pay it again for each shape (with the check product, 0.4-0.5 s
of a one-line `charnn score`); loading the object code from a file takes about a millisecond.

An entry is found by a key, a JSON-able dict naming everything the code depends on (the
caller's: the shape, the CPU's name and features, the library versions, the source digest).
Its file is named for the key's SHA-256 and holds, in order:

    MAGIC                        one line
    the key as JSON              one line (sorted keys): a file of another key is stale
    SHA-256 of the object code   one line (hex): a file cut short or altered is corrupt
    the object code

A file that cannot be read, is stale or corrupt reads as missing: the caller compiles and
stores again, which replaces it. A store writes a temporary file in the folder and renames it
over the entry (atomic on POSIX), so a reader sees a whole entry or none, and two processes
that race each write a whole file of the same code; a folder that cannot be written leaves
the caller compiling every time, never failing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

MAGIC = b"charnn compiled object 1\n"


def _key_line(key: dict) -> bytes:
    return json.dumps(key, sort_keys=True, separators=(",", ":")).encode() + b"\n"


class ObjectCache:
    """The entries in ``folder`` (made on the first store)."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def path(self, key: dict) -> Path:
        return self.folder / (hashlib.sha256(_key_line(key)).hexdigest()[:32] + ".o")

    def load(self, key: dict) -> bytes | None:
        """The object code stored under ``key``, or None (missing, unreadable, stale, corrupt)."""
        try:
            raw = self.path(key).read_bytes()
        except OSError:
            return None
        head = MAGIC + _key_line(key)
        if not raw.startswith(head):
            return None
        digest, sep, code = raw[len(head):].partition(b"\n")
        if not sep or hashlib.sha256(code).hexdigest().encode() != digest:
            return None
        return code

    def store(self, key: dict, code: bytes) -> bool:
        """Writes the entry (atomically); False where it could not be written."""
        target = self.path(key)
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + _key_line(key) + hashlib.sha256(code).hexdigest().encode() + b"\n" + code)
            os.replace(tmp, target)
            return True
        except OSError:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return False
