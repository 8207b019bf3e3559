"""``python -m charnn.cli``: the command line."""

from . import main

main()
