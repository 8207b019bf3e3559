"""Ctrl-C on the command line: a SIGINT is never lost.

Python's own SIGINT handler raises KeyboardInterrupt in whatever Python code the main thread
runs next, and some code cannot pass it on: a weakref callback or a ``__del__`` reports it as
"Exception ignored in ..." and carries on. importlib's module locks use weakref callbacks, so a
Ctrl-C during the imports could land in one and vanish; the command then ran on as if never
interrupted (2026-12-06: `charnn train` interrupted 0.2-0.4 s after its start kept training
in 5 of 900 runs; 2 of the 3 caught in the act were in importlib's callback, the third in
``abc.register`` inside NumPy's imports, where something else swallowed it). And Python 3.11
turns one raised while a class is made into "RuntimeError: Error calling __set_name__", which
``charnn/__main__.py`` reports as the interruption once a Ctrl-C was seen.

So the command line (``charnn/__main__.py``, before its imports) calls :func:`install`:

- its SIGINT handler notes the interrupt (:func:`seen`) before raising KeyboardInterrupt;
- a ``sys.unraisablehook`` raises a KeyboardInterrupt that was swallowed again, from a profile
  function, at the first call or return of other code once the code that swallowed it has
  returned, without the "Exception ignored" report (other unraisable exceptions go to the
  previous hook);
- a ``sys.excepthook`` prints nothing for a KeyboardInterrupt: code that catches one and
  prints it with ``PyErr_Print`` before carrying on (one such, during the imports, printed a
  two-frame traceback above the command's own "Error: interrupted") shows no traceback;
- :func:`check` raises KeyboardInterrupt where one was seen but swallowed some other way; it
  runs where the interrupt would otherwise go unnoticed: after the command line's imports,
  after a command's module is imported, and where training puts in its own handler.

Only stdlib here: it is imported before anything heavy. The library API installs nothing.
"""

from __future__ import annotations

import signal
import sys

_seen = False
_previous_hook = None
_previous_excepthook = None


def _on_sigint(signum, frame):
    global _seen
    _seen = True
    raise KeyboardInterrupt


def _unraisable(unraisable):
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        # Raised again at the first call or return of other code than this hook, once the code
        # that swallowed it has given control back (raised here, or by a signal handled here,
        # it would be swallowed again).
        hook_code = _unraisable.__code__
        previous = sys.getprofile()

        def later(frame, event, arg):
            if frame.f_code is hook_code:
                return
            sys.setprofile(previous)
            raise KeyboardInterrupt

        sys.setprofile(later)
        return
    (_previous_hook or sys.__unraisablehook__)(unraisable)


def _excepthook(exc_type, value, tb):
    if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
        return  # (the command line says "Error: interrupted" itself)
    (_previous_excepthook or sys.__excepthook__)(exc_type, value, tb)


def install():
    """Put in the command line's SIGINT handler and hooks (see the module docstring)."""
    global _previous_hook, _previous_excepthook
    if sys.unraisablehook is not _unraisable:
        _previous_hook = sys.unraisablehook
        sys.unraisablehook = _unraisable
    if sys.excepthook is not _excepthook:
        _previous_excepthook = sys.excepthook
        sys.excepthook = _excepthook
    signal.signal(signal.SIGINT, _on_sigint)


def seen() -> bool:
    """Whether a Ctrl-C reached the command line's handler."""
    return _seen


def check():
    """Raise KeyboardInterrupt if a Ctrl-C was seen (and so was swallowed, since the process
    is still here)."""
    if _seen:
        raise KeyboardInterrupt


def exit_interrupted():
    """Ctrl-C outside training's loop: one line on stderr and status 130 (128 + SIGINT), as
    shells report it (a stderr that cannot be written to is left unsaid)."""
    try:
        sys.stderr.write("Error: interrupted\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - the status still says it
        pass
    sys.exit(130)
