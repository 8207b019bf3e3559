"""The settings that choose charnn's compute paths, read once and passed down.

Every choice between the reference maths and the CPU engine, and between the engine's own
paths, is made from one :class:`Settings` object. It is built once, from the ``CHARNN_*``
environment variables (:meth:`Settings.from_env`) or by the caller (tests build their own),
and handed to the engine with the backend (``backend.get_backend(..., settings=)``); nothing
reads the environment in the middle of the maths.

    CHARNN_THREADS   threads for charnn's own parallel work (the batch and row splits, the
                     optimizer, the gradient norm); default min(2, cores); 1 turns them off
    CHARNN_KERNELS   "numpy" turns the compiled (numba) kernels off: every layer, head and
                     optimizer runs the reference array code
    CHARNN_ROWSPLIT  "0" turns off the compiled LSTM time loops (one-core and row split),
                     which call the BLAS's sgemm from inside numba
    CHARNN_PACKED    "0" turns off the packed AVX-512 products inside those loops
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from ..backend import BackendError


class SettingsError(BackendError, ValueError):
    """A CHARNN_* variable holds a value charnn cannot use (a BackendError: the commands report
    it as one line, as they report a device that cannot be used)."""


@dataclass(frozen=True)
class Settings:
    threads: int = 2
    kernels: bool = True
    rowsplit: bool = True
    packed: bool = True

    def __post_init__(self):
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise SettingsError(f"threads must be a positive integer, not {self.threads!r}")

    @classmethod
    def from_env(cls, env=None) -> "Settings":
        """The settings the ``CHARNN_*`` variables of ``env`` (default os.environ) ask for."""
        env = os.environ if env is None else env
        raw = env.get("CHARNN_THREADS")
        if raw is None:
            threads = min(2, os.cpu_count() or 1)
        else:
            try:
                threads = int(raw)
            except ValueError:
                raise SettingsError(f"CHARNN_THREADS must be a positive integer, not {raw!r}") from None
            if threads < 1:
                raise SettingsError(f"CHARNN_THREADS must be a positive integer, not {raw!r}")
        return cls(threads=threads,
                   kernels=env.get("CHARNN_KERNELS", "numba") != "numpy",
                   rowsplit=env.get("CHARNN_ROWSPLIT", "1") != "0",
                   packed=env.get("CHARNN_PACKED", "1") != "0")

    @classmethod
    def reference(cls) -> "Settings":
        """Everything off: one thread, no compiled code (the plain array maths)."""
        return cls(threads=1, kernels=False, rowsplit=False, packed=False)


@functools.lru_cache(maxsize=1)
def default_settings() -> Settings:
    """The process's settings from its environment, read on first use."""
    return Settings.from_env()
