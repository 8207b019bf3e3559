"""``python -m charnn.cli``: the command line, as ``python -m charnn``."""

from charnn.__main__ import main

main()
