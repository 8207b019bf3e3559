"""The `charnn` command (and `python -m charnn`): the click group of cli.py, imported inside a
guard, so Ctrl-C during the imports (about half a second of NumPy, numba and rich) ends as it
does later: one line on stderr and status 130, never a traceback."""

import sys


def main():
    try:
        from .cli import cli
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        sys.exit(130)
    cli(prog_name="charnn")


if __name__ == "__main__":
    main()
