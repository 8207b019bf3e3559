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
    CHARNN_PLAN      "0" turns the planner off: the rules below choose every path

The planner (plan.py) times the engine's candidate paths for a piece of work the first time
it meets its shape and keeps the fastest (cached on disk). It chooses what the environment
leaves free: the split of the work over threads (one thread, the batch split or the row
split) where CHARNN_THREADS is unset, and the packed products where CHARNN_PACKED is unset.
A variable that is set forces its knob; with every knob forced, or CHARNN_PLAN=0, the
engine's rules decide as they did before it (parallel.rule_path). Settings built by a caller
plan nothing unless given ``plan`` (tests build fixed ones).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from ..backend import BackendError


class SettingsError(BackendError, ValueError):
    """A CHARNN_* variable holds a value charnn cannot use (a BackendError: the commands report
    it as one line, as they report a device that cannot be used)."""


KNOBS = ("split", "packed")  # what the planner may choose, each where the environment leaves it free


@dataclass(frozen=True)
class Settings:
    """``threads``: the most threads charnn's own parallel work may use; ``kernels``,
    ``rowsplit``, ``packed``: whether those paths may run; ``plan``: the knobs of KNOBS the
    planner measures (empty: the rules choose)."""

    threads: int = 2
    kernels: bool = True
    rowsplit: bool = True
    packed: bool = True
    plan: frozenset = frozenset()

    def __post_init__(self):
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise SettingsError(f"threads must be a positive integer, not {self.threads!r}")
        object.__setattr__(self, "plan", frozenset(self.plan))
        if not self.plan <= set(KNOBS):
            raise SettingsError(f"plan may hold {', '.join(KNOBS)}, not {sorted(self.plan - set(KNOBS))}")

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
        planning = env.get("CHARNN_PLAN", "1")
        if planning not in ("0", "1"):
            raise SettingsError(f"CHARNN_PLAN must be 0 (the rules) or 1 (measure), not {planning!r}")
        free = set()
        if planning == "1":
            free = {knob for knob, name in (("split", "CHARNN_THREADS"), ("packed", "CHARNN_PACKED")) if name not in env}
        return cls(threads=threads,
                   kernels=env.get("CHARNN_KERNELS", "numba") != "numpy",
                   rowsplit=env.get("CHARNN_ROWSPLIT", "1") != "0",
                   packed=env.get("CHARNN_PACKED", "1") != "0",
                   plan=frozenset(free))

    @classmethod
    def reference(cls) -> "Settings":
        """Everything off: one thread, no compiled code (the plain array maths)."""
        return cls(threads=1, kernels=False, rowsplit=False, packed=False)


@functools.lru_cache(maxsize=1)
def default_settings() -> Settings:
    """The process's settings from its environment, read on first use."""
    return Settings.from_env()
