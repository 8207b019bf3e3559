"""The CPU speed engine: the reference operations (nn/ops.py) with what it accelerates.

Importing this package points numba's on-disk cache of compiled functions at a folder named
for a digest of every engine source file (unless NUMBA_CACHE_DIR is set). numba checks only
the file that defines a function when it reuses its cache, but loops.py's compiled loops
inline kernels.py's step kernels: an edit to kernels.py once left loops.py's stale compiled
code running (and a test against it passing). Keyed by all the sources, an edit to any of
them starts a fresh cache, and the first run after it compiles again (a few seconds), which
the commands say (:func:`compiles_first`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def source_digest() -> str:
    """A digest of every engine source file (16 hex digits)."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(here.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_base() -> Path:
    """charnn's folder for what it caches on disk (compiled code, plans)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "charnn"


def _cache_dir() -> Path:
    return cache_base() / f"numba-{source_digest()}"


if not os.environ.get("NUMBA_CACHE_DIR"):
    try:
        from numba.core import config as _numba_config

        _numba_config.CACHE_DIR = str(_cache_dir())
    except ImportError:  # numba missing: the engine runs the reference
        pass


def compiles_first(settings=None, folder=None) -> bool:
    """Whether this process will compile the engine's kernels before its first computation (a
    few seconds) instead of loading them from numba's cache: the compiled kernels are on (in
    ``settings``, default the process's) and numba's cache folder (this digest's, or
    NUMBA_CACHE_DIR) does not exist yet or holds no file. A folder that holds some kernels but not
    the ones a command needs (sample's after score's) reads as warm: the cost is then smaller.
    ``folder``: the cache folder to look at instead of numba's (for tests)."""
    if settings is None:
        from .settings import default_settings

        settings = default_settings()
    if not settings.kernels:
        return False
    try:
        from numba.core import config as numba_config
    except ImportError:
        return False
    folder = folder or numba_config.CACHE_DIR
    if not folder:  # numba caches beside the sources: nothing to look at cheaply
        return False
    # numba makes its folders when the kernels' module is imported, so "empty" is: no file.
    try:
        return not any(p.is_file() for p in Path(folder).rglob("*"))
    except OSError:
        return False
