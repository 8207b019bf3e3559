"""``--config FILE``: option values from a TOML file, as the command's defaults."""

from __future__ import annotations

import sys

import click

from ..io.fileio import file_kind
from .options import MemorySize


def load_config(ctx, param, value):
    """Read a TOML file into the command's defaults (click's default_map), so the command line
    still overrides each value. Keys are option names, with dashes or underscores. A value must
    be of the option's kind (16.5 or true is not an integer); click then checks its range."""
    if not value:
        return value
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    kind = file_kind(value)
    if kind:
        raise click.BadParameter(f"{value}: is {kind}, not a regular file")
    try:
        with open(value, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise click.BadParameter(f"{value}: cannot read: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"{value}: not valid UTF-8 at byte {e.start} (TOML files are UTF-8)") from None
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{value}: not valid TOML: {e}") from None
    except RecursionError:  # the parser recurses into each nested array or table
        raise click.BadParameter(f"{value}: not valid TOML for options: arrays or tables nested too deeply "
                                 f"to read") from None
    table = data.get(ctx.info_name, data)
    if not isinstance(table, dict):
        raise click.BadParameter(f"{value}: [{ctx.info_name}] must be a table")
    names = {}
    for p in ctx.command.params:
        for opt in p.opts:
            names[opt.lstrip("-").replace("-", "_")] = p.name
        names[p.name] = p.name
    defaults = {}
    for key, v in table.items():
        name = names.get(str(key).replace("-", "_"))
        if name is None or name in ("config", "resume"):
            raise click.BadParameter(f"{value}: unknown option {key!r}")
        param_of = next(p for p in ctx.command.params if p.name == name)
        wanted = _config_kind(param_of)
        if not _is_kind(v, wanted):
            raise click.BadParameter(f"{value}: {key} must be {wanted}, not {_toml_kind(v)} ({v!r})")
        defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _config_kind(param) -> str:
    if getattr(param, "is_flag", False):
        return "true or false"
    if isinstance(param.type, (click.types.IntParamType, click.IntRange)):
        return "an integer"
    if isinstance(param.type, (click.types.FloatParamType, click.FloatRange)):
        return "a number"
    if isinstance(param.type, MemorySize):
        return 'a size in quotes (e.g. "8G")'
    return "a string"


def _is_kind(v, wanted: str) -> bool:
    if wanted == "true or false":
        return isinstance(v, bool)
    if wanted == "an integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if wanted == "a number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, str)


def _toml_kind(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)
