#!/usr/bin/env python3
"""Build corpora/rv1909.txt, the Spanish Reina-Valera Bible of 1909, from Debian's ``sword-text-sparv``.

A non-English corpus (about 4.0 MB, accented letters, ``¿`` and ``¡``) laid out like kjv.txt:
each book's name, a blank line, then one verse a line as ``chapter:verse text``, books in canonical
order two blank lines apart. The Debian package ``sword-text-sparv`` 2.60-1 ships the text as a
SWORD "zText" module (``usr/share/sword/modules/texts/ztext/spaRV1909eb/``), one set of three
files per testament:

* ``ot.bzs``: per compressed block, three little-endian uint32: offset in ``.bzz``, compressed
  size, uncompressed size;
* ``ot.bzv``: per entry, uint32 block, uint32 offset in the uncompressed block, uint16 size;
* ``ot.bzz``: the blocks, each a zlib stream.

The entries follow the versification in order: module and testament headings, then per book a
heading entry (``<div type="book">`` with the book's name in an ``x-usfm-h`` milestone), per
chapter a heading entry (``<chapter n="N" sID=...>``) and one entry per verse. The verse number
is the entry's place in its chapter; an empty verse is left out. The text is OSIS markup: the
script drops every tag (``<w lemma="strong:...">`` word wrappers and the rest) and collapses
white space. Words the translators supplied are wrapped in ``<transChange>`` and, in this
source, often glued to their neighbours (``engendró<transChange>un hijo</transChange>á``); the
script puts a space there unless the supplied word is an enclitic pronoun joined to its verb
(``tráeme`` + ``lo``). The result is checked by SHA-256 and written atomically; it is not
committed.

Usage (stdlib + apt-get only):

    python corpora/build_rv1909.py                # downloads with apt-get download
    python corpora/build_rv1909.py --archive /path/to/sword-text-sparv_2.60-1_all.deb
"""

from __future__ import annotations

import re
import struct
import tarfile
import zlib

import buildlib
from buildlib import Archive, BuildError

ARCHIVE = Archive("deb", "sword-text-sparv", "2.60-1", "sword-text-sparv_2.60-1_all.deb",
                  "5c87f9b2bc97457e8a872f5bae7ea7ce59cb3de1dcee73e4d4740451863694cf")
OUTPUT_SHA256 = "b300ca795c16a0babe25fc87f7acd08661fc847a74d9e3770c59adca92656f5a"
MODULE = "usr/share/sword/modules/texts/ztext/spaRV1909eb/"
TESTAMENTS = ("ot", "nt")

BOOK = re.compile(r'<div\b[^>]*\btype="book"[^>]*\bsID="|<div\b[^>]*\bsID="[^"]*"[^>]*\btype="book"')
BOOK_NAME = re.compile(r'<milestone\b[^>]*\bn="([^"]+)"[^>]*\btype="x-usfm-h"')
CHAPTER = re.compile(r'<chapter\b[^>]*\bn="(\d+)"[^>]*\bsID="')
OPEN_ADDED = re.compile(r"<transChange\b[^>]*>")
CLOSE_ADDED = re.compile(r"</transChange>")
TAG = re.compile(r"<[^>]*>")
ENCLITIC = re.compile(r"(?:me|te|se|nos|os|lo|la|los|las|le|les)+")


def ztext_entries(bzs: bytes, bzv: bytes, bzz: bytes) -> list[str]:
    """The entries of one zText testament, in index order, as UTF-8 text."""
    blocks = []
    for k in range(len(bzs) // 12):
        offset, size, unpacked = struct.unpack_from("<III", bzs, 12 * k)
        try:
            block = zlib.decompress(bzz[offset:offset + size])
        except zlib.error as exc:
            raise BuildError(f"block {k} of the module is not a zlib stream: {exc}") from None
        if len(block) != unpacked:
            raise BuildError(f"block {k} has {len(block)} bytes, its index says {unpacked}")
        blocks.append(block)
    entries = []
    for k in range(len(bzv) // 10):
        block, offset, size = struct.unpack_from("<IIH", bzv, 10 * k)
        if size and block >= len(blocks):
            raise BuildError(f"entry {k} points to block {block}, past the last")
        entries.append(buildlib.decode(f"entry {k}", blocks[block][offset:offset + size] if size else b""))
    return entries


def verse_text(markup: str) -> str:
    """Plain text of one verse's OSIS markup, with supplied words spaced off their neighbours."""
    marked = CLOSE_ADDED.sub("\x01", OPEN_ADDED.sub("\x00", markup))
    pieces = re.split("\x00([^\x00\x01]*)\x01", TAG.sub("", marked))  # text, added, text, ...
    if any("\x00" in piece or "\x01" in piece for piece in pieces):
        raise BuildError(f"unbalanced <transChange> in {markup[:80]!r}")
    out = pieces[0]
    for i in range(1, len(pieces), 2):
        added, following = pieces[i].strip(), "".join(pieces[i + 1:])
        if out[-1:].isalpha() and added[:1].isalpha() and not ENCLITIC.fullmatch(added):
            out += " "
        out += added
        if added[-1:].isalpha() and following[:1].isalpha():
            out += " "
        out += pieces[i + 1]
    return " ".join(out.split())


def books(entries: list[str]) -> list[str]:
    """One document per book from the entries of both testaments, in order."""
    out: list[tuple[str, list[str]]] = []
    chapter = verse = 0
    for k, markup in enumerate(entries):
        if BOOK.search(markup):
            name = BOOK_NAME.search(markup)
            if name is None:
                raise BuildError(f"entry {k} opens a book without a name")
            out.append((name.group(1), []))
            chapter = verse = 0
            continue
        heading = CHAPTER.search(markup)
        if heading:
            chapter, verse = int(heading.group(1)), 0
            continue
        text = verse_text(markup)
        if not chapter:
            if text:
                raise BuildError(f"entry {k} has text outside any chapter: {text[:60]!r}")
            continue
        verse += 1
        if text:
            out[-1][1].append(f"{chapter}:{verse} {text}")
    return [f"{name}\n\n" + "\n".join(verses) for name, verses in out]


def read(tree: tarfile.TarFile) -> list[str]:
    entries = []
    for testament in TESTAMENTS:
        parts = [buildlib.member(tree, f"{MODULE}{testament}.{ext}") for ext in ("bzs", "bzv", "bzz")]
        entries.extend(ztext_entries(*parts))
    return entries


def main(argv: list[str] | None = None) -> int:
    args = buildlib.parser(__doc__, ARCHIVE, "rv1909.txt").parse_args(argv)
    with buildlib.deb_files(buildlib.load(ARCHIVE, args.archive)) as tree:
        documents = books(read(tree))
    print(f"books:      {len(documents)}")
    buildlib.finish(args.output, buildlib.join(documents), OUTPUT_SHA256)
    return 0


if __name__ == "__main__":
    raise SystemExit(buildlib.run(main))
