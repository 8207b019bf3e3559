#!/usr/bin/env python3
"""Build corpora/devil.txt, Ambrose Bierce's The Devil's Dictionary, from Debian's ``dict-devil``.

A small corpus (about 0.38 MB) unlike the plays, the Bible and the novels: about a thousand
satirical definitions in alphabetical order (``HEADWORD, n.  Definition...``), many followed by
indented verse quoted from invented poets and a right-aligned attribution. The Debian package
``dict-devil`` 1.0-13.1 ships the Internet Wiretap edition (1993) of the 1911 text in the dictd
format: ``usr/share/dictd/devil.dict.dz`` (gzip) holds the entries one after another, and
``devil.index`` gives each headword's byte offset and length in base 64. The script keeps
Bierce's preface (from the ``PREFACE`` line of the ``00-database-info`` entry, which opens with
the Wiretap edition's notice, left out) and every entry, in the file's order, and drops dictfmt's
own entries (``00-database-*``: the format line, the URL, the short name, the alphabet). Lines
keep their layout (indented verse, right-aligned names) without trailing spaces; the result ends
with one ``\\n``, is checked by SHA-256 and written atomically. It is not committed.

Usage (stdlib + apt-get only):

    python corpora/build_devil.py                # downloads with apt-get download
    python corpora/build_devil.py --archive /path/to/dict-devil_1.0-13.1_all.deb
"""

from __future__ import annotations

import gzip
import zlib

import buildlib
from buildlib import Archive, BuildError

ARCHIVE = Archive("deb", "dict-devil", "1.0-13.1", "dict-devil_1.0-13.1_all.deb",
                  "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154")
OUTPUT_SHA256 = "7459904b817ceb98cec1206e19d58551121345228b2e8f7de07baba696bbdbd6"
DICT = "usr/share/dictd/devil.dict.dz"
INDEX = "usr/share/dictd/devil.index"
INFO = "00databaseinfo"
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64_number(digits: str) -> int:
    """A dictd index number: base 64, most significant digit first (``"Cf"`` is 2*64+31)."""
    n = 0
    for ch in digits:
        value = B64.find(ch)
        if value < 0:
            raise BuildError(f"{INDEX}: {digits!r} is not a base-64 number")
        n = n * 64 + value
    return n


def read_index(text: str) -> list[tuple[str, int, int]]:
    """(headword, offset, length) for each line of a dictd index."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise BuildError(f"{INDEX} line {number} does not have three tab-separated fields")
        rows.append((fields[0], b64_number(fields[1]), b64_number(fields[2])))
    return rows


def build(dictionary: bytes, index: str) -> str:
    """The preface and every entry of a dictd dictionary, without dictfmt's own entries.

    Args:
        dictionary: the uncompressed ``.dict`` file.
        index: the ``.index`` file's text.
    """
    rows = read_index(index)
    info = [(off, size) for word, off, size in rows if word == INFO]
    spans = sorted({(off, size) for word, off, size in rows if not word.startswith("00")})
    if len(info) != 1 or not spans:
        raise BuildError(f"{INDEX} lacks the {INFO} entry or any headword")
    # Entries follow one another with nothing between them; several headwords may share one.
    for (off, size), (next_off, _) in zip(spans, spans[1:]):
        if next_off > off + size:
            raise BuildError(f"{INDEX}: bytes {off + size}..{next_off} belong to no entry")
    body = buildlib.decode(DICT, dictionary[spans[0][0]:max(o + s for o, s in spans)])
    info_text = buildlib.decode(DICT, dictionary[info[0][0]:info[0][0] + info[0][1]])
    lines = info_text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip() == "PREFACE"]
    if len(starts) != 1:
        raise BuildError(f"the {INFO} entry has no single PREFACE line")
    preface = "\n".join(lines[starts[0]:])
    text = "\n".join(line.rstrip() for line in (preface.strip("\n") + "\n\n" + body).split("\n"))
    buildlib.check_characters("devil.txt", text)
    return text.strip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    args = buildlib.parser(__doc__, ARCHIVE, "devil.txt").parse_args(argv)
    with buildlib.deb_files(buildlib.load(ARCHIVE, args.archive)) as tree:
        try:
            dictionary = gzip.decompress(buildlib.member(tree, DICT))
        except (OSError, EOFError, zlib.error) as exc:
            raise BuildError(f"{DICT} is not gzip data: {exc}") from None
        index = buildlib.decode(INDEX, buildlib.member(tree, INDEX))
    buildlib.finish(args.output, build(dictionary, index), OUTPUT_SHA256)
    return 0


if __name__ == "__main__":
    raise SystemExit(buildlib.run(main))
