"""The CPU speed engine: the reference operations (nn/ops.py) with what it accelerates.

Importing this package points numba's on-disk cache of compiled functions at a folder named
for a digest of every engine source file (unless NUMBA_CACHE_DIR is set). numba checks only
the file that defines a function when it reuses its cache, but loops.py's compiled loops
inline kernels.py's step kernels: an edit to kernels.py once left loops.py's stale compiled
code running (and a test against it passing). Keyed by all the sources, an edit to any of
them starts a fresh cache, and the first run after it compiles again (a few seconds).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _cache_dir() -> Path:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(here.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "charnn"
    return base / f"numba-{digest.hexdigest()[:16]}"


if not os.environ.get("NUMBA_CACHE_DIR"):
    try:
        from numba.core import config as _numba_config

        _numba_config.CACHE_DIR = str(_cache_dir())
    except ImportError:  # numba missing: the engine runs the reference
        pass
