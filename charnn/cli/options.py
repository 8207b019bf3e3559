"""Option types and callbacks that several commands share: cells from the registry, device
and dtype, comma-separated integers, finite floats, sizes of memory, and text typed on a
command line (its escapes, and bytes that are not text)."""

from __future__ import annotations

import codecs
import math
import re

import click

from ..backend import DEVICES, DTYPES
from ..nn import cells

SEQ_LEN, BATCH_SIZE = 50, 32  # train's defaults (info --plan's too)


class RegistryChoice(click.Choice):
    """A choice read from the cell registry (nn/cells.py) when a command line is parsed, so a
    cell registered after import counts too; ``extra`` adds choices such as "all"."""

    def __init__(self, extra=()):
        self.extra = tuple(extra)
        super().__init__((), case_sensitive=True)

    def read(self) -> tuple:
        raise NotImplementedError

    @property
    def choices(self):
        return self.read() + self.extra

    @choices.setter
    def choices(self, value):
        pass


class CellChoice(RegistryChoice):
    """A choice among the registered cells."""

    def read(self) -> tuple:
        return tuple(cells.CELLS)


class ActivationChoice(RegistryChoice):
    """A choice among the activations some registered cell accepts."""

    def read(self) -> tuple:
        return cells.activations()


def rate(v: float) -> str:
    """A learning rate as help texts write it: 3e-3, 0.1, 1."""
    return (f"{v:.0e}" if v < 0.01 else f"{v:g}").replace("e-0", "e-")


def device_options(f):
    f = click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
                     help="Float type of parameters and activations.")(f)
    f = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                     help="auto: the GPU when CuPy sees one, else the CPU.")(f)
    return f


def int_list(ctx, param, value):
    """Parse "1,3" into [1, 3]."""
    if value is None:
        return None
    try:
        out = [int(v) for v in str(value).split(",") if v.strip() != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out:
        raise click.BadParameter("expected at least one value")
    return out


def finite(ctx, param, value):
    """Refuse nan and inf, which float() accepts."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


# Python's string escapes; any other backslash stays as typed ("\d" is a backslash and a d).
ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|N\{[^}]*\}|[0-7]{1,3}|[\\'\"abfnrtv]|[xuUN]|$)")


def unescape(ctx, param, value):
    """Let "\\n" and "\\t" typed on a command line mean a newline and a tab (Python's escapes,
    decoded one by one so other characters stay as typed); a malformed escape ("\\" at the end,
    "\\x4") is a usage error, as is text that is not valid Unicode (a lone surrogate)."""
    if value is None:
        return None

    def one(m):
        seq = m.group(0)
        if seq in ("\\", "\\x", "\\u", "\\U", "\\N"):
            raise click.BadParameter(f"{value!r}: malformed escape {seq!r} (write \\\\ for a backslash)")
        try:
            return codecs.decode(seq, "unicode_escape")
        except UnicodeDecodeError as e:
            raise click.BadParameter(f"{value!r}: malformed escape {seq!r} ({e.reason})") from None

    return valid_text(ctx, param, ESCAPE.sub(one, value) if "\\" in value else value)


def valid_text(ctx, param, value):
    """Refuse text that is not valid Unicode: a lone surrogate, or bytes of the command line
    that were not UTF-8 (Python keeps them as lone surrogates, which no file or image can hold)."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise click.BadParameter(f"{ascii(value)} is not valid text (a lone surrogate or undecodable bytes)") from None
    return value


class MemorySize(click.ParamType):
    """A size such as 8G, 500M or 2GiB, in bytes (memory.parse_size)."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        from ..memory import parse_size

        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def max_memory_option(f):
    """--max-memory SIZE, for every command that checks its memory estimate (memory.py)."""
    return click.option("--max-memory", type=MemorySize(), default=None,
                        help="The most memory the command may use, e.g. 8G or 500M; options whose estimate "
                             "passes it are refused before anything is allocated [the memory available now].")(f)
