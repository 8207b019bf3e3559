"""What the commands share: one-line failures, finite floats, regular files, text encodings,
strict JSON lines, and a stdout console that ends quietly on a closed pipe."""

from __future__ import annotations

import codecs
import json
import math

import click
from rich.console import Console

from ..io.fileio import file_kind


def fail(message: str):
    raise click.ClickException(message)


class Finite(click.FloatRange):
    """click.FloatRange that also refuses NaN and infinities (NaN passes every comparison)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def regular_file(path, what: str = "file"):
    """Refuse (exit 1) a path that is a FIFO, socket or device: opening one could wait forever."""
    kind = file_kind(path)
    if kind:
        fail(f"{path}: is {kind}, not a regular {what}")


def text_encoding(ctx, param, value):
    """An --encoding that names a text codec (not rot13 or base64, which codecs also knows)."""
    if value is None:
        return None
    try:
        info = codecs.lookup(value)
    except (LookupError, TypeError, ValueError):
        raise click.BadParameter(f"unknown encoding {value!r}") from None
    if not getattr(info, "_is_text_encoding", True):
        raise click.BadParameter(f"{value!r} is not a text encoding")
    return value


COMPILING = "charnn: compiling kernels (first run only)..."


def compile_notice(device: str, quiet: bool = False, console: Console | None = None, cold: bool | None = None) -> bool:
    """Say on stderr that the CPU engine compiles its kernels first (a few seconds of silence
    otherwise), when it will (``cold``, default engine.compiles_first()) and ``device`` is
    "cpu"; not under ``quiet``, nor when stderr is not a terminal. Returns whether it said it."""
    console = console or Console(stderr=True)
    if quiet or device != "cpu" or not console.is_terminal:
        return False
    if cold is None:
        from ..engine import compiles_first

        cold = compiles_first()
    if not cold:
        return False
    console.print(COMPILING, highlight=False, markup=False)
    return True


def json_line(obj) -> str:
    """One JSON object as a line; floats that are not finite (JSON has no Infinity or NaN)
    become null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(obj), ensure_ascii=False, allow_nan=False) + "\n"


class StdoutConsole(Console):
    """A rich Console on stdout whose broken pipe ends the command quietly with status 0 (rich's
    own handler exits 1), as Group does for plain writes."""

    def on_broken_pipe(self):
        self.quiet = True
        raise BrokenPipeError
