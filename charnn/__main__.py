"""``python -m charnn``: the command line."""

from .cli import main

main()
