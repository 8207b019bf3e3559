"""The command group: commands imported when used, a broken pipe ending quietly, Ctrl-C as one
line and status 130, and an MPI job's other ranks kept quiet."""

from __future__ import annotations

import importlib
import sys

import click

from .. import interrupt


class Group(click.Group):
    """Turns a broken pipe on stdout into a quiet exit, as Unix tools do, Ctrl-C into one
    line and status 130 (train's own handler saves a checkpoint first), and an allocation that
    fails into one line and status 1.

    ``lazy`` maps a command's name to its module in this package, which defines
    ``<name>_command``: the module is imported when the command runs (or help lists it), so a
    command pays only for its own imports."""

    def __init__(self, *args, lazy: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None and name in self.lazy:
            module = importlib.import_module(f"{__package__}.{self.lazy[name]}")
            interrupt.check()  # (a Ctrl-C its imports swallowed ends the command here)
            command = getattr(module, f"{name.replace('-', '_')}_command")
            self.add_command(command, name)
        return command

    def invoke(self, ctx):
        # Caught here, inside click's main: click's own handlers would exit with status 1
        # ("Aborted!" for Ctrl-C).
        try:
            rv = super().invoke(ctx)
            sys.stdout.flush()  # a broken pipe here, not at exit (where Python reports it and exits 120)
            return rv
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt:
            interrupted()
        except MemoryError as e:
            # The commands estimate their memory before allocating (memory.py) and refuse what
            # passes the limit; an allocation that fails anyway (the machine's memory taken by
            # others meanwhile) is one line too.
            raise click.ClickException(f"out of memory: {e or 'an allocation failed'}") from None

    def parse_args(self, ctx, args):
        try:  # --help and --version print here, outside invoke
            return super().parse_args(ctx, args)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt:  # click's main would say "Aborted!" and exit 1
            interrupted()

    def main(self, *args, **kwargs):
        try:
            from ..dist import env_rank, env_size  # (imports NumPy: a Ctrl-C can land here too)

            _quiet_float_warnings()
            if env_size() > 1 and env_rank() > 0:
                return self._main_quiet(*args, **kwargs)
            return super().main(*args, **kwargs)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt:
            interrupted()

    def _main_quiet(self, *args, **kwargs):
        """A rank other than 0 of an MPI job (mpiexec -n K charnn train): a command line click
        refuses is refused by every rank alike, and said once, by rank 0."""
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            sys.exit(1)


def _quiet_float_warnings():
    """Overflow in a diverging run is found and said by the commands themselves (training
    checks every loss and saves no non-finite weights); NumPy's RuntimeWarnings about it would
    print source lines above that one-line message. A warnings filter, not numpy.errstate:
    the engine's worker threads do not inherit an errstate. (The command line only: the API
    keeps NumPy's warnings.)"""
    import warnings

    warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered",
                            RuntimeWarning)


def interrupted():
    """Ctrl-C outside training's loop: one line, status 130 (interrupt.exit_interrupted)."""
    interrupt.exit_interrupted()


def _quiet_broken_pipe():
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    sys.exit(0)
