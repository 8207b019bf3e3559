#!/usr/bin/env python3
"""Build corpora/emma.txt and corpora/austen.txt, Jane Austen's novels, from Debian's ``r-cran-janeaustenr``.

The Debian package ``r-cran-janeaustenr`` 1.0.0-1 is the R package janeaustenr (Julia Silge),
which ships the text of Austen's six finished novels as R character vectors, one element a line,
in the package's lazy-load database: ``data/Rdata.rdx`` (gzip-compressed, R's XDR serialisation)
maps each object's name to an offset and length in ``data/Rdata.rdb``, where each object is a
4-byte length and a zlib stream of the same serialisation. This script reads both with a small
reader of that format (only the types the files use), so it needs no R.

Two corpora come out of one archive:

* ``emma.txt``: Emma (1815) alone, about 0.88 MB;
* ``austen.txt``: the other five, in order of publication (Sense and Sensibility, Pride and
  Prejudice, Mansfield Park, Northanger Abbey, Persuasion), about 3.1 MB, two blank lines apart.

The lines are joined with ``\\n`` as they are, trailing spaces dropped; the one piece that is not
Austen's, the "A NOTE ON THE TEXT" section a modern edition appended to Northanger Abbey, is cut
off. Each output is checked by SHA-256 and written atomically; neither is committed.

Usage (stdlib + apt-get only):

    python corpora/build_austen.py                # downloads with apt-get download
    python corpora/build_austen.py --archive /path/to/r-cran-janeaustenr_1.0.0-1_all.deb
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import buildlib
from buildlib import Archive, BuildError

ARCHIVE = Archive("deb", "r-cran-janeaustenr", "1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb",
                  "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95")
DATA = "usr/lib/R/site-library/janeaustenr/data/"
EMMA = ("emma",)
OTHERS = ("sensesensibility", "prideprejudice", "mansfieldpark", "northangerabbey", "persuasion")
OUTPUT_SHA256 = {
    "emma.txt": "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe",
    "austen.txt": "2631076222385e697651dc178e97011b2399cc6fcd6556b5478d77bb2a4a25ab",
}
EDITORIAL = {"northangerabbey": "A NOTE ON THE TEXT"}  # first line of a modern editor's addition

# R serialisation (format 2 or 3, XDR: big-endian). Every item starts with a 32-bit flags word:
# type in bits 0-7, "is object" bit 8, "has attributes" bit 9, "has tag" bit 10, CHARSXP's
# encoding bits from 12. Vectors follow with a 32-bit length and their elements, then their
# attribute pairlist if they have one.
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 16, 19
NILVALUE_SXP, REFSXP = 254, 255
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10


class RReader:
    """Reads the subset of R's serialisation that a lazy-load database of character vectors uses.

    Values come back as Python objects: a character vector as a list of str (None for NA), an
    integer or logical vector as a list of int, a list as a list, a pairlist as a list of
    (tag, value) pairs, a symbol as its name, NULL as None. Attributes are read and dropped,
    except a list's ``names``, which make it a dict.
    """

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def int32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise BuildError("R data ends inside an item")
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self):
        if self.data[:2] != b"X\n":
            raise BuildError("R data is not in the XDR serialisation format")
        self.pos = 2
        version = self.int32()
        self.int32(), self.int32()  # the writer's R version, the oldest reader's
        if version == 3:
            skip = self.int32()  # the native encoding's name follows
            self.pos += skip
        elif version != 2:
            raise BuildError(f"R serialisation version {version} is not supported")
        return self.item()

    def item(self):
        flags = self.int32()
        kind = flags & 0xFF
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int32()
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == LISTSXP:
            if flags & HAS_ATTR:
                self.item()  # a pairlist node's attributes: none of ours has any worth keeping
            tag = self.item() if flags & HAS_TAG else None
            head = (tag, self.item())
            rest = self.item()
            return [head] + (rest or [])
        if kind == CHARSXP:
            n = self.int32()
            if n == -1:
                return None
            raw = self.data[self.pos:self.pos + n]
            self.pos += n
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BuildError(f"an R string is not valid UTF-8: {exc}") from None
        if kind in (LGLSXP, INTSXP, STRSXP, VECSXP):
            n = self.int32()
            if kind in (LGLSXP, INTSXP):
                values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
                self.pos += 4 * n
            else:
                values = [self.item() for _ in range(n)]
            attrs = dict(self.item()) if flags & HAS_ATTR else {}
            if kind == VECSXP and "names" in attrs:
                return dict(zip(attrs["names"], values))
            return values
        raise BuildError(f"R item type {kind} is not supported by this reader")


def lazy_load(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """Every object of an R lazy-load database, by name.

    Args:
        rdx: the ``.rdx`` index file (gzip-compressed serialised list whose ``variables`` maps
            each name to (offset, length) in ``rdb``).
        rdb: the ``.rdb`` file: per object a big-endian 4-byte uncompressed length and a zlib
            stream.
    """
    try:
        index = RReader(gzip.decompress(rdx)).read()
    except (OSError, EOFError) as exc:
        raise BuildError(f"the .rdx index is not gzip data: {exc}") from None
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise BuildError("the .rdx index has no variables table")
    objects = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[offset:offset + length]
        try:
            (expected,) = struct.unpack_from(">I", blob)
            raw = zlib.decompress(blob[4:])
        except (struct.error, zlib.error) as exc:
            raise BuildError(f"object {name} of the .rdb is not a zlib stream: {exc}") from None
        if len(raw) != expected:
            raise BuildError(f"object {name} has {len(raw)} bytes, its header says {expected}")
        objects[name] = RReader(raw).read()
    return objects


def novel(name: str, lines: object) -> str:
    """One novel's text from its character vector, trailing spaces and modern additions removed."""
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise BuildError(f"{name} is not a character vector without NA")
    lines = [line.rstrip() for line in lines]
    cut = EDITORIAL.get(name)
    if cut is not None:
        if cut not in lines:
            raise BuildError(f"{name} no longer has its {cut!r} section")
        lines = lines[:lines.index(cut)]
    text = "\n".join(lines).strip("\n")
    buildlib.check_characters(name, text)
    return text


def build(objects: dict[str, object], names: tuple[str, ...]) -> str:
    missing = [name for name in names if name not in objects]
    if missing:
        raise BuildError(f"the package has no novel {', '.join(missing)}")
    return buildlib.join([novel(name, objects[name]) for name in names])


def main(argv: list[str] | None = None) -> int:
    parser = buildlib.parser(__doc__, ARCHIVE, "austen.txt")
    parser.add_argument("--emma", type=Path, default=buildlib.HERE / "emma.txt",
                        help="where Emma goes (default: emma.txt next to this script)")
    args = parser.parse_args(argv)
    with buildlib.deb_files(buildlib.load(ARCHIVE, args.archive)) as tree:
        objects = lazy_load(buildlib.member(tree, DATA + "Rdata.rdx"),
                            buildlib.member(tree, DATA + "Rdata.rdb"))
    for names, output, key in ((EMMA, args.emma, "emma.txt"), (OTHERS, args.output, "austen.txt")):
        buildlib.finish(output, build(objects, names), OUTPUT_SHA256[key])
    return 0


if __name__ == "__main__":
    raise SystemExit(buildlib.run(main))
