"""The `charnn` command (and `python -m charnn`): the click group of cli.py, imported inside a
guard, so Ctrl-C during the imports (about half a second of NumPy, numba and rich) ends as it
does later: one line on stderr and status 130, never a traceback."""

from . import interrupt


def main():
    interrupt.install()  # (a Ctrl-C swallowed during the imports is not lost: interrupt.py)
    try:
        from .cli import cli

        interrupt.check()
        cli(prog_name="charnn")
    except Exception:
        # A Ctrl-C can also turn into another error on its way out: Python 3.11 reports a
        # KeyboardInterrupt raised while a class is made (numba's imports make many) as
        # "RuntimeError: Error calling __set_name__". After a Ctrl-C, any error is the
        # interruption's.
        if not interrupt.seen():
            raise
        interrupt.exit_interrupted()
    except KeyboardInterrupt:
        interrupt.exit_interrupted()


if __name__ == "__main__":
    main()
